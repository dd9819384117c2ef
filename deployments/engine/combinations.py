"""Per-request combinations: several adapters, each delta times its weight, as one derived adapter.

    delta = sum_i weight_i * scaling_i * B_i @ A_i

Exact when every module's summed rank fits the slots' `max_rank`: the adapters' A rows are
stacked (each times its weight and scaling) and their B columns side by side, which is PEFT's
`add_weighted_adapter(combination_type="cat")`, scaling 1. A module whose summed rank does not
fit is reduced to `max_rank` by truncated SVD of that sum, the best rank-`max_rank` approximation
of it, computed without forming the `[out, in]` product: with B = Qb Rb and A^T = Qa Ra (thin QR),
B @ A = Qb (Rb Ra^T) Qa^T, and only the small `R x R` middle is decomposed.

Pure torch, in fp32, on the host: a loader thread builds it (never the engine loop).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from deployments.contracts import CombinationKind
from lora_core.checkpoint import LoraCheckpoint, LoraModuleWeights, PeftLoraConfig

__all__ = ["CombinedAdapter", "combine_checkpoints", "combination_version"]


@dataclass(frozen=True)
class CombinedAdapter:
    checkpoint: LoraCheckpoint
    kind: CombinationKind


def combination_version(parts: Sequence[tuple[str, str, float]]) -> str:
    """The derived adapter's version from its recipe: (adapter id, version, weight) per part."""
    recipe = ";".join(f"{adapter_id}@{version}*{weight!r}" for adapter_id, version, weight in parts)
    return hashlib.sha256(recipe.encode()).hexdigest()


def combine_checkpoints(parts: Sequence[tuple[LoraCheckpoint, float]], max_rank: int, version: str) -> CombinedAdapter:
    """One checkpoint for the weighted sum of `parts` (checkpoint, weight), each module within
    `max_rank`; modules only some parts target take those parts alone."""
    names = sorted({name for checkpoint, _ in parts for name in checkpoint.modules})
    modules: dict[str, LoraModuleWeights] = {}
    kind: CombinationKind = "exact"
    for name in names:
        present = [(checkpoint.modules[name], weight) for checkpoint, weight in parts if name in checkpoint.modules]
        lora_a = torch.cat([w.lora_a.float() * (weight * w.scaling) for w, weight in present], dim=0)
        lora_b = torch.cat([w.lora_b.float() for w, _ in present], dim=1)
        if lora_a.shape[0] > max_rank:
            lora_a, lora_b = truncated_product(lora_a, lora_b, max_rank)
            kind = "svd"
        modules[name] = LoraModuleWeights(lora_a=lora_a.contiguous(), lora_b=lora_b.contiguous(), scaling=1.0)
    ranks = {name: weights.rank for name, weights in modules.items()}
    rank = max(ranks.values())
    config = PeftLoraConfig(
        peft_type="LORA", r=rank, lora_alpha=rank, target_modules=sorted({n.rsplit(".", 1)[-1] for n in names}),
        rank_pattern={re.escape(name): r for name, r in ranks.items() if r != rank},
        base_model_name_or_path=parts[0][0].config.base_model_name_or_path,
    )
    size_bytes = sum(t.numel() * t.element_size() for w in modules.values() for t in (w.lora_a, w.lora_b))
    checkpoint = LoraCheckpoint(config=config, modules=modules, size_bytes=size_bytes, sha256=version, version=version)
    return CombinedAdapter(checkpoint, kind)


def truncated_product(lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') of rank `rank` with B' @ A' the best rank-`rank` approximation of B @ A
    (A [R, in], B [out, R]); the singular values go to B'."""
    q_b, r_b = torch.linalg.qr(lora_b)  # [out, R], [R, R]
    q_a, r_a = torch.linalg.qr(lora_a.t())  # [in, R], [R, R]
    u, s, vh = torch.linalg.svd(r_b @ r_a.t())
    return (vh[:rank] @ q_a.t()), (q_b @ u[:, :rank]) * s[:rank]
