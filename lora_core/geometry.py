"""What an adapter must fit to be served: the slot geometry, read from the base model's files.

    SlotGeometry                    target modules -> (in_features, out_features), max rank, limits
    slot_geometry(engine_config)    the geometry engines with these settings have, without weights:
        base_model_path             config.json + the safetensors headers (any architecture)
        smollm2-135m-instruct       the converted folder's headers, else the GGUF's metadata
        tiny-random-llama           derived from `tiny_llama_config()`

The adapter store validates with it, so the store never loads a base model (a 70B base would be
~280 GB of fp32 weights just to learn a few shapes). The engine computes the same geometry from
its live modules (`SlotLoraModel.geometry`); a test keeps the two equal for every known model.
Pure module: stdlib, plus the `gguf` reader (numpy) for SmolLM2 before its first conversion.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_core.base_models import (
    SMOLLM2_NAME,
    TINY_NAME,
    converted_cache_is_complete,
    smollm2_cache_folder,
    smollm2_gguf_path,
    smollm2_source_info,
    tiny_llama_config,
)
from lora_core.paths import default_model_cache_dir
from lora_core.settings import EngineConfig

__all__ = [
    "DEFAULT_MAX_SIZE_BYTES",
    "SlotGeometry",
    "llama_module_shapes",
    "module_shapes_from_weights",
    "normalize_model_name",
    "safetensors_shapes",
    "slot_geometry",
]

DEFAULT_MAX_SIZE_BYTES = 512 * 1024 * 1024
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


@dataclass(frozen=True)
class SlotGeometry:
    """What a checkpoint must fit: the prepared target modules, their shapes, the rank bound."""

    max_rank: int
    module_shapes: Mapping[str, tuple[int, int]]  # module name -> (in_features, out_features)
    base_model_names: frozenset[str] = frozenset()
    max_size_bytes: int = DEFAULT_MAX_SIZE_BYTES


def normalize_model_name(name: str) -> str:
    """`HuggingFaceTB/SmolLM2-135M-Instruct` and `/models/smollm2-135m-instruct/` compare equal."""
    return name.rstrip("/").rsplit("/", 1)[-1].lower()


def slot_geometry(config: EngineConfig) -> SlotGeometry:
    """The geometry of engines built with `config`, from files only (no weights are read)."""
    if config.base_model_path is not None:
        folder = Path(config.base_model_path).expanduser().resolve()
        shapes = module_shapes_from_weights(safetensors_shapes(folder), config.target_modules)
        name = str(folder)
    elif config.base_model == TINY_NAME:
        shapes = llama_module_shapes(tiny_llama_config(), config.target_modules)
        name = TINY_NAME
    elif config.base_model == SMOLLM2_NAME:
        shapes = _smollm2_shapes(config)
        name = SMOLLM2_NAME
    else:
        raise ValueError(f"unknown base model {config.base_model!r}; set base_model_path to a local folder")
    return SlotGeometry(
        max_rank=config.max_rank,
        module_shapes=shapes,
        base_model_names=frozenset({normalize_model_name(name)}),
        max_size_bytes=config.max_adapter_bytes,
    )


def _smollm2_shapes(config: EngineConfig) -> dict[str, tuple[int, int]]:
    gguf_path = smollm2_gguf_path()
    folder = smollm2_cache_folder(config.model_cache_dir or default_model_cache_dir())
    if converted_cache_is_complete(folder, smollm2_source_info(gguf_path)):
        return module_shapes_from_weights(safetensors_shapes(folder), config.target_modules)
    return llama_module_shapes(_gguf_llama_config(gguf_path), config.target_modules)


def safetensors_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """tensor name -> shape for a model folder's `model.safetensors` (or its sharded index), from
    the files' JSON headers alone."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder} has no model.safetensors or model.safetensors.index.json")
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        shapes.update(_header_shapes(folder / name))
    return shapes


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than its header length)")
        (length,) = struct.unpack("<Q", prefix)
        if length > _MAX_HEADER_BYTES:
            raise ValueError(f"{path} claims a {length}-byte header; not a safetensors file")
        header = json.loads(file.read(length))
    return {key: tuple(entry["shape"]) for key, entry in header.items() if key != "__metadata__"}


def module_shapes_from_weights(
    weight_shapes: Mapping[str, tuple[int, ...]], target_modules: Iterable[str]
) -> dict[str, tuple[int, int]]:
    """module name -> (in_features, out_features) of every 2-D `<module>.weight` whose last name
    part is a target (a Linear's weight is [out, in])."""
    targets = set(target_modules)
    shapes = {}
    for key, shape in weight_shapes.items():
        module, _, leaf = key.rpartition(".")
        if leaf == "weight" and module.rsplit(".", 1)[-1] in targets and len(shape) == 2:
            shapes[module] = (int(shape[1]), int(shape[0]))
    _check_found(targets, shapes)
    return dict(sorted(shapes.items()))


def llama_module_shapes(config: Mapping[str, Any], target_modules: Iterable[str]) -> dict[str, tuple[int, int]]:
    """The same map for a Llama-family `config.json` (transformers' module names)."""
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    intermediate = int(config["intermediate_size"])
    per_layer = {
        "self_attn.q_proj": (hidden, heads * head_dim),
        "self_attn.k_proj": (hidden, kv_heads * head_dim),
        "self_attn.v_proj": (hidden, kv_heads * head_dim),
        "self_attn.o_proj": (heads * head_dim, hidden),
        "mlp.gate_proj": (hidden, intermediate),
        "mlp.up_proj": (hidden, intermediate),
        "mlp.down_proj": (intermediate, hidden),
    }
    targets = set(target_modules)
    shapes = {
        f"model.layers.{layer}.{module}": shape
        for layer in range(int(config["num_hidden_layers"]))
        for module, shape in per_layer.items()
        if module.rsplit(".", 1)[-1] in targets
    }
    _check_found(targets, shapes)
    return dict(sorted(shapes.items()))


def _gguf_llama_config(path: Path) -> dict[str, Any]:
    """A Llama GGUF's metadata as the config.json fields `llama_module_shapes` reads."""
    import gguf  # numpy only; parsing the tokenizer arrays takes a few seconds

    reader = gguf.GGUFReader(path)

    def field(key: str) -> Any:
        entry = reader.fields.get(key)
        return entry.contents() if entry is not None else None

    architecture = field("general.architecture")
    if architecture != "llama":
        raise ValueError(f"{path} holds a {architecture!r} model; only llama GGUFs are known here")
    return {
        "hidden_size": field("llama.embedding_length"),
        "intermediate_size": field("llama.feed_forward_length"),
        "num_hidden_layers": field("llama.block_count"),
        "num_attention_heads": field("llama.attention.head_count"),
        "num_key_value_heads": field("llama.attention.head_count_kv"),
        "head_dim": field("llama.rope.dimension_count"),
    }


def _check_found(targets: set[str], shapes: Mapping[str, tuple[int, int]]) -> None:
    found = {name.rsplit(".", 1)[-1] for name in shapes}
    if missing := targets - found:
        raise ValueError(f"target modules {sorted(missing)} are not Linear layers of the base model")
