"""The engine alone, in process, under the serving benchmark's burst (workload a): chat requests
sent at once through `Engine.submit`, each on a random adapter, then the same requests on the base
model, with the replica settings of serve_config.yaml (one replica's share of the burst).

    python -m benchmarks.engine_load [--quick] [--model smollm2|tiny] [--adapters N] [--requests N]

Reports the engine's own output tokens/s with LoRA and without (`tokens_per_s_lora_vs_base`, goal
>= 0.9: no HTTP, no routing, the LoRA kernels' cost alone) and `recompiles`: graphs dynamo built
after warm-up across the joins, leaves and adapter mixes of both bursts (goal 0; with compile off,
as `compile: auto` is on CPU, nothing is compiled at all). Prints ONE JSON line last on stdout.
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common
from benchmarks.common import log, rounded

__all__ = ["measure", "main"]

GOAL_LORA_VS_BASE = 0.9


def replica_settings(engine_model: str, max_num_seqs: int | None, threads: int, device: str | None):
    """The `make serve` replica's engine settings, with the benchmark's model and overrides."""
    from deployments.replica import ReplicaSettings

    config = common.make_serve_config()
    replica = dict(config["applications"][0]["args"]["replica"], base_model=engine_model, torch_threads=threads)
    replica.pop("store", None)
    if max_num_seqs:
        replica["max_num_seqs"] = max_num_seqs
    if device:
        replica["device"] = device
    return ReplicaSettings.model_validate(replica).engine_config()


def _burst(engine, models: list[str | None], prompts: list[str], output_len: int) -> dict:
    from deployments.contracts import ChatTurn, GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    handles = [engine.submit(GenerationRequest(model, params, messages=(ChatTurn("user", prompt),)))
               for model, prompt in zip(models, prompts)]
    tokens = sum(handle.result().completion_tokens for handle in handles)
    wall_s = time.perf_counter() - started
    return {"requests": len(handles), "output_tokens": tokens, "wall_s": rounded(wall_s, 2),
            "output_tok_s": rounded(tokens / wall_s, 2)}


def measure(engine_config, adapters_root: Path, adapter_ids: list[str], prompts: list[str], output_len: int,
            seed: int) -> dict:
    """Both bursts on one engine; the figures the serving benchmark's JSON line carries as `engine`."""
    from deployments.engine import Engine

    engine = Engine(engine_config)
    try:
        for adapter_id in adapter_ids:
            engine.register_adapter(adapter_id, adapters_root / adapter_id)
        _burst(engine, [None, *adapter_ids], prompts[: len(adapter_ids) + 1], 2)  # loads every adapter, untimed
        graphs_before = common.graphs_compiled()
        rng = random.Random(f"engine-load:{seed}")
        lora = _burst(engine, [rng.choice(adapter_ids) for _ in prompts], prompts, output_len)
        base = _burst(engine, [None] * len(prompts), prompts, output_len)
        recompiles = common.graphs_compiled() - graphs_before
        stats = engine.stats()
    finally:
        engine.close()
    ratio = rounded(lora["output_tok_s"] / base["output_tok_s"], 3)
    log(f"engine alone: LoRA {lora['output_tok_s']} tok/s, base {base['output_tok_s']} tok/s "
        f"(x{ratio}), {recompiles} graphs compiled after warm-up, compiled decode: {engine.runner.compiled}")
    return {
        "compiled": engine.runner.compiled, "max_num_seqs": engine_config.max_num_seqs,
        "kv_lanes": stats["kv_lanes"], "peak_rows": stats["peak_rows"],
        "lora": lora, "base": base,
        "tokens_per_s_lora_vs_base": ratio, "goal_lora_vs_base": ratio >= GOAL_LORA_VS_BASE,
        "recompiles": recompiles, "goal_zero_recompiles": recompiles == 0,
    }


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.serving import load_tokenizer, make_prompts, write_adapters

    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--requests", type=int, default=None, help="requests per burst (32; --quick 16)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: serve_config.yaml's")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    args = p.parse_args(argv)
    requests = args.requests or (16 if args.quick else 32)
    engine_model = common.engine_model_name(args.model)
    started = time.perf_counter()
    info = common.setup(args)
    prompts = make_prompts(load_tokenizer(args.model), requests, args.input_len, args.seed)
    with tempfile.TemporaryDirectory(prefix="bench-engine-load-") as tmp:
        adapter_ids = write_adapters(Path(tmp), engine_model, args.adapters, args.seed)
        config = replica_settings(engine_model, args.max_num_seqs, info.threads, args.device)
        results = measure(config, Path(tmp), adapter_ids, prompts, args.output_len, args.seed)
    return common.emit(info, {"engine_model": engine_model, "adapters": args.adapters, **results}, started)


if __name__ == "__main__":
    main()
    sys.exit(0)
