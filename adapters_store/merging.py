"""Named merges: a new LoRA adapter made from others with PEFT's own `add_weighted_adapter`
(linear, cat, svd, ties, dare_linear, dare_ties, magnitude_prune), without the base model.

PEFT merges on a `PeftModel`, but its math reads only the adapters' A and B (and their scaling,
and for the svd family the product B @ A): never the base weights. So the merge runs on a
skeleton of the base model: one shape-only `nn.Linear` per target module (its weight is one zero
expanded to `[out, in]`, no memory), named and shaped from the store's `SlotGeometry`, which it
already reads from the base model's files. The store can merge without loading any model; the
result is PEFT's (tests compare it with `add_weighted_adapter` on the real model, type by type).

DARE draws its random masks module by module, in the model's module order: the skeleton keeps
the order Llama-family models register their projections (layers ascending; q, k, v, o, gate,
up, down), and `seed` makes a merge reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn

from adapters_store.merge_spec import MergeSpec, merged_rank
from lora_core.errors import InvalidRequestError
from lora_core.geometry import SlotGeometry

__all__ = ["MergedAdapter", "merge_adapters"]

PROJECTION_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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


class ShapeOnlyLinear(nn.Linear):
    """An `nn.Linear`'s shape for PEFT to wrap, without its weight: one zero, expanded."""

    def __init__(self, in_features: int, out_features: int) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(1).expand(out_features, in_features), requires_grad=False)
        self.bias = None


class Skeleton(nn.Module):
    """The root: PEFT's causal-LM wrapper (an adapter saved with `task_type: CAUSAL_LM`) keeps a
    reference to this method; a skeleton never generates."""

    def prepare_inputs_for_generation(self, *args, **kwargs):
        raise NotImplementedError("a merge skeleton holds no weights and cannot generate")


def _skeleton(geometry: SlotGeometry) -> nn.Module:
    """The base model's target modules as shape-only Linears, at their names, in model order."""
    root = Skeleton()
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
