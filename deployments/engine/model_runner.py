"""The model's forward over lanes of the KV cache: a prefill chunk for newcomers, or one decode
step for every running sequence, each row on its own adapter slot.

One call runs the transformer (`model.model`) on `[rows, tokens]` with, per row, its positions
(for RoPE and for where its keys and values go), a 4D causal mask over the attended context
(`[rows, 1, tokens, context]`: a key is visible to a query when its position is at most the
query's), and its slot. The LM head runs only on the position each row needs next (its last real
token), not on every prompt token. Padding rows and tokens write to the cache's scratch position
and see only position 0, so they cost a little compute and touch no sequence.

The decode step can be compiled (`compile_decode`): its shapes are bucketed (rows to a power of
two, context to `kv_cache.context_bucket`), slot ids and positions are tensor inputs, so joins,
leaves, swaps and new mixes of adapters reuse the graphs `warm_up` built. Prefill runs eagerly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from deployments.engine.kv_cache import LaneKVCache, context_bucket

__all__ = ["ForwardBatch", "ModelRunner", "row_buckets"]


def row_buckets(max_rows: int) -> tuple[int, ...]:
    """Padded row counts of a compiled decode step: powers of two from 2 (a batch of one would be
    its own graph) up to `max_rows`."""
    sizes, size = [], 2
    while size < max_rows:
        sizes.append(size)
        size *= 2
    sizes.append(max(2, max_rows))
    return tuple(sizes)


class ForwardBatch:
    """The inputs of one forward, built by the scheduler row by row; padding fills the rest."""

    def __init__(self, rows: int, tokens: int, pad_id: int, scratch_position: int) -> None:
        self.token_ids = torch.full((rows, tokens), pad_id, dtype=torch.long)
        self.positions = torch.zeros((rows, tokens), dtype=torch.long)
        self.write_positions = torch.full((rows, tokens), scratch_position, dtype=torch.long)
        self.last_index = torch.zeros(rows, dtype=torch.long)
        self.slot_ids = torch.zeros(rows, dtype=torch.long)
        self.context = 1

    def set_row(self, row: int, token_ids: list[int], start: int, slot: int) -> None:
        """Row `row` feeds `token_ids` at positions `start, start + 1, ...` on `slot`."""
        count = len(token_ids)
        positions = torch.arange(start, start + count)
        self.token_ids[row, :count] = torch.tensor(token_ids, dtype=torch.long)
        self.positions[row, :count] = positions
        self.write_positions[row, :count] = positions
        self.last_index[row] = count - 1
        self.slot_ids[row] = slot
        self.context = max(self.context, start + count)


class ModelRunner:
    def __init__(
        self,
        model,
        set_slot_ids: Callable[[torch.Tensor, int, bool], None],
        kv_cache: LaneKVCache,
        compile_decode: bool,
        compile_mode: str = "default",
        max_rows: int = 1,
    ) -> None:
        self.backbone = model.model
        self.lm_head = model.lm_head
        self.set_slot_ids = set_slot_ids
        self.kv_cache = kv_cache
        self.device = next(model.parameters()).device
        self.compiled = compile_decode
        self.buckets = row_buckets(max_rows)
        self._decode = torch.compile(self._forward, dynamic=False, mode=compile_mode) if compile_decode else self._forward

    def batch(self, rows: int, tokens: int, pad_id: int) -> ForwardBatch:
        """An empty batch of `rows` rows (padded to a bucket for a compiled decode step)."""
        if self.compiled and tokens == 1:
            rows = next((size for size in self.buckets if rows <= size), rows)
        return ForwardBatch(rows, tokens, pad_id, self.kv_cache.scratch_position)

    def run(self, first_lane: int, batch: ForwardBatch) -> torch.Tensor:
        """Logits [rows, vocab] at each row's last fed token; rows use lanes from `first_lane` on."""
        context = context_bucket(batch.context, self.kv_cache.max_seq_len)
        tokens = batch.token_ids.shape[1]
        forward = self._decode if tokens == 1 and first_lane == 0 else self._forward
        device = self.device
        prefill = tokens > 1  # always eager, so its LoRA may loop over rows
        self.set_slot_ids(batch.slot_ids, tokens, prefill)  # here: a compiled region must not branch on it
        return forward(
            batch.token_ids.to(device),
            batch.positions.to(device),
            batch.write_positions.to(device),
            batch.last_index.to(device),
            first_lane,
            context,
        )

    def warm_up(self, pad_id: int) -> None:
        """Compile the decode graph of every (rows, context) bucket now, not on a user's request."""
        if not self.compiled:
            return
        contexts = sorted({context_bucket(length, self.kv_cache.max_seq_len) for length in
                           _powers_of_two(self.kv_cache.max_seq_len)})
        for rows in self.buckets:
            for context in contexts:
                for on_adapter in (False, True):  # a step with no adapter row skips the LoRA delta
                    batch = self.batch(rows, 1, pad_id)
                    batch.context = context
                    batch.slot_ids[0] = int(on_adapter)
                    self.run(0, batch)

    def _forward(self, token_ids, positions, write_positions, last_index, first_lane: int, context: int):
        keys = torch.arange(context, device=token_ids.device)
        mask = (keys.view(1, 1, 1, context) <= positions.unsqueeze(1).unsqueeze(-1))  # [rows, 1, tokens, context]
        view = self.kv_cache.view(first_lane, write_positions, context)
        hidden = self.backbone(
            input_ids=token_ids, position_ids=positions, attention_mask=mask, past_key_values=view, use_cache=True
        ).last_hidden_state
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_index]  # [rows, hidden]
        return self.lm_head(last)


def _powers_of_two(limit: int) -> list[int]:
    values, value = [], 1
    while value <= limit:
        values.append(value)
        value *= 2
    return values + [limit]
