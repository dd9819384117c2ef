"""The lane KV cache: buckets, sizes, packing moves, and writes that never touch another lane."""

from __future__ import annotations

import pytest
import torch

from deployments.engine.kv_cache import LaneKVCache, context_bucket


@pytest.mark.parametrize(("length", "limit", "bucket"), [(1, 512, 32), (32, 512, 32), (33, 512, 64), (130, 512, 256),
                                                        (511, 512, 512), (600, 512, 512), (40, 48, 48)])
def test_context_is_bucketed_to_powers_of_two_from_32(length, limit, bucket):
    assert context_bucket(length, limit) == bucket


def make(lanes=3, max_len=8):
    return LaneKVCache(num_layers=2, kv_heads=2, head_dim=4, max_seq_len=max_len, lanes=lanes,
                       dtype=torch.float32, device="cpu")


def test_size_is_what_lane_bytes_says():
    cache = make()
    assert cache.size_bytes == 3 * LaneKVCache.lane_bytes(2, 2, 4, 8, torch.float32)
    assert cache.keys[0].shape == (3, 2, 9, 4)  # one scratch position past max_seq_len


def test_a_view_writes_each_row_at_its_positions_and_padding_at_scratch():
    cache = make()
    positions = torch.tensor([[0, 1], [5, cache.scratch_position]])  # row 1: one real token, one pad
    view = cache.view(first=1, positions=positions, context_len=6)
    keys = torch.arange(2 * 2 * 2 * 4, dtype=torch.float32).view(2, 2, 2, 4) + 1
    out_keys, _ = view.update(keys, keys * 10, layer_idx=0)
    assert out_keys.shape == (2, 2, 6, 4)  # attends over the context bucket only
    lane1, lane2 = cache.keys[0][1], cache.keys[0][2]
    assert torch.equal(lane1[:, 0], keys[0, :, 0]) and torch.equal(lane1[:, 1], keys[0, :, 1])
    assert torch.equal(lane2[:, 5], keys[1, :, 0])
    assert torch.equal(lane2[:, cache.scratch_position], keys[1, :, 1])  # the pad went to scratch
    assert not cache.keys[0][0].any()  # lane 0 was not in the view
    assert torch.equal(cache.values[0][1][:, 0], keys[0, :, 0] * 10)


def test_move_copies_only_the_positions_in_use():
    cache = make()
    for tensor in (*cache.keys, *cache.values):
        tensor[2].fill_(7.0)
        tensor[0].fill_(-1.0)
    cache.move(source=2, destination=0, length=3)
    for tensor in (*cache.keys, *cache.values):
        assert (tensor[0, :, :3] == 7.0).all() and (tensor[0, :, 3:] == -1.0).all()


def test_a_cache_needs_a_lane():
    with pytest.raises(ValueError):
        make(lanes=0)
