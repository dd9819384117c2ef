"""Swap latency: adapters copied into the slots of a compiled model, vs the memcpy floor and PEFT.

    python -m benchmarks.swap [--quick] [--device cpu|cuda] [--model smollm2|llama-1b|tiny]

Setup: `SlotLoraModel` with `--slots` slots of max_rank 16 on q,k,v,o; `--adapters` synthetic
adapters with ranks 4-16, prepared once (`SlotLoraModel.prepare`: validated, laid out, pinned on
CUDA, as the engine's host cache holds them). A forward through the slot layers is compiled
(`torch.compile(dynamic=False)`) and warmed up with every slot filled.

Loop (`--swaps` times): a random adapter into a random slot with `write_slot` (its own timer:
view lookup + `_foreach_copy_` + tail zeroing + CUDA sync); then, for the same adapter, the
memcpy floor: `torch._foreach_copy_` of its tensors into preallocated tensors of the same
shapes (one set per slot, like the slots themselves). Every `--forward-every` swaps the compiled
forward runs on a random mix of slots, so the graph keeps serving while weights change under it;
at the end its logits are checked against the eager model on the same slot state.

PEFT (same run, same adapters, `--peft-swaps` times): a PeftModel with r=16 on the same
targets, `prepare_model_for_compiled_hotswap(target_rank=16)`, `torch.compile`d, then
`hotswap_adapter_from_state_dict` with PEFT's internal key names
(`_insert_adapter_name_into_state_dict`); its inputs are host tensors in the model dtype (pinned
on CUDA), as ours are. In full runs its compiled forward also runs before and after the swaps.

Validation: after each swap, the check a replica runs when a version first lands in a slot
(`check_slot`: the slot rows' sums against the adapter's fingerprint), timed on its own
(`check_p50_ms`); every one must pass, since the copies are intact (`check_failures`).

Recompiles: graphs dynamo compiled after warm-up (`counters["stats"]["unique_graphs"]`), with
`error_on_recompile` left off so a recompile is counted and reported rather than aborting.
"""

from __future__ import annotations

import random
import sys
import time

import torch  # noqa: E402  (common sets the environment first)

from benchmarks import common
from benchmarks.common import log, percentile, rounded, synchronize

BATCH, SEQ_LEN = 4, 16


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--swaps", type=int, default=None, help="default: 1000 (--quick: 200)")
    p.add_argument("--peft-swaps", type=int, default=None, help="default: 200 (--quick: 30)")
    p.add_argument("--adapters", type=int, default=32, help="distinct prepared adapters swapped in")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--forward-every", type=int, default=10)
    p.add_argument("--compile", choices=("on", "off"), default="on")
    p.add_argument(
        "--peft-forward",
        choices=("auto", "on", "off"),
        default="auto",
        help="run PEFT's compiled forward too (auto: off with --quick on CPU, where it costs a 20-60 s compile)",
    )
    args = p.parse_args(argv)
    started = time.perf_counter()
    info = common.setup(args)
    swaps = args.swaps or (200 if args.quick else 1000)
    peft_swaps = args.peft_swaps if args.peft_swaps is not None else (30 if args.quick else 200)
    peft_forward = args.peft_forward == "on" or (
        args.peft_forward == "auto" and args.compile == "on" and not (args.quick and info.device == "cpu")
    )
    device, rng = info.device, random.Random(args.seed)

    from deployments.engine.slot_lora import SlotLoraModel
    from lora_core.checkpoint import checkpoint_from_state_dict

    base = common.load_base(args.model, device, info.dtype)
    log(f"loaded {base.name} in {time.perf_counter() - started:.1f} s")
    peft_base = common.clone_model(base.model)
    model = base.model
    shapes = common.target_shapes(model)
    slot_model = SlotLoraModel(model, common.TARGET_MODULES, args.slots, common.MAX_RANK)

    ranks = common.mixed_ranks(args.adapters, args.seed)
    adapters = [common.make_adapter(shapes, rank, seed=args.seed * 1000 + i) for i, rank in enumerate(ranks)]
    checkpoints = [checkpoint_from_state_dict(a.config, a.state_dict) for a in adapters]
    prepare_ms, prepared = [], []
    for checkpoint in checkpoints:
        t0 = time.perf_counter()
        prepared.append(slot_model.prepare(checkpoint))
        prepare_ms.append((time.perf_counter() - t0) * 1000)
    r16 = next(a for a in prepared if max(a.ranks) == common.MAX_RANK)
    log(
        f"{len(prepared)} adapters, ranks {sorted(set(ranks))}, {len(shapes)} target layers, "
        f"r=16 adapter {r16.size_bytes / 1e6:.2f} MB in {2 * len(shapes)} tensors; prepare p50 "
        f"{percentile(prepare_ms, 50):.2f} ms"
    )
    for slot in range(1, args.slots + 1):
        slot_model.write_slot(slot, prepared[slot % len(prepared)])

    # The compiled forward through the slot layers (one graph: fixed batch and length). The slot
    # ids are set outside it, as the engine does: the slot layers read them as inputs.
    def last_logits(input_ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=input_ids, use_cache=False, logits_to_keep=1).logits[:, -1, :]

    compiled_logits = torch.compile(last_logits, dynamic=False) if args.compile == "on" else last_logits

    def compiled(input_ids: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
        slot_model.set_slot_ids(slot_ids, input_ids.shape[1])
        return compiled_logits(input_ids)

    def forward(input_ids: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
        slot_model.set_slot_ids(slot_ids, input_ids.shape[1])
        return last_logits(input_ids)
    vocab = min(model.config.vocab_size, len(base.tokenizer))
    input_ids = torch.randint(0, vocab, (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(args.seed)).to(device)

    def random_slot_ids() -> torch.Tensor:
        return torch.tensor([rng.randint(0, args.slots) for _ in range(BATCH)], device=device)

    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(2):
            compiled(input_ids, random_slot_ids())
    synchronize(device)
    warmup_s = time.perf_counter() - t0
    log(f"compile={args.compile}: warm-up forward {warmup_s:.1f} s")

    # Memcpy floor destinations: per slot, max-rank buffers; views of each rank built up front.
    floor_buffers = [
        [torch.empty_like(layer.lora_a[0]) for layer in slot_model.layers.values()]
        + [torch.empty_like(layer.lora_b[0]) for layer in slot_model.layers.values()]
        for _ in range(args.slots + 1)
    ]
    layers = len(slot_model.layers)
    floor_views: dict[tuple[int, tuple[int, ...]], list[torch.Tensor]] = {}

    def floor_destinations(slot: int, adapter) -> list[torch.Tensor]:
        key = (slot, adapter.ranks)
        if key not in floor_views:
            buffers = floor_buffers[slot]
            floor_views[key] = [
                view
                for i, rank in enumerate(adapter.ranks)
                if rank
                for view in (buffers[i][:rank], buffers[layers + i][:rank])
            ]
        return floor_views[key]

    def sources(adapter) -> list[torch.Tensor]:
        return [t for pair in zip(adapter.lora_a, adapter.lora_b) for t in pair if t is not None]

    plan = [(rng.randint(1, args.slots), rng.randrange(len(prepared))) for _ in range(swaps)]
    for slot, index in plan:  # build the floor's views outside the timed loop
        floor_destinations(slot, prepared[index])
    adapter_sources = [sources(a) for a in prepared]

    order_rng = random.Random(args.seed + 1)
    graphs_before = common.graphs_compiled()
    swap_ms, floor_ms, forward_ms, forwards = [], [], [], 0
    check_ms, check_failures = [], []

    def timed_check(slot: int, adapter) -> float:
        """The check a replica runs when a version first lands (`SlotLoraModel.check_slot`)."""
        t0 = time.perf_counter()
        problem = slot_model.check_slot(slot, adapter)
        synchronize(device)
        if problem is not None:
            check_failures.append(problem)
        return (time.perf_counter() - t0) * 1000

    t_loop = time.perf_counter()
    with torch.no_grad():
        for i, (slot, index) in enumerate(plan):
            adapter = prepared[index]
            destinations, srcs = floor_destinations(slot, adapter), adapter_sources[index]
            # Paired, in random order: whichever runs second finds the sources in cache.
            floor_first = order_rng.random() < 0.5
            if not floor_first:
                swap_ms.append(slot_model.write_slot(slot, adapter))
                check_ms.append(timed_check(slot, adapter))
            synchronize(device)
            t0 = time.perf_counter()
            torch._foreach_copy_(destinations, srcs, non_blocking=True)
            synchronize(device)
            floor_ms.append((time.perf_counter() - t0) * 1000)
            if floor_first:
                swap_ms.append(slot_model.write_slot(slot, adapter))
                check_ms.append(timed_check(slot, adapter))
            if (i + 1) % args.forward_every == 0:
                t0 = time.perf_counter()
                logits = compiled(input_ids, random_slot_ids())
                synchronize(device)
                forward_ms.append((time.perf_counter() - t0) * 1000)
                if not bool(torch.isfinite(logits).all()):
                    raise RuntimeError("the compiled forward returned non-finite logits after a swap")
                forwards += 1
    synchronize(device)
    loop_s = time.perf_counter() - t_loop
    recompiles = common.graphs_compiled() - graphs_before
    log(f"{swaps} swaps + {forwards} compiled forwards in {loop_s:.1f} s; graphs compiled during the loop: {recompiles}")

    # The graph still reads the live slot weights: compiled == eager on the final slot state.
    with torch.no_grad():
        slot_ids = torch.arange(0, BATCH, device=device) % (args.slots + 1)
        slot_ids[0] = plan[-1][0]
        got = compiled(input_ids, slot_ids).float()
        want = forward(input_ids, slot_ids).float()
    compiled_max_abs_diff = float((got - want).abs().max())
    tolerance = 1e-3 if info.dtype == torch.float32 else 5e-2 * float(want.abs().max())
    recompiles = common.graphs_compiled() - graphs_before  # the check's call counts too

    peft = run_peft(peft_base, adapters, shapes, peft_swaps, peft_forward, input_ids, device, info.dtype, rng)

    swap_p50, floor_p50 = percentile(swap_ms, 50), percentile(floor_ms, 50)
    results = {
        "compile": args.compile,
        "slots": args.slots,
        "max_rank": common.MAX_RANK,
        "target_modules": list(common.TARGET_MODULES),
        "target_layers": len(shapes),
        "adapters": len(prepared),
        "adapter_ranks": sorted(set(ranks)),
        "r16_adapter_bytes": r16.size_bytes,
        "swaps": swaps,
        "swap_p50_ms": rounded(swap_p50),
        "swap_p99_ms": rounded(percentile(swap_ms, 99)),
        "swap_mean_ms": rounded(sum(swap_ms) / len(swap_ms)),
        "prepare_p50_ms": rounded(percentile(prepare_ms, 50)),
        "check_p50_ms": rounded(percentile(check_ms, 50)),
        "check_failures": len(check_failures),
        "validated_swap_vs_floor": rounded((swap_p50 + percentile(check_ms, 50)) / floor_p50, 2),
        "memcpy_floor_ms": rounded(floor_p50),
        "memcpy_floor_p99_ms": rounded(percentile(floor_ms, 99)),
        "peft_hotswap_p50_ms": rounded(peft["p50_ms"]),
        "peft_hotswap_p99_ms": rounded(peft["p99_ms"]),
        "peft_swaps": peft_swaps,
        "peft_compiled_forward": peft_forward,
        "peft_recompiles": peft["recompiles"],
        "recompiles": recompiles,
        "forwards_during_swaps": forwards,
        "forward_p50_ms": rounded(percentile(forward_ms, 50), 1),
        "compiled_matches_eager": compiled_max_abs_diff <= tolerance,
        "compiled_max_abs_diff": compiled_max_abs_diff,
        "warmup_s": round(warmup_s, 1),
        "swap_vs_floor": rounded(swap_p50 / floor_p50, 2),
        "peft_vs_swap": rounded(peft["p50_ms"] / swap_p50, 1),
    }
    results["goal_swap_le_2x_floor"] = results["swap_vs_floor"] is not None and results["swap_vs_floor"] <= 2.0
    results["goal_10x_faster_than_peft"] = results["peft_vs_swap"] is not None and results["peft_vs_swap"] >= 10.0
    results["goal_0_recompiles"] = recompiles == 0
    results["goal_every_intact_swap_passes_its_check"] = not check_failures
    return common.emit(info, results, started)


def run_peft(model, adapters, shapes, swaps, run_forward, input_ids, device, dtype, rng) -> dict:
    """PEFT's compiled hotswap on the same adapters: p50/p99 of `hotswap_adapter_from_state_dict`."""
    from peft import LoraConfig, get_peft_model
    from peft.utils.hotswap import hotswap_adapter_from_state_dict, prepare_model_for_compiled_hotswap
    from peft.utils.save_and_load import _insert_adapter_name_into_state_dict

    first = next(a for a in adapters if a.rank == common.MAX_RANK)
    config = LoraConfig(
        r=first.rank, lora_alpha=first.alpha, target_modules=list(common.TARGET_MODULES), init_lora_weights=False
    )
    peft_model = get_peft_model(model, config)
    peft_model.eval()
    prepare_model_for_compiled_hotswap(peft_model, target_rank=common.MAX_RANK)
    compiled = torch.compile(peft_model, dynamic=False)
    pin = device == "cuda"
    inputs = []
    for adapter in adapters:
        named = _insert_adapter_name_into_state_dict(adapter.state_dict, adapter_name="default", parameter_prefix="lora_")
        named = {k: (v.to(dtype).pin_memory() if pin else v.to(dtype)) for k, v in named.items()}
        inputs.append((named, common.peft_lora_config(adapter)))

    def peft_forward() -> torch.Tensor:
        return compiled(input_ids=input_ids, use_cache=False, logits_to_keep=1).logits[:, -1, :]

    graphs_before = None
    with torch.no_grad():
        if run_forward:
            t0 = time.perf_counter()
            peft_forward()
            peft_forward()
            synchronize(device)
            log(f"PEFT compiled warm-up forward {time.perf_counter() - t0:.1f} s")
            graphs_before = common.graphs_compiled()
        times = []
        for i in range(swaps):
            state_dict, adapter_config = inputs[rng.randrange(len(inputs))]
            synchronize(device)
            t0 = time.perf_counter()
            hotswap_adapter_from_state_dict(compiled, state_dict, "default", adapter_config)
            synchronize(device)
            times.append((time.perf_counter() - t0) * 1000)
            if run_forward and (i + 1) % max(1, swaps // 4) == 0:
                peft_forward()
    recompiles = common.graphs_compiled() - graphs_before if graphs_before is not None else None
    log(f"PEFT: {swaps} hotswaps, p50 {percentile(times, 50):.2f} ms; recompiles {recompiles}")
    return {"p50_ms": percentile(times, 50), "p99_ms": percentile(times, 99), "recompiles": recompiles}


if __name__ == "__main__":
    main()
    sys.exit(0)
