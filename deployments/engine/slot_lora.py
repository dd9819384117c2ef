"""Slot-indexed LoRA: every target Linear holds the weights of all slots, stacked, and each row of
a batch picks its slot by index (the Punica / S-LoRA idea).

Why not PEFT adapter names: on a `torch.compile`d model, PEFT's `set_adapter` and mixed
`adapter_names` batches recompile for every new adapter name and every new mix. Here the slot
index is a tensor input, so one graph serves every slot and every mix of slots, and a swap is an
in-place copy into one slot's rows (PEFT's hotswap semantics, for N slots at once).

Layout per target layer (scaling folded into B when an adapter is prepared):
    lora_a: [slots, max_rank, in_features]
    lora_b: [slots, max_rank, out_features]     (PEFT's lora_B transposed, times scaling)
    delta(x_row) = (x_row @ lora_a[slot].T) @ lora_b[slot]
Slot 0 is all zeros forever: the base model, PEFT's `disable_adapter`. A rank-r adapter fills
rows [:r] of its slot; rows [r:] are zero, so smaller ranks are zero-padded.

The delta is computed without gathering each row's weights (a gather per layer per step moved
up to 4.7 MB per layer at 64 rows on SmolLM2, 3.5 ms against a 0.43 ms base matmul). An eager
forward of many tokens per row (a prefill chunk: few rows; `loop_rows`) loops over its rows, each a plain
`x[row] @ lora_a[slot].T @ lora_b[slot]`: 0.6 ms for 3 rows of 94 tokens on a 576x1536 layer
with 9 slots of rank 16 at one thread, against 8.3 ms dense and 6.4 ms grouped (which compute
every slot for every token, or sort the tokens); never in a compiled region, where the loop
would be traced once per mix of slots. Any other forward (a decode step, maybe compiled) uses one
of two ways chosen by the width
`slots * max_rank` (measured on 2 CPU cores, SmolLM2 q_proj):
  - "dense" (width <= 256): every slot's low-rank projection at once, `x @ lora_a.view(-1, in).T`,
    times a per-row mask that keeps the row's own slot's `max_rank` columns, then `@ lora_b`:
    two plain matmuls, no data-dependent shapes (0.28 ms at 64 rows, 9 slots);
  - "grouped" (wider): tokens sorted by slot once per forward, `torch._grouped_mm` over the
    slots' weights (views, no copy), unsorted back (0.32 ms at 64 rows, 9 slots; it wins from
    about 17 slots of rank 16, where the dense product grows with every slot).
A forward whose rows are all on the base model skips the delta.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from deployments.contracts import CombinationKind
from lora_core.checkpoint import LoraCheckpoint, validate_checkpoint
from lora_core.fingerprint import Fingerprint, fingerprint, matches, tolerance_for
from lora_core.geometry import SlotGeometry

DENSE_MAX_WIDTH = 256
"""Above this many `slots * max_rank` columns the grouped kernel is faster (measured)."""

LoraKernel = Literal["auto", "dense", "grouped"]


class SlotContext:
    """Each row's slot for the next forward, and what the kernels need from it, computed once per
    forward (in `set`, outside any compiled region) rather than once per layer. Shared by every
    slot layer; a compiled forward reads these tensors as inputs."""

    def __init__(self, total_slots: int, max_rank: int, kernel: str) -> None:
        self.total_slots = total_slots
        self.max_rank = max_rank
        self.kernel = kernel
        self.slot_ids: torch.Tensor | None = None  # [batch] int64
        self.any_adapter = True
        self.row_slots: list[int] | None = None  # an eager prefill: each row's slot, looped over
        self.mask: torch.Tensor | None = None  # dense: [batch, 1, slots * max_rank]
        self.order: torch.Tensor | None = None  # grouped: the [batch * tokens] positions by slot,
        self.inverse: torch.Tensor | None = None  # back,
        self.group_ends: torch.Tensor | None = None  # and where each slot's group ends

    def set(self, slot_ids: torch.Tensor, tokens_per_row: int, dtype: torch.dtype, loop_rows: bool = False) -> None:
        self.slot_ids = slot_ids
        self.any_adapter = bool((slot_ids != 0).any())
        self.row_slots = slot_ids.tolist() if loop_rows else None
        if self.row_slots is not None:
            return
        if self.kernel == "dense":
            one_hot = torch.nn.functional.one_hot(slot_ids, self.total_slots).to(dtype)
            self.mask = one_hot.repeat_interleave(self.max_rank, dim=1).unsqueeze(1)
        else:
            token_slots = slot_ids.repeat_interleave(tokens_per_row)
            self.order = torch.argsort(token_slots, stable=True)
            self.inverse = torch.argsort(self.order)
            self.group_ends = torch.cumsum(torch.bincount(token_slots, minlength=self.total_slots), 0).to(torch.int32)


class SlotLoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, context: SlotContext, total_slots: int, max_rank: int) -> None:
        super().__init__()
        self.base = base
        self.context = context
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.register_buffer("lora_a", torch.zeros(total_slots, max_rank, base.in_features, **factory))
        self.register_buffer("lora_b", torch.zeros(total_slots, max_rank, base.out_features, **factory))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [batch, tokens, in_features]
        out = self.base(x)
        context = self.context
        if not context.any_adapter:
            return out
        if context.row_slots is not None:
            for row, slot in enumerate(context.row_slots):
                if slot:
                    out[row].addmm_(torch.matmul(x[row], self.lora_a[slot].t()), self.lora_b[slot])
            return out
        if context.kernel == "dense":
            low_rank = torch.matmul(x, self.lora_a.view(-1, self.lora_a.shape[-1]).t())  # [batch, tokens, slots * r]
            return out + torch.matmul(low_rank * context.mask, self.lora_b.view(-1, self.lora_b.shape[-1]))
        batch, tokens, in_features = x.shape
        flat = x.reshape(batch * tokens, in_features).index_select(0, context.order)
        low_rank = torch._grouped_mm(flat, self.lora_a.transpose(1, 2), offs=context.group_ends)  # [batch * tokens, r]
        delta = torch._grouped_mm(low_rank, self.lora_b, offs=context.group_ends).index_select(0, context.inverse)
        return out + delta.view(batch, tokens, -1)


@dataclass(frozen=True)
class PreparedAdapter:
    """An adapter laid out for a slot: per slot layer, A [r, in] and scaled B^T [r, out], or rank 0.

    Built once (host side, target dtype, pinned on CUDA) so that a swap is only copies.
    """

    ranks: tuple[int, ...]
    lora_a: tuple[torch.Tensor | None, ...]
    lora_b: tuple[torch.Tensor | None, ...]
    size_bytes: int
    expected: Fingerprint
    """What its slot must hold once written (`lora_core.fingerprint`): the store's numbers when it
    sent them, else computed from the checkpoint here."""
    combination: CombinationKind | None = None
    """Set for a per-request combination's derived adapter: how it was built."""


class SlotLoraModel:
    """Injects `SlotLoraLinear` into a causal LM's target modules and swaps adapters into slots."""

    def __init__(
        self,
        model: nn.Module,
        target_modules: tuple[str, ...],
        num_slots: int,
        max_rank: int,
        base_model_names: frozenset[str] = frozenset(),
        max_adapter_bytes: int | None = None,
        kernel: LoraKernel = "auto",
    ) -> None:
        self.model = model
        if kernel == "auto":
            kernel = "dense" if (num_slots + 1) * max_rank <= DENSE_MAX_WIDTH else "grouped"
        self.kernel = kernel
        self.context = SlotContext(num_slots + 1, max_rank, kernel)
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.layers: dict[str, SlotLoraLinear] = {}
        if any(isinstance(module, SlotLoraLinear) for module in model.modules()):
            raise ValueError("this model already has slot LoRA layers: give each engine a freshly loaded base model")
        targets = set(target_modules)
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
                layer = SlotLoraLinear(module, self.context, num_slots + 1, max_rank)
                model.set_submodule(name, layer)
                self.layers[name] = layer
        found = {name.rsplit(".", 1)[-1] for name in self.layers}
        if missing := targets - found:
            raise ValueError(f"target modules {sorted(missing)} are not Linear layers of the base model")
        shapes = {name: (layer.base.in_features, layer.base.out_features) for name, layer in self.layers.items()}
        geometry = {"max_rank": max_rank, "module_shapes": shapes, "base_model_names": base_model_names}
        if max_adapter_bytes is not None:
            geometry["max_size_bytes"] = max_adapter_bytes
        self.geometry = SlotGeometry(**geometry)
        self._slot_ranks: list[tuple[int, ...]] = [(0,) * len(self.layers) for _ in range(num_slots + 1)]
        self._views: OrderedDict[tuple[int, tuple[int, ...]], tuple[list, list]] = OrderedDict()
        sample = next(iter(self.layers.values())).lora_a
        self.dtype, self.device = sample.dtype, sample.device

    def prepare(self, checkpoint: LoraCheckpoint, check_values: bool = True) -> PreparedAdapter:
        """Validate against the slot geometry, then lay the weights out for a swap."""
        validate_checkpoint(checkpoint, self.geometry, check_values=check_values)
        pin = self.device.type == "cuda"
        ranks, lora_a, lora_b, size_bytes = [], [], [], 0
        for name in self.layers:
            weights = checkpoint.modules.get(name)
            if weights is None:
                ranks.append(0)
                lora_a.append(None)
                lora_b.append(None)
                continue
            a = weights.lora_a.to(dtype=self.dtype).contiguous()
            b = (weights.lora_b.to(torch.float32) * weights.scaling).t().to(dtype=self.dtype).contiguous()
            if pin:
                a, b = a.pin_memory(), b.pin_memory()
            ranks.append(weights.rank)
            lora_a.append(a)
            lora_b.append(b)
            size_bytes += a.numel() * a.element_size() + b.numel() * b.element_size()
        expected = checkpoint.fingerprint if checkpoint.fingerprint is not None else fingerprint(checkpoint)
        return PreparedAdapter(tuple(ranks), tuple(lora_a), tuple(lora_b), size_bytes, expected)

    def check_slot(self, slot: int, adapter: PreparedAdapter) -> str | None:
        """None when the slot holds exactly `adapter` (every row, the zero padding, the modules it
        does not target, the scaling), within the slot dtype's rounding; else what differs."""
        self._check_slot(slot)
        expected = {name: adapter.expected.get(name, (0.0, 0.0)) for name in self.layers}
        rows = [t for layer in self.layers.values() for t in (layer.lora_a[slot], layer.lora_b[slot])]
        with torch.no_grad():
            norms = torch.stack(torch._foreach_norm(rows, 2)).double().tolist()
        got = {name: (norms[2 * i], norms[2 * i + 1]) for i, name in enumerate(self.layers)}
        return matches(expected, got, tolerance_for(self.dtype))

    def write_slot(self, slot: int, adapter: PreparedAdapter) -> float:
        """Copy a prepared adapter into a slot in place; returns the swap time in ms.

        Rows beyond the new rank are zeroed only where the previous occupant used them.
        """
        self._check_slot(slot)
        start = time.perf_counter()
        destinations, tails = self._slot_views(slot, adapter.ranks)
        sources = [t for pair in zip(adapter.lora_a, adapter.lora_b) for t in pair if t is not None]
        with torch.no_grad():
            torch._foreach_copy_(destinations, sources, non_blocking=True)
            previous = self._slot_ranks[slot]
            if any(old > new for old, new in zip(previous, adapter.ranks)):
                torch._foreach_zero_(tails)
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
        self._slot_ranks[slot] = adapter.ranks
        return (time.perf_counter() - start) * 1000

    def clear_slot(self, slot: int) -> None:
        self._check_slot(slot)
        with torch.no_grad():
            for layer in self.layers.values():
                layer.lora_a[slot].zero_()
                layer.lora_b[slot].zero_()
        self._slot_ranks[slot] = (0,) * len(self.layers)

    def set_slot_ids(self, slot_ids: torch.Tensor, tokens_per_row: int = 1, loop_rows: bool = False) -> None:
        """Each batch row's slot for the next forward (0: the base model), whose inputs have
        `tokens_per_row` tokens per row. Call it outside a compiled region. `loop_rows` only for
        an eager forward of many tokens per row (module docstring)."""
        self.context.set(slot_ids.to(self.device), tokens_per_row, self.dtype, loop_rows)

    def _check_slot(self, slot: int) -> None:
        if not 1 <= slot <= self.num_slots:
            raise ValueError(f"slot {slot} is not an adapter slot (1..{self.num_slots}; slot 0 is the base model)")

    def _slot_views(self, slot: int, ranks: tuple[int, ...]) -> tuple[list, list]:
        """Destination views for a rank layout, and the zero-padding tails, cached per (slot, ranks)."""
        key = (slot, ranks)
        cached = self._views.get(key)
        if cached is not None:
            self._views.move_to_end(key)
            return cached
        destinations, tails = [], []
        for layer, rank in zip(self.layers.values(), ranks):
            if rank:
                destinations += [layer.lora_a[slot, :rank], layer.lora_b[slot, :rank]]
            if rank < self.max_rank:
                tails += [layer.lora_a[slot, rank:], layer.lora_b[slot, rank:]]
        self._views[key] = (destinations, tails)
        if len(self._views) > 4 * (self.num_slots + 1) * self.max_rank:
            self._views.popitem(last=False)
        return destinations, tails
