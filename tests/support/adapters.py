"""Real PEFT adapters for tests, made with PEFT itself on the tiny base model, written to disk."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from deployments.engine.base_model import BaseModelSpec, load_base_model

TINY = BaseModelSpec(name="tiny-random-llama")


def fresh_tiny_model():
    return load_base_model(TINY).model


def make_peft_adapter(folder: Path, seed: int = 0, **lora_options) -> Path:
    """Save a PEFT LoRA adapter with random (non-zero) A and B, so it really changes the logits."""
    options = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
    options.update(lora_options)
    model = fresh_tiny_model()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, LoraConfig(**options))
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_" in name:
                    parameter.normal_(0, 0.2)
    peft_model.save_pretrained(folder, save_embedding_layers=False)
    return Path(folder)


def edit_adapter_config(folder: Path, **changes) -> None:
    path = Path(folder) / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
