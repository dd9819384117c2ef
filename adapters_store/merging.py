"""Named merges: a new LoRA adapter made from others with PEFT's own `add_weighted_adapter`
(linear, cat, svd, ties, dare_linear, dare_ties, magnitude_prune), without the base model.

PEFT merges on a `PeftModel`, but its math reads only the adapters' A and B (and their scaling,
and for the svd family the product B @ A): never the base weights. So the merge runs on a
skeleton of the base model: one shape-only `nn.Linear` per target module (its weight is one zero
expanded to `[out, in]`, no memory), named and shaped from the store's `SlotGeometry`, which it
already reads from the base model's files. The store can merge without loading any model; the
result is PEFT's, byte for byte (tests compare it with `add_weighted_adapter` on the real model).

DARE draws its random masks module by module, in the model's module order: the skeleton keeps
the order Llama-family models register their projections (layers ascending; q, k, v, o, gate,
up, down), and `seed` makes a merge reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lora_core.adapter_ids import validate_adapter_id
from lora_core.errors import InvalidAdapterIdError, InvalidRequestError
from lora_core.geometry import SlotGeometry

__all__ = ["CombinationType", "MergeInput", "MergeSpec", "MergedAdapter", "merge_adapters", "merged_rank"]

CombinationType = Literal["linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
SAME_RANK_TYPES = frozenset({"linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"})
DENSITY_TYPES = frozenset({"ties", "dare_linear", "dare_ties", "magnitude_prune"})
POSITIVE_WEIGHT_TYPES = DENSITY_TYPES
"""Pruning by magnitude and electing signs assume every input pulls the same way; linear, cat and
svd are task arithmetic, where a negative weight subtracts an adapter."""
PROJECTION_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class MergeInput(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(min_length=1, description="an adapter id, <tenant>/<name>")
    weight: float = Field(1.0, description="finite and not 0")

    @field_validator("id")
    @classmethod
    def _valid_id(cls, adapter_id: str) -> str:
        return _adapter_id(adapter_id)

    @field_validator("weight")
    @classmethod
    def _finite_nonzero(cls, weight: float) -> float:
        if not math.isfinite(weight) or weight == 0:
            raise ValueError(f"weight must be a finite number other than 0, got {weight}")
        return weight


class MergeSpec(BaseModel):
    """`POST /v1/adapters/merge`'s body, and the recipe kept with the merged adapter."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, description="the new adapter's id, <tenant>/<name>")
    adapters: tuple[MergeInput, ...] = Field(min_length=1, max_length=16)
    combination_type: CombinationType = "linear"
    density: Optional[float] = Field(None, gt=0, le=1, description="kept fraction, for ties, dare_* and magnitude_prune")
    majority_sign_method: Literal["total", "frequency"] = "total"
    svd_rank: Optional[int] = Field(None, ge=1, description="the svd result's rank; default: the inputs' largest")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="DARE's random masks")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        return _adapter_id(name)

    @model_validator(mode="after")
    def _fits_the_type(self) -> "MergeSpec":
        kind = self.combination_type
        if kind in DENSITY_TYPES and self.density is None:
            raise ValueError(f"combination_type {kind} needs a density in (0, 1]")
        if kind not in DENSITY_TYPES and self.density is not None:
            raise ValueError(f"combination_type {kind} takes no density")
        if self.svd_rank is not None and kind != "svd":
            raise ValueError(f"svd_rank is for combination_type svd, not {kind}")
        if kind in POSITIVE_WEIGHT_TYPES and any(i.weight < 0 for i in self.adapters):
            raise ValueError(f"combination_type {kind} needs positive weights")
        ids = [i.id for i in self.adapters]
        if len(set(ids)) != len(ids):
            raise ValueError(f"an adapter is listed twice: {ids}")
        if self.name in ids:
            raise ValueError(f"the merge's name {self.name!r} is one of its inputs")
        return self


def _adapter_id(text: str) -> str:
    try:
        return validate_adapter_id(text)
    except InvalidAdapterIdError as error:  # a field error (422 naming the field), not a bare 400
        raise ValueError(str(error)) from None


def merged_rank(spec: MergeSpec, ranks: list[int]) -> int:
    """The result's rank by PEFT's rules (`_check_add_weighted_adapter`); InvalidRequestError
    (400) when the inputs do not allow the combination."""
    kind = "linear" if len(ranks) == 1 else spec.combination_type  # PEFT merges one adapter linearly
    if kind in SAME_RANK_TYPES:
        if len(set(ranks)) != 1:
            raise InvalidRequestError(f"combination_type {kind} needs inputs of one rank, got ranks {ranks}; "
                                      "use cat or svd to combine different ranks")
        return ranks[0]
    if kind == "cat":
        return sum(ranks)
    return spec.svd_rank or max(ranks)


@dataclass(frozen=True)
class MergedAdapter:
    folder: Path
    rank: int
    target_modules: tuple[str, ...]


def merge_adapters(spec: MergeSpec, folders: list[Path], ranks: list[int], geometry: SlotGeometry,
                   out: Path) -> MergedAdapter:
    """Merge `folders` (PEFT adapter folders, in `spec.adapters`' order, already validated against
    `geometry`, of ranks `ranks`) into a PEFT folder at `out`. Refuses a result over `max_rank`
    before computing anything."""
    import torch
    from peft import PeftModel

    rank = merged_rank(spec, ranks)
    if rank > geometry.max_rank:
        raise InvalidRequestError(f"the merged adapter's rank would be {rank}, over this server's max_rank "
                                  f"{geometry.max_rank} ({spec.combination_type} of ranks {ranks})")
    names = [f"input_{index}" for index in range(len(folders))]
    model = PeftModel.from_pretrained(_skeleton(geometry), str(folders[0]), adapter_name=names[0])
    for name, folder in zip(names[1:], folders[1:]):
        model.load_adapter(str(folder), adapter_name=name)
    options = {"density": spec.density} if spec.density is not None else {}
    if spec.combination_type in {"ties", "dare_ties"}:
        options["majority_sign_method"] = spec.majority_sign_method
    if spec.svd_rank is not None:
        options["svd_rank"] = spec.svd_rank
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(spec.seed)
        model.add_weighted_adapter(names, [i.weight for i in spec.adapters], "merged",
                                   combination_type=spec.combination_type, **options)
    model.save_pretrained(str(out), selected_adapters=["merged"], save_embedding_layers=False)
    saved = out / "merged"
    config = model.peft_config["merged"]
    targets = config.target_modules
    return MergedAdapter(saved, rank, tuple(sorted(targets)) if not isinstance(targets, str) else (targets,))


def _skeleton(geometry: SlotGeometry):
    """The base model's target modules as shape-only Linears, at their names, in model order."""
    import torch
    from torch import nn

    class ShapeOnlyLinear(nn.Linear):
        def __init__(self, in_features: int, out_features: int) -> None:
            nn.Module.__init__(self)
            self.in_features, self.out_features = in_features, out_features
            self.weight = nn.Parameter(torch.zeros(1).expand(out_features, in_features), requires_grad=False)
            self.bias = None

    root = nn.Module()
    for name in sorted(geometry.module_shapes, key=_model_order):
        in_features, out_features = geometry.module_shapes[name]
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, ShapeOnlyLinear(in_features, out_features))
    return root


def _model_order(name: str) -> tuple:
    parts = []
    for part in name.split("."):
        if part.isdigit():
            parts.append((0, int(part), ""))
        elif part in PROJECTION_ORDER:
            parts.append((1, PROJECTION_ORDER.index(part), ""))
        else:
            parts.append((2, 0, part))
    return tuple(parts)
