"""The slot geometry the adapter store reads from a base model's files equals the one the engine
builds from the loaded model: the store validates adapters without ever loading weights."""

from __future__ import annotations

import json
import struct

import pytest

from deployments.engine.base_model import TINY_NAME, BaseModelSpec, load_base_model
from deployments.engine.engine import slot_model_for
from lora_core.base_models import tiny_llama_config
from lora_core.geometry import (
    SlotGeometry,
    llama_module_shapes,
    module_shapes_from_weights,
    normalize_model_name,
    safetensors_shapes,
    slot_geometry,
)
from lora_core.settings import EngineConfig

TARGETS = [("q_proj", "k_proj", "v_proj", "o_proj"), ("q_proj", "v_proj"), ("gate_proj", "up_proj", "down_proj", "o_proj")]


def engine_geometry(config: EngineConfig, base=None) -> SlotGeometry:
    base = base or load_base_model(BaseModelSpec(name=config.base_model, path=config.base_model_path))
    return slot_model_for(base, config, num_slots=1).geometry


@pytest.mark.parametrize("targets", TARGETS)
def test_tiny_from_its_config_matches_the_engine(targets):
    config = EngineConfig(base_model=TINY_NAME, target_modules=targets, max_rank=8, max_adapter_bytes=12345)
    geometry = slot_geometry(config)
    assert geometry == engine_geometry(config)
    assert geometry.max_rank == 8 and geometry.max_size_bytes == 12345
    assert geometry.base_model_names == frozenset({TINY_NAME})


@pytest.mark.parametrize("shard", [False, True])
def test_a_local_folder_from_its_safetensors_headers_matches_the_engine(tmp_path, shard):
    tiny = load_base_model(BaseModelSpec(name=TINY_NAME))
    folder = tmp_path / "My-Base"
    tiny.model.save_pretrained(folder, **({"max_shard_size": "50KB"} if shard else {}))
    tiny.tokenizer.save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").is_file() == shard
    config = EngineConfig(base_model_path=str(folder))
    geometry = slot_geometry(config)
    assert geometry == engine_geometry(config)
    assert geometry.base_model_names == frozenset({"my-base"})


def test_header_shapes_are_read_without_the_weights(tmp_path):
    header = json.dumps({"__metadata__": {"format": "pt"},
                         "model.layers.0.self_attn.q_proj.weight": {"dtype": "F32", "shape": [6, 4], "data_offsets": [0, 96]}})
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header.encode())  # no tensor bytes
    assert safetensors_shapes(tmp_path) == {"model.layers.0.self_attn.q_proj.weight": (6, 4)}
    assert module_shapes_from_weights(safetensors_shapes(tmp_path), ["q_proj"]) == {"model.layers.0.self_attn.q_proj": (4, 6)}


@pytest.mark.parametrize("content", [b"", b"\x01\x02", struct.pack("<Q", 1 << 40) + b"{}"])
def test_a_file_that_is_not_safetensors_is_refused(tmp_path, content):
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(ValueError):
        safetensors_shapes(tmp_path)


def test_a_folder_without_weights_or_a_target_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        safetensors_shapes(tmp_path)
    with pytest.raises(ValueError, match="lm_head_proj"):
        llama_module_shapes(tiny_llama_config(), ["q_proj", "lm_head_proj"])


def test_llama_shapes_honour_head_dim_and_grouped_kv():
    config = tiny_llama_config(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=32)
    shapes = llama_module_shapes(config, ["q_proj", "k_proj", "o_proj"])
    assert shapes["model.layers.0.self_attn.q_proj"] == (64, 128)
    assert shapes["model.layers.1.self_attn.k_proj"] == (64, 32)
    assert shapes["model.layers.0.self_attn.o_proj"] == (128, 64)
    assert len(shapes) == 3 * config["num_hidden_layers"]


def test_an_unknown_base_model_name_is_refused():
    with pytest.raises(ValueError, match="base_model_path"):
        slot_geometry(EngineConfig(base_model="gpt-17"))


@pytest.mark.parametrize("name", ["HuggingFaceTB/SmolLM2-135M-Instruct", "/models/smollm2-135m-instruct/", "SmolLM2-135M-Instruct"])
def test_model_names_compare_by_their_last_part(name):
    assert normalize_model_name(name) == "smollm2-135m-instruct"
