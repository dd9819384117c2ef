"""Autoscaling under a step load on a 3-node local cluster: scale-up and scale-down times, failed
requests, and the cold misses of the replicas a scale-up adds, with and without prewarming.

    python -m benchmarks.autoscale [--quick] [--model tiny|smollm2] [--clients N] [--hold-s S]

The cluster (`benchmarks.local_cluster`): 3 nodes of 1 CPU, one 1-CPU LoraReplica fits each.
The app is `build_app` with the adapter-aware autoscaling policy (min 1, max 3 replicas), its
store on moto's S3. Two phases in the same run, the same trace each, the
app deployed afresh for each: `prewarm` (a new replica loads the store's `num_slots` most
requested adapters before it takes traffic) and `no_prewarm` (`prewarm_adapters: 0`).

Defaults: 16 adapters, Zipf(1.0), 8 slots per replica (`--adapters`, `--num-slots`).

Per phase: a warm-up at one request at a time (the store learns what is popular), then the step:
`--clients` closed-loop callers, adapters drawn Zipf(ZIPF_S) per request, until 3 replicas run
and then `--hold-s` more; then no load until 1 replica runs again.
  scale_up_s      load step -> 3 replicas running
  scale_down_s    load gone -> 1 replica running
  failed_requests any answer other than 200, both phases
  cold_misses_after_scale_up_{prewarm,no_prewarm}
                  slot misses of the replicas the step added, from when they were ready (after
                  their prewarm) to the end of the step: requests that waited for a load
Goal: 0 failed requests; prewarming at least halves the cold misses after scale-up.
"""

from __future__ import annotations

import random
import tempfile
import threading
import time

import httpx

from benchmarks import common
from benchmarks.common import log

ADAPTERS = 16
ZIPF_S = 1.0
NUM_SLOTS = 8
"""Defaults (`--adapters`, `--num-slots`); the counts are small (a few to a few tens of misses
per phase), so a run is noisy: BENCHMARKS.md has several."""
APP = "lora-serve"
GOAL_MISS_RATIO = 0.5


def app_args(model: str, bucket: str, endpoint: str, root: str, prewarm: int, num_slots: int) -> dict:
    return {
        "replica_num_cpus": 1,
        "tenants": {"auth": "none"},
        "autoscaling": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2, "upscale_delay_s": 2,
                        "downscale_delay_s": 5, "look_back_period_s": 3, "metrics_interval_s": 0.5},
        "replica": {"base_model": common.engine_model_name(model), "compile": "off", "num_slots": num_slots,
                    "max_rank": 16, "max_num_seqs": 4, "max_seq_len": 256, "max_new_tokens": 64,
                    "prewarm_adapters": prewarm, "torch_threads": 1,
                    "store": {"name": "bench-autoscale-store", "root": root, "sync_interval_s": 30,
                              "sources": [{"uri": f"s3://{bucket}/adapters", "options": {"endpoint_url": endpoint}}]}},
    }


def zipf_trace(count: int, adapters: int, seed: int) -> list[str]:
    ids = [f"acme/a{i}" for i in range(adapters)]
    weights = [1 / (rank + 1) ** ZIPF_S for rank in range(adapters)]
    return random.Random(seed).choices(ids, weights, k=count)


class StepLoad:
    """`clients` callers sending the trace's adapters in order, back to back, until stopped."""

    def __init__(self, base_url: str, trace: list[str], clients: int, max_tokens: int) -> None:
        self.base_url, self.trace, self.max_tokens = base_url, trace, max_tokens
        self.statuses: list[int] = []
        self.failures: list[str] = []
        self._next = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._caller, daemon=True) for _ in range(clients)]

    def start(self) -> "StepLoad":
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)

    def _caller(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=120) as http:
            while not self._stop.is_set():
                with self._lock:
                    model = self.trace[self._next % len(self.trace)]
                    self._next += 1
                try:
                    response = http.post("/v1/completions", json={
                        "model": model, "prompt": "Tell me a story", "max_tokens": self.max_tokens, "ignore_eos": True})
                    status, text = response.status_code, response.text
                except httpx.HTTPError as error:
                    status, text = 0, repr(error)
                self.statuses.append(status)
                if status != 200:
                    self.failures.append(f"{model}: {status} {text[:200]}")


def running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    return app.deployments["LoraReplica"].replica_states.get("RUNNING", 0) if app is not None else 0


def stats_by_actor(expected: int) -> dict[str, dict] | None:
    """Each replica's `stats()`, by actor id: calls sent at once, so the router spreads them."""
    from ray import serve

    handle = serve.get_deployment_handle("LoraReplica", app_name=APP)
    found = {}
    for response in [handle.stats.remote() for _ in range(4 * expected)]:
        stats = response.result()
        found[stats["replica_actor_id"]] = stats
    return found if len(found) >= expected else None


def run_phase(name: str, args, base_url: str, s3, root: str, prewarm: int, trace: list[str]) -> dict:
    from ray import serve

    from deployments.app import build_app

    serve.run(build_app(app_args(args.model, "bench", s3.endpoint, root, prewarm, args.num_slots)), name=APP, route_prefix="/")
    common.wait_until(lambda: running_replicas() == 1, 120, "1 replica")
    first = set(stats_by_actor(1) or {})
    with httpx.Client(base_url=base_url, timeout=120) as http:  # warm-up: the store learns the popularity
        for model in trace[: args.warmup_requests]:
            http.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2}).raise_for_status()
    log(f"{name}: warm-up done, stepping to {args.clients} clients")
    load = StepLoad(base_url, trace[args.warmup_requests:], args.clients, args.max_tokens).start()
    step_s = time.monotonic()
    try:
        common.wait_until(lambda: running_replicas() == 3, 300, f"{name}: 3 replicas", interval_s=0.25)
        scale_up_s = time.monotonic() - step_s
        log(f"{name}: 3 replicas after {scale_up_s:.1f} s; holding {args.hold_s:.0f} s")
        ready = common.wait_until(lambda: stats_by_actor(3), 60, f"{name}: every replica's stats")
        time.sleep(args.window_s)
        after_window = common.wait_until(lambda: stats_by_actor(3), 60, f"{name}: every replica's stats")
        time.sleep(max(0.0, args.hold_s - args.window_s))
        stats = common.wait_until(lambda: stats_by_actor(3), 60, f"{name}: every replica's stats")
    finally:
        load.stop()
    added_ids = [actor for actor in stats if actor not in first]
    added = [stats[actor] for actor in added_ids]
    window_misses = sum(after_window[a]["cold_misses"] for a in added_ids)
    window_requests = sum(after_window[a]["slots"]["hits"] + after_window[a]["slots"]["misses"] for a in added_ids)
    drop_s = time.monotonic()
    common.wait_until(lambda: running_replicas() == 1, 300, f"{name}: back to 1 replica", interval_s=0.25)
    scale_down_s = time.monotonic() - drop_s
    serve.delete(APP)
    result = {
        "scale_up_s": round(scale_up_s, 1), "scale_down_s": round(scale_down_s, 1),
        "requests": len(load.statuses), "failed_requests": len(load.failures),
        "cold_misses_after_scale_up": window_misses,
        "slot_acquires_in_window": window_requests,
        "cold_misses_when_ready": sum(ready[a]["cold_misses"] for a in added_ids),
        "cold_misses_whole_hold": sum(s["cold_misses"] for s in added),
        "added_replicas": len(added), "prewarmed": [s["prewarmed"] for s in added],
    }
    log(f"{name}: {result}" + (f"; first failures {load.failures[:3]}" if load.failures else ""))
    return result


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.set_defaults(model="tiny")
    p.add_argument("--clients", type=int, default=None, help="callers in the step (default 8, --quick 6)")
    p.add_argument("--hold-s", type=float, default=None, help="load kept this long at 3 replicas (default 30, --quick 10)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--warmup-requests", type=int, default=40)
    p.add_argument("--adapters", type=int, default=ADAPTERS)
    p.add_argument("--num-slots", type=int, default=NUM_SLOTS)
    p.add_argument("--window-s", type=float, default=5.0, help="cold misses are counted this long after scale-up")
    args = p.parse_args(argv)
    args.clients = args.clients or (6 if args.quick else 8)
    args.hold_s = args.hold_s if args.hold_s is not None else (10.0 if args.quick else 30.0)
    if args.threads is None:
        args.threads = 1
    started = time.perf_counter()
    info = common.setup(args)

    from benchmarks.local_cluster import free_port, multi_node_ray
    from benchmarks.moto_s3 import moto_s3_server

    _, shapes = common.store_bench_engine(args.model)
    trace = zipf_trace(20000, args.adapters, args.seed)
    http_port = free_port()
    phases = {}
    with tempfile.TemporaryDirectory(prefix="bench-autoscale-") as tmp, moto_s3_server() as s3, \
            multi_node_ray(3, cpus_per_node=1, http_port=http_port, dashboard_port=free_port()):
        s3.client.create_bucket(Bucket="bench")
        for index in range(args.adapters):
            adapter = common.make_adapter(shapes, rank=8, seed=args.seed * 1000 + index)
            s3.put_adapter("bench", f"adapters/acme/a{index}", common.adapter_files(adapter))
        log(f"{args.adapters} adapters on S3; Zipf({ZIPF_S}) popularity, {args.num_slots} slots per replica")
        base_url = f"http://127.0.0.1:{http_port}"
        for name, prewarm in (("no_prewarm", 0), ("prewarm", args.num_slots)):
            phases[name] = run_phase(name, args, base_url, s3, f"{tmp}/store", prewarm, trace)
    misses = {name: phase["cold_misses_after_scale_up"] for name, phase in phases.items()}
    ratio = misses["prewarm"] / misses["no_prewarm"] if misses["no_prewarm"] else None
    failed = sum(phase["failed_requests"] for phase in phases.values())
    results = {
        "scale_up_s": phases["prewarm"]["scale_up_s"], "scale_down_s": phases["prewarm"]["scale_down_s"],
        "scale_up_s_no_prewarm": phases["no_prewarm"]["scale_up_s"],
        "scale_down_s_no_prewarm": phases["no_prewarm"]["scale_down_s"],
        "failed_requests": failed,
        "cold_misses_after_scale_up_prewarm": misses["prewarm"],
        "cold_misses_after_scale_up_no_prewarm": misses["no_prewarm"],
        "prewarm_miss_ratio": round(ratio, 3) if ratio is not None else None,
        "requests": sum(phase["requests"] for phase in phases.values()),
        "clients": args.clients, "hold_s": args.hold_s, "adapters": args.adapters, "zipf_s": ZIPF_S, "num_slots": args.num_slots,
        "goal_met": failed == 0 and ratio is not None and ratio <= GOAL_MISS_RATIO,
        "phases": phases,
    }
    return common.emit(info, results, started)


if __name__ == "__main__":
    main()
