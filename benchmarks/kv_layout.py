"""Why the KV cache is per-row lanes and not paged blocks, on this machine: one decode step's
attention over SmolLM2's 30 layers (3 KV heads of 64, 9 query heads) read as lane views versus
gathered from a pool of 16-token blocks (what a paged cache does on CPU without a paged-attention
kernel: an `index_select` of every row's blocks, keys and values, per layer per step).

    python -m benchmarks.kv_layout [--quick] [--threads N]

Prints ONE JSON line last: per (rows, context), the step's attention time both ways and the ratio.
"""

from __future__ import annotations

import sys
import time

from benchmarks import common
from benchmarks.common import log, rounded

__all__ = ["main"]

LAYERS, KV_HEADS, QUERY_HEADS, HEAD_DIM, LANE_POSITIONS, BLOCK_TOKENS = 30, 3, 9, 64, 513, 16
SHAPES = ((16, 128), (32, 256), (64, 128), (64, 256))


def _step_ms(step, repeats: int) -> float:
    step()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        samples.append((time.perf_counter() - started) * 1000)
    return common.median(samples)


def measure(rows: int, context: int, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(rows * 1000 + context)
    lane_keys = [torch.randn(rows, KV_HEADS, LANE_POSITIONS, HEAD_DIM, generator=generator) for _ in range(LAYERS)]
    lane_values = [torch.randn_like(k) for k in lane_keys]
    blocks = rows * context // BLOCK_TOKENS
    pool_keys = [torch.randn(2 * blocks, KV_HEADS, BLOCK_TOKENS, HEAD_DIM, generator=generator) for _ in range(LAYERS)]
    pool_values = [torch.randn_like(k) for k in pool_keys]
    table = torch.randperm(2 * blocks, generator=generator)[:blocks]  # each row's blocks, scattered in the pool
    query = torch.randn(rows, QUERY_HEADS, 1, HEAD_DIM, generator=generator)

    def gathered(pool):
        return (pool.index_select(0, table).view(rows, context // BLOCK_TOKENS, KV_HEADS, BLOCK_TOKENS, HEAD_DIM)
                .transpose(1, 2).reshape(rows, KV_HEADS, context, HEAD_DIM))

    def lanes():
        for layer in range(LAYERS):
            F.scaled_dot_product_attention(query, lane_keys[layer][:, :, :context], lane_values[layer][:, :, :context],
                                           enable_gqa=True)

    def paged():
        for layer in range(LAYERS):
            F.scaled_dot_product_attention(query, gathered(pool_keys[layer]), gathered(pool_values[layer]), enable_gqa=True)

    with torch.no_grad():
        lanes_ms, paged_ms = _step_ms(lanes, repeats), _step_ms(paged, repeats)
    log(f"rows {rows}, context {context}: lanes {lanes_ms:.1f} ms, paged blocks {paged_ms:.1f} ms per step")
    return {"rows": rows, "context": context, "lanes_ms": rounded(lanes_ms, 2), "paged_ms": rounded(paged_ms, 2),
            "paged_vs_lanes": rounded(paged_ms / lanes_ms, 3)}


def main(argv: list[str] | None = None) -> dict:
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    started = time.perf_counter()
    info = common.setup(args)
    repeats = 5 if args.quick else 15
    results = [measure(rows, context, repeats) for rows, context in SHAPES]
    return common.emit(info, {"block_tokens": BLOCK_TOKENS, "layers": LAYERS, "steps": results,
                              "lanes_faster_everywhere": all(r["paged_vs_lanes"] > 1 for r in results)}, started)


if __name__ == "__main__":
    main()
    sys.exit(0)
