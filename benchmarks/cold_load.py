"""Cold loads: an adapter warm nowhere, into a replica's slot, from S3 and from the object store.

    python -m benchmarks.cold_load [--quick] [--model smollm2|tiny] [--adapters N] [--rounds R]

Setup (all real, on this machine): a local Ray (`num_cpus=2`), moto's S3 server over HTTP, the
AdapterStore actor (no watched root; each adapter is registered explicitly), and one
`LoraReplica` Serve replica (num_cpus 1, compile off, 4 slots) that loads through the store.
Adapters: rank 16 on q,k,v,o of the base model (SmolLM2: 240 tensors, 7.4 MB fp32), a new seed
each. One extra adapter goes through both paths first, untimed (first-call costs).

  s3_to_slot            `--adapters` never-seen adapters, each uploaded to
                        `s3://bench/prod/<tenant>/<name>/` beforehand; timed in the driver from
                        `store.register(id, uri, {"endpoint_url": ...})` (list + download +
                        validate + keep a copy + payload put into the object store) until
                        `replica.warm(id)` returns (locate + object-store get + prepare + slot
                        write). Split into `register_ms` and the warm call's wall and `load_ms`.
  object_store_to_slot  the same adapters, published by the store (their payload is in the
                        object store), taken out of the replica first with `replica.evict(id)`
                        (slot + host cache), then `replica.warm(id)`: its own `load_ms`, and the
                        driver's wall around the call (+ the Serve handle's round trip).
                        `--rounds` passes over the adapters (2; --quick 1).

CPU: `*_cpu_mean_ms` is the CPU time the replica (or store) process used per call, a mean
(the kernel counts in 10 ms ticks): unlike wall time it leaves out the time other processes hold
the core, which matters on a shared machine (Ray workers run at nice 15).

Profile (`profile`, p50 ms per step): a Ray actor with the replica's resources (1 CPU, 1 torch
thread) and its own SlotLoraModel on the same base model runs the object-store path step by
step on the same adapters: the `locate` RPC, `ray.get` of the payload, `checkpoint_from_payload`,
`validate_checkpoint`, the rest of `SlotLoraModel.prepare` (layout: dtype, scaled B^T, copies),
`prepare` as a whole, and `write_slot`, in wall time and in the thread's CPU time (`profile.cpu`:
what each step costs when no other process takes the core away; this machine is often shared).
`load_ms` minus their sum is the engine's thread hops (load executor -> engine loop) and its
host-cache bookkeeping.

Goal: object_store_to_slot p50 <= 20 ms for the rank-16 SmolLM2 adapter.
"""

from __future__ import annotations

import sys
import tempfile
import time

from benchmarks import common
from benchmarks.common import log, percentile, rounded

BUCKET, PREFIX = "bench", "prod"
RANK = 16
GOAL_OBJECT_STORE_TO_SLOT_MS = 20.0


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--adapters", type=int, default=None, help="adapters per path (default 10, --quick 5)")
    p.add_argument("--rounds", type=int, default=None, help="object-store passes over the adapters (2; --quick 1)")
    p.add_argument("--profile-reps", type=int, default=None, help="profiled passes over the adapters (3; --quick 2)")
    p.add_argument("--worker-logs", action="store_true", help="Ray workers' INFO logs on stderr (log_to_driver)")
    args = p.parse_args(argv)
    if args.threads is None:
        args.threads = 1  # the driver does little torch work; leave the cores to the replica
    started = time.perf_counter()
    info = common.setup(args)
    count = args.adapters or (5 if args.quick else 10)
    rounds = args.rounds or (1 if args.quick else 2)
    profile_reps = args.profile_reps or (2 if args.quick else 3)

    import ray
    from ray import serve

    if ray.is_initialized():
        raise SystemExit("this benchmark starts its own local Ray (and its S3 env first): ray.shutdown() before")

    from adapters_store.store import get_or_create_store
    from benchmarks.moto_s3 import moto_s3_server
    from deployments.replica import LoraReplica
    from lora_core.settings import StoreConfig

    engine_config, shapes = common.store_bench_engine(args.model)
    ids = ["acme/cold-warmup"] + [f"{'acme' if i % 2 else 'globex'}/cold-{i}" for i in range(count)]
    files = {
        adapter_id: common.adapter_files(common.make_adapter(shapes, RANK, seed=args.seed * 1000 + i))
        for i, adapter_id in enumerate(ids)
    }
    size = sum(len(b) for b in files[ids[0]].values())
    log(f"{len(ids)} adapters (rank {RANK}, {2 * len(shapes)} tensors, {size / 1e6:.2f} MB each)")

    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-cold-load-") as tmp, moto_s3_server() as s3:
        s3.client.create_bucket(Bucket=BUCKET)
        for adapter_id in ids:
            s3.put_adapter(BUCKET, f"{PREFIX}/{adapter_id}", files[adapter_id])
        ray.init(
            num_cpus=2, include_dashboard=False, log_to_driver=args.worker_logs,
            logging_config=ray.LoggingConfig(log_level="INFO"),
        )
        store = None
        try:
            # Long interval: no background sync of the registered adapters runs during the timing.
            store_config = StoreConfig(name="bench-cold-load-store", root=f"{tmp}/store", sync_interval_s=3600)
            t0 = time.perf_counter()
            store = get_or_create_store(store_config, engine_config)
            ray.get(store.status.remote())
            log(f"store up ({time.perf_counter() - t0:.1f} s)")

            serve.start(proxy_location="Disabled")
            settings = {**engine_config.model_dump(mode="json"), "store": store_config.model_dump(mode="json")}
            t0 = time.perf_counter()
            replica = serve.run(
                LoraReplica.options(num_replicas=1, ray_actor_options={"num_cpus": 1}).bind(settings),
                name="cold-load", route_prefix=None,
            )
            log(f"replica up ({time.perf_counter() - t0:.1f} s)")
            options = {"endpoint_url": s3.endpoint}
            replica_cpu = common.descendant_cpu_clock("ServeReplica:cold-load:LoraReplica")
            store_cpu = common.descendant_cpu_clock("AdapterStore")
            if replica_cpu is None or store_cpu is None:
                log("warning: replica or store process not found: no CPU figures")
            replica_cpu, store_cpu = CpuClock(replica_cpu), CpuClock(store_cpu)

            def s3_to_slot(adapter_id: str) -> dict:
                uri = f"s3://{BUCKET}/{PREFIX}/{adapter_id}"
                store_cpu.start(), replica_cpu.start()
                t_start = time.perf_counter()
                ray.get(store.register.remote(adapter_id, uri, options))
                t_registered = time.perf_counter()
                warmed = replica.warm.remote(adapter_id).result(timeout_s=120)
                t_done = time.perf_counter()
                return {
                    "total_ms": (t_done - t_start) * 1000,
                    "register_ms": (t_registered - t_start) * 1000,
                    "warm_wall_ms": (t_done - t_registered) * 1000,
                    "load_ms": warmed["load_ms"],
                    "store_cpu_ms": store_cpu.elapsed_ms(),
                    "replica_cpu_ms": replica_cpu.elapsed_ms(),
                }

            def object_store_to_slot(adapter_id: str) -> dict:
                replica.evict.remote(adapter_id).result(timeout_s=60)
                replica_cpu.start()
                t_start = time.perf_counter()
                warmed = replica.warm.remote(adapter_id).result(timeout_s=120)
                return {
                    "wall_ms": (time.perf_counter() - t_start) * 1000,
                    "load_ms": warmed["load_ms"],
                    "replica_cpu_ms": replica_cpu.elapsed_ms(),
                }

            warmup, timed = ids[0], ids[1:]
            log(f"warm-up (untimed): s3 {s3_to_slot(warmup)['total_ms']:.0f} ms, "
                f"object store {object_store_to_slot(warmup)['load_ms']:.1f} ms")

            s3_rows = []
            for adapter_id in timed:
                s3_rows.append(s3_to_slot(adapter_id))
                row = s3_rows[-1]
                log(f"s3_to_slot {adapter_id}: {row['total_ms']:.0f} ms (register {row['register_ms']:.0f} ms, "
                    f"warm {row['warm_wall_ms']:.0f} ms, load_ms {row['load_ms']:.1f})")
            os_rows = []
            for _ in range(rounds):
                for adapter_id in timed:
                    os_rows.append(object_store_to_slot(adapter_id))
            log(f"object_store_to_slot: load_ms {[round(r['load_ms'], 1) for r in os_rows]}")
            replica_stats = replica.stats.remote().result(timeout_s=60)

            profile = profile_steps(ray, store, store_config, engine_config, timed, profile_reps)
            results = summarize(s3_rows, os_rows, profile, replica_stats, rounds, len(shapes), size)
        finally:
            common.shut_down_ray(store)
    return common.emit(info, results, started)


class CpuClock:
    """CPU time of one process between `start()` and `elapsed_ms()`; None when it was not found."""

    def __init__(self, clock) -> None:
        self._clock, self._started = clock, 0.0

    def start(self) -> None:
        if self._clock is not None:
            self._started = self._clock()

    def elapsed_ms(self) -> float | None:
        return None if self._clock is None else (self._clock() - self._started) * 1000


class StepProfiler:
    """The replica's object-store -> slot path, one step at a time, in a worker like the replica's."""

    def __init__(self, store_name: str, namespace: str, engine_config: dict) -> None:
        import ray
        import torch

        from deployments.engine.devices import resolve_dtype
        from deployments.engine.engine import load_engine_base, slot_model_for
        from lora_core.settings import EngineConfig

        torch.set_num_threads(1)
        config = EngineConfig.model_validate(engine_config)
        self.store = ray.get_actor(store_name, namespace=namespace)
        base = load_engine_base(config, "cpu", resolve_dtype(config))
        self.slot_model = slot_model_for(base, config, config.num_slots)

    def run(self, adapter_ids: list[str], reps: int) -> dict[str, list[float]]:
        import ray
        import torch

        from lora_core.checkpoint import validate_checkpoint
        from lora_core.payload import checkpoint_from_payload

        steps: dict[str, list[float]] = {}

        def timed(name: str, fn):
            t0, c0 = time.perf_counter(), time.thread_time()
            value = fn()
            steps.setdefault(name, []).append((time.perf_counter() - t0) * 1000)
            steps.setdefault(name.replace("_ms", "_cpu_ms"), []).append((time.thread_time() - c0) * 1000)
            return value

        slot = 0
        with torch.no_grad():
            for _ in range(reps + 1):  # the first pass warms up (view caches, imports), not kept
                first = not steps
                for adapter_id in adapter_ids:
                    version, [ref] = timed("locate_rpc_ms", lambda: ray.get(self.store.locate.remote(adapter_id)))
                    payload = timed("object_store_get_ms", lambda: ray.get(ref))
                    checkpoint = timed("checkpoint_from_payload_ms", lambda: checkpoint_from_payload(payload))
                    timed("validate_ms", lambda: validate_checkpoint(checkpoint, self.slot_model.geometry))
                    prepared = timed("prepare_ms", lambda: self.slot_model.prepare(checkpoint))
                    slot = slot % self.slot_model.num_slots + 1
                    timed("write_slot_ms", lambda: self.slot_model.write_slot(slot, prepared))
                    del payload, checkpoint, prepared
                if first:
                    steps.clear()
                    steps["_warmed"] = [1.0]
        steps.pop("_warmed", None)
        return steps


def profile_steps(ray, store, store_config, engine_config, adapter_ids, reps) -> dict:
    t0 = time.perf_counter()
    profiler = ray.remote(num_cpus=1)(StepProfiler).remote(
        store_config.name, store_config.namespace, engine_config.model_dump(mode="json")
    )
    try:
        steps = ray.get(profiler.run.remote(adapter_ids, reps), timeout=600)
    finally:
        ray.kill(profiler)
    profile = {name: rounded(percentile(values, 50)) for name, values in sorted(steps.items()) if "_cpu_" not in name}
    # prepare = validate + layout: the layout's own share
    profile["layout_ms"] = rounded(percentile(steps["prepare_ms"], 50) - percentile(steps["validate_ms"], 50))
    # The same steps in this thread's CPU time: what they cost without the other processes on the
    # machine taking the core away (the wall times above include that; RPC waits are not CPU).
    profile["cpu"] = {name: rounded(percentile(values, 50)) for name, values in sorted(steps.items()) if "_cpu_" in name}
    profile["cpu"]["layout_cpu_ms"] = rounded(percentile(steps["prepare_cpu_ms"], 50) - percentile(steps["validate_cpu_ms"], 50))
    profile["samples"] = len(steps["prepare_ms"])
    log(f"profile ({time.perf_counter() - t0:.1f} s): {profile}")
    return profile


def _dist(values: list, prefix: str) -> dict:
    values = [v for v in values if v is not None]
    return {
        f"{prefix}_p50_ms": rounded(percentile(values, 50), 2),
        f"{prefix}_p90_ms": rounded(percentile(values, 90), 2),
    }


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return rounded(sum(values) / len(values), 1) if values else None


def summarize(s3_rows, os_rows, profile, replica_stats, rounds, layers, size_bytes) -> dict:
    results = {
        "adapters": len(s3_rows),
        "rounds": rounds,
        "adapter_rank": RANK,
        "target_layers": layers,
        "adapter_bytes": size_bytes,
        **_dist([r["total_ms"] for r in s3_rows], "s3_to_slot"),
        **_dist([r["register_ms"] for r in s3_rows], "s3_register"),
        **_dist([r["warm_wall_ms"] for r in s3_rows], "s3_warm_wall"),
        **_dist([r["load_ms"] for r in s3_rows], "s3_warm_load"),
        **_dist([r["load_ms"] for r in os_rows], "object_store_to_slot"),
        **_dist([r["wall_ms"] for r in os_rows], "object_store_to_slot_wall"),
        # CPU the process used during the call (all its threads: the call itself, plus Serve's
        # request handling and whatever else ran then), a mean: the kernel counts in 10 ms ticks
        "object_store_to_slot_replica_cpu_mean_ms": _mean([r["replica_cpu_ms"] for r in os_rows]),
        "s3_register_store_cpu_mean_ms": _mean([r["store_cpu_ms"] for r in s3_rows]),
        "s3_warm_replica_cpu_mean_ms": _mean([r["replica_cpu_ms"] for r in s3_rows]),
        "profile": profile,
        "replica_swap_ms_p50": rounded(replica_stats["slots"]["swap_ms_p50"]),
        "goal_object_store_to_slot_ms": GOAL_OBJECT_STORE_TO_SLOT_MS,
    }
    results["goal_object_store_to_slot_le_20ms"] = results["object_store_to_slot_p50_ms"] <= GOAL_OBJECT_STORE_TO_SLOT_MS
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
