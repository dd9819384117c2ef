"""A small valid PEFT LoRA adapter as bytes, and folder helpers, for the source and syncer tests."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import torch
from safetensors.torch import save

from adapters_store.sources import RetryPolicy

FAST_RETRY = RetryPolicy(max_attempts=3, base_delay_s=0.01, max_delay_s=0.02, total_timeout_s=2.0)

FILES = ("adapter_config.json", "adapter_model.safetensors")

def adapter_files(r: int = 4, seed: int = 0, hidden: int = 16) -> dict[str, bytes]:
    """The two files of a valid PEFT LoRA adapter on q_proj/v_proj of one layer, as bytes."""
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 2 * r,
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "task_type": "CAUSAL_LM",
    }
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module in ("q_proj", "v_proj"):
        key = f"base_model.model.model.layers.0.self_attn.{module}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(r, hidden, generator=gen)  # [r, in]
        tensors[f"{key}.lora_B.weight"] = torch.randn(hidden, r, generator=gen)  # [out, r]
    return {"adapter_config.json": json.dumps(config).encode(), "adapter_model.safetensors": save(tensors)}

def write_adapter(folder: Path, r: int = 4, seed: int = 0) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    files = adapter_files(r, seed)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files

def read_folder(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}

def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
