"""The KV cache of a continuous batch: one lane per running sequence, sized by a byte budget.

Layout per decoder layer (keys and values alike):
    [lanes, kv_heads, max_seq_len + 1, head_dim]
A sequence owns one lane for its whole life; its token at position p sits at index p. The extra
last position is a scratch row: padded batch rows write there, so they never touch a real
sequence. A forward over `n` sequences uses lanes `[first, first + n)` as views (no gather) and
attends over `[:context_len]` only, where `context_len` is the batch's longest context rounded up
to a bucket: a step costs what the rows' contexts cost, not what `max_seq_len` would.

Lanes are kept packed by the scheduler (`move`): decoding sequences first, then the ones being
prefilled, then the free lanes. The lane count is `min(max_num_seqs, kv_cache_bytes // lane_bytes)`:
when every lane is taken, new requests wait.

Per-row lanes rather than paged blocks, by measurement (`python -m benchmarks.kv_layout`): on CPU,
without a paged-attention kernel, attention over 16-token blocks pays a gather of every key and
value per layer per step, 1.8-4.7x the attention time of lane views at 16-64 rows (BENCHMARKS.md).
What lanes lose is memory (a lane is reserved for `max_seq_len` tokens), which the byte budget bounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LaneKVCache", "LaneView", "context_bucket"]

MIN_CONTEXT_BUCKET = 32


def context_bucket(length: int, max_len: int) -> int:
    """The attended length for a batch whose longest context is `length`: the next power of two
    from 32, capped at `max_len` (few shapes, so few compiled graphs)."""
    bucket = MIN_CONTEXT_BUCKET
    while bucket < length:
        bucket *= 2
    return min(bucket, max_len)


@dataclass
class LaneView:
    """What one forward writes and reads: duck-types transformers' `Cache.update` for the
    attention layers, which call `update(keys, values, layer_idx)` and attend over the result."""

    cache: "LaneKVCache"
    first: int
    count: int
    write_index: torch.Tensor  # [count, kv_heads, tokens, head_dim] positions to write, expanded
    context_len: int

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        lanes = slice(self.first, self.first + self.count)
        cached_keys = self.cache.keys[layer_idx][lanes]  # [count, kv_heads, max_len + 1, head_dim]
        cached_values = self.cache.values[layer_idx][lanes]
        cached_keys.scatter_(2, self.write_index, keys.to(cached_keys.dtype))
        cached_values.scatter_(2, self.write_index, values.to(cached_values.dtype))
        return cached_keys[:, :, : self.context_len], cached_values[:, :, : self.context_len]


class LaneKVCache:
    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        max_seq_len: int,
        lanes: int,
        dtype: torch.dtype,
        device: str | torch.device,
    ) -> None:
        if lanes < 1:
            raise ValueError("the KV cache needs at least one lane")
        self.max_seq_len = max_seq_len
        self.scratch_position = max_seq_len
        self.lanes = lanes
        self.kv_heads, self.head_dim = kv_heads, head_dim
        shape = (lanes, kv_heads, max_seq_len + 1, head_dim)  # [lanes, kv_heads, positions, head_dim]
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.device = torch.device(device)

    @staticmethod
    def lane_bytes(num_layers: int, kv_heads: int, head_dim: int, max_seq_len: int, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * kv_heads * (max_seq_len + 1) * head_dim * element

    @property
    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def view(self, first: int, positions: torch.Tensor, context_len: int) -> LaneView:
        """A forward's view of lanes `[first, first + rows)`; `positions` [rows, tokens] says where
        each row's tokens go (the scratch position for padding)."""
        rows, tokens = positions.shape
        index = positions.to(self.device).view(rows, 1, tokens, 1).expand(rows, self.kv_heads, tokens, self.head_dim)
        return LaneView(self, first, rows, index, context_len)

    def move(self, source: int, destination: int, length: int) -> None:
        """Copy a sequence's first `length` positions from one lane to another (packing lanes)."""
        if source == destination or length <= 0:
            return
        with torch.no_grad():
            for tensor in (*self.keys, *self.values):
                tensor[destination, :, :length].copy_(tensor[source, :, :length])
