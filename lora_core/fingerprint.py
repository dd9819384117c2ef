"""A dtype-independent checksum of what a slot must hold for an adapter: per module, the L2 norms
of A and of B times its scaling (PEFT's), in float64.

The store computes it from the validated checkpoint and ships it with the payload; a replica
computes the same numbers from the slot rows it wrote (in the slot's dtype, with the scaling
folded into B; `torch._foreach_norm` over every layer at once, so the check costs about what
the copy does) and compares them within that dtype's rounding (`matches`). A wrong row, a
partial copy, a wrong scaling or another adapter's weights all move the norms by far more than
rounding does. Pure torch, no Ray.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lora_core.checkpoint import LoraCheckpoint

__all__ = ["Fingerprint", "fingerprint", "matches", "module_fingerprint", "tolerance_for"]

Fingerprint = Mapping[str, tuple[float, float]]
"""module name -> (L2 norm of A, L2 norm of scaled B)."""


def module_fingerprint(lora_a: torch.Tensor, scaled_b: torch.Tensor) -> tuple[float, float]:
    return float(lora_a.double().norm()), float(scaled_b.double().norm())


def fingerprint(checkpoint: LoraCheckpoint) -> dict[str, tuple[float, float]]:
    return {
        name: module_fingerprint(weights.lora_a, weights.lora_b.double() * weights.scaling)
        for name, weights in checkpoint.modules.items()
    }


def tolerance_for(dtype: torch.dtype) -> float:
    """Relative tolerance of a norm of values stored in `dtype` (rounding, not corruption)."""
    return 1e-5 if dtype in (torch.float32, torch.float64) else 2e-2


def matches(expected: Fingerprint, got: Fingerprint, relative_tolerance: float) -> str | None:
    """None when `got` fits `expected`, else the first module that does not and how."""
    if set(expected) != set(got):
        return f"modules differ: expected {sorted(expected)[:3]}..., got {sorted(got)[:3]}..."
    for name, want in expected.items():
        have = got[name]
        if any(abs(w - h) > relative_tolerance * max(w, 1e-12) for w, h in zip(want, have)):
            return f"{name}: slot norms {tuple(round(h, 6) for h in have)} != expected {tuple(round(w, 6) for w in want)}"
    return None
