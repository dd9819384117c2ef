"""The body of `POST /v1/adapters/merge` and the recipe kept beside a merged adapter: which
adapters, with which weights, combined how (PEFT's `add_weighted_adapter` options), checked
before anything is computed. Pure pydantic, so the HTTP ingress reads it without torch or PEFT;
`merging` does the work.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lora_core.adapter_ids import validate_adapter_id
from lora_core.errors import InvalidAdapterIdError, InvalidRequestError

__all__ = ["MERGE_RECIPE_FILE", "CombinationType", "MergeInput", "MergeSpec", "merged_rank"]

MERGE_RECIPE_FILE = "merge_recipe.json"
"""Beside a merged adapter's files: the `MergeSpec` it was made from."""

CombinationType = Literal["linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
SAME_RANK_TYPES = frozenset({"linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"})
DENSITY_TYPES = frozenset({"ties", "dare_linear", "dare_ties", "magnitude_prune"})
POSITIVE_WEIGHT_TYPES = DENSITY_TYPES
"""Pruning by magnitude and electing signs assume every input pulls the same way; linear, cat and
svd are task arithmetic, where a negative weight subtracts an adapter."""


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
