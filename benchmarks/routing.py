"""Routing: adapter-affinity vs Ray Serve's default router: simulated, then end to end over HTTP.

    python -m benchmarks.routing [--quick] [--model smollm2|tiny] [--requests N] [--rate RPS]

Part 1, simulation (no Ray): `benchmarks.routing_sim.run_simulation` as it is (Zipf(1.0) over 200
adapters, 4 replicas x 8 slots, Poisson arrivals at 50% and 90% utilization; affinity vs a model of
Ray's default router vs random vs oracle). Its 90% figures are `sim_*`, its 50% ones `sim50_*`.

Part 2, end to end (all real, on this machine): a local Ray (`num_cpus=2`), moto's S3 over HTTP
holding `--adapters` PEFT adapters (`s3://bench/routing/<tenant>/<name>/`, random ranks 4-16 on
q,k,v,o), the AdapterStore actor watching that root (one sync before the phases, then none), and
per phase a fresh Serve app: the `Router` ingress over HTTP (httpx -> Serve's proxy ->
`/v1/completions`, no API key) and 2 `LoraReplica` replicas (1 CPU each, compile off, 4 slots,
max batch 8, the store as their resolver). A slot miss therefore costs what it costs in the
product: host cache -> slot, or object store -> host cache -> slot on first use on a replica (the
store fetched every adapter from S3 once, before the phases).

Workload, identical in every phase (one seed): Poisson arrivals at `--rate` requests/s, each for
an adapter drawn from Zipf(1.0) over the adapters (`routing_sim.SimConfig.popularity`) and one of a
few short prompts, greedy, `--max-tokens`. Default rate: `--utilization` (0.5) x the capacity the
first phase measures before its warm-up (a burst of replicas x max_num_seqs base-model requests:
full batches, no slot limits), so the replicas are busy but a good placement leaves headroom; the
machine's other load moves that capacity, so it is measured, not fixed. Latency runs from the
request's scheduled arrival to its response (open loop: a late send counts against the system).
The first 10% warm the slots; the driver waits for them, reads every replica's `stats()`, sends
the rest, reads them again.

Phases (fresh replicas and app name each; the same replica options, both from `build_app`):
  affinity          the app exactly as built: `LoraReplica` with
                    `request_router_config=affinity_request_router_config(...)`.
  ray_default       the same deployment with Ray's default request router (`RequestRouterConfig()`:
                    PowerOfTwoChoicesRequestRouter) and `RayMultiplexedReplica`: the LoraReplica
                    class as a Ray Serve multiplexing user would extend it. `generate` first awaits
                    a `serve.multiplexed(max_num_models_per_replica=num_slots)` loader for
                    `serve.get_multiplexed_model_id()` (wired once the engine is built, which knows
                    the slot count). The loader
                    only records the id; the engine fills the slot when the request's batch forms,
                    as in the affinity phase. So Ray's per-replica LRU of num_slots ids follows the
                    same requests as the engine's slot LRU, at no cost: the strongest baseline.
  ray_default_warm  the same, but the loader calls `engine.warm(id)` (the slot is filled before the
                    request is submitted: it waits for the batch in flight, and Ray's per-replica
                    multiplex lock serializes loads). Not run by default.
  Why the loader feeds the default router (Ray 2.60 source): `_ModelMultiplexWrapper.load_model`
  (serve/multiplex.py) flags a miss; its MetricsPusher task (every
  PUSH_MULTIPLEXED_MODEL_IDS_INTERVAL_S = 0.1 s) sends the loaded + loading ids to the controller
  (`record_request_routing_info` -> `DeploymentReplica.record_multiplexed_model_ids`), which
  broadcasts them as `RunningReplicaInfo.multiplexed_model_ids` to every handle's router
  (`RunningReplica.update_replica_info`, then `MultiplexMixin._update_multiplexed_model_ids_with_
  replicas`). `PowerOfTwoChoicesRequestRouter.choose_replicas` (request_router/pow_2_router.py)
  calls `apply_multiplex_routing` for a request with a `multiplexed_model_id` (the ingress sets
  it): the replicas holding it, else those holding the fewest ids, for 1-2 s, then all; two at
  random, the shorter queue wins. Checked at run time: 2 s after each phase the driver reads what
  the controller feeds the routers (`_all_running_replicas()`: `multiplexed_model_ids`, or the
  affinity router's `RoutingStats.warm`) and compares it with each engine's warm slots
  (`e2e_router_view_matches_engine_*`, Jaccard, 1.0 = same sets).

Per phase, from the replicas' engine stats (summed over replicas, measured part only): hit rate =
1 - slot fills / adapter rows run (each request is one row; in ray_default_warm a warm's fill
counts for its request), rows per batch, swap ms; from the client: p50/p99 latency, completion
tokens/s over the measured window, failures (503 = a replica queue full, timeouts). What a miss
costs here: a slot fill from the host cache is a copy (`swap_ms_p50`: ~7 ms for SmolLM2, <1 ms for
the tiny model) and a first use on a replica an object-store read on the engine's load threads;
the bigger cost is the batch: one holds at most num_slots distinct adapters, and a request whose
adapter is still loading waits for the next one (batches run to completion). The machine's other
load changes between phases: each phase records the 1-minute load average at its start and end.
Goals (reported, not enforced): sim affinity within 5 points of the oracle and >= 10 above
ray_default; end to end a higher hit rate than ray_default and p99 <= 0.8 x its p99.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import os
import random
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from ray import serve

from benchmarks import common
from benchmarks.common import log, percentile, rounded
from deployments.replica import LoraReplica

__all__ = ["RayMultiplexedReplica", "main"]

BUCKET, PREFIX = "bench", "routing"
TENANTS = ("acme", "globex", "initech")
PROMPTS = (
    "Tell me a story about",
    "The weather today is",
    "Write a haiku about the sea:",
    "Three facts about Paris:",
    "My favourite recipe is",
    "Explain recursion in one line:",
)
WARMUP_FRACTION = 0.1
PHASES = ("affinity", "ray_default", "ray_default_warm")
REPLICA_DEPLOYMENT = "LoraReplica"
GOAL_P99_RATIO = 0.8
ROUTER_VIEW_SETTLE_S = 2.0


class RayMultiplexedReplica(LoraReplica.func_or_class):
    """LoraReplica as a Ray Serve multiplexing user would write it, so Ray's default router knows
    which adapters each replica holds (see the module docstring). Only the bookkeeping differs;
    engine, slots and requests are LoraReplica's."""

    def __init__(self, settings: dict, loader: str = "noop") -> None:
        if loader not in ("noop", "warm"):
            raise ValueError(f"loader must be 'noop' or 'warm', got {loader!r}")
        super().__init__(settings)
        self._loader = loader
        slots = self._require_engine().config.num_slots
        self._multiplexed_load = serve.multiplexed(max_num_models_per_replica=slots)(self._make_loader())

    def _make_loader(self):
        warm = self._loader == "warm"

        async def load_adapter(adapter_id: str) -> str:
            if warm:  # engine.warm blocks until the loop fills the slot (between batches)
                await asyncio.to_thread(self._require_engine().warm, adapter_id)
            return adapter_id

        return load_adapter

    async def _note_adapter(self) -> None:
        adapter_id = serve.get_multiplexed_model_id()
        if adapter_id:
            await self._multiplexed_load(adapter_id)

    async def generate(self, request):
        await self._note_adapter()
        return await super().generate(request)

    async def stream(self, request):
        await self._note_adapter()
        async for chunk in super().stream(request):
            yield chunk


# ---- workload ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    at_s: float
    adapter_id: str
    prompt: str


def adapter_ids(count: int) -> list[str]:
    """Most popular first."""
    return [f"{TENANTS[rank % len(TENANTS)]}/adapter-{rank:03d}" for rank in range(count)]


def make_arrivals(ids: list[str], requests: int, rate_rps: float, seed: int) -> list[Arrival]:
    from benchmarks.routing_sim import SimConfig

    cumulative = list(itertools.accumulate(SimConfig(num_adapters=len(ids)).popularity()))
    rng = random.Random(f"routing-e2e:{seed}")
    now, arrivals = 0.0, []
    for _ in range(requests):
        now += rng.expovariate(rate_rps)
        rank = min(bisect.bisect_left(cumulative, rng.random()), len(ids) - 1)
        arrivals.append(Arrival(now, ids[rank], rng.choice(PROMPTS)))
    return arrivals


@dataclass(frozen=True)
class Outcome:
    status: int | str
    latency_ms: float
    completion_tokens: int
    sent_s: float
    done_s: float
    error: str | None = None


async def _drive(url: str, arrivals: list[Arrival], max_tokens: int, timeout_s: float) -> list[Outcome]:
    """Open loop: each request leaves at its arrival time, whatever the earlier ones are doing."""
    import logging

    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=128)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        start = time.perf_counter() + 0.05
        first = arrivals[0].at_s

        async def one(arrival: Arrival) -> Outcome:
            scheduled = start + arrival.at_s - first
            await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
            body = {"model": arrival.adapter_id, "prompt": arrival.prompt, "max_tokens": max_tokens, "temperature": 0}
            tokens, status, error = 0, None, None
            try:
                response = await client.post("/v1/completions", json=body)
                status = response.status_code
                if status == 200:
                    tokens = response.json()["usage"]["completion_tokens"]
                else:
                    error = response.text[:300]
            except httpx.HTTPError as exception:
                status, error = type(exception).__name__, str(exception)[:300]
            done = time.perf_counter()
            return Outcome(status, (done - scheduled) * 1000, tokens, scheduled, done, error)

        return list(await asyncio.gather(*(one(a) for a in arrivals)))


def send(url: str, arrivals: list[Arrival], max_tokens: int, timeout_s: float) -> list[Outcome]:
    return asyncio.run(_drive(url, arrivals, max_tokens, timeout_s))


def base_capacity_rps(url: str, base_model: str, burst: int, max_tokens: int, timeout_s: float) -> float:
    """Requests/s the replicas complete with full batches of the base model (no adapter, no
    slot limits): a burst of `burst` requests at once, after two untimed ones."""
    send(url, [Arrival(0.0, base_model, PROMPTS[0]), Arrival(0.0, base_model, PROMPTS[1])], max_tokens, timeout_s)
    burst_arrivals = [Arrival(0.0, base_model, PROMPTS[i % len(PROMPTS)]) for i in range(burst)]
    outcomes = send(url, burst_arrivals, max_tokens, timeout_s)
    if any(o.status != 200 for o in outcomes):
        raise RuntimeError(f"calibration requests failed: {[o.error for o in outcomes if o.status != 200][:2]}")
    return burst / (max(o.done_s for o in outcomes) - min(o.sent_s for o in outcomes))


# ---- apps and replica stats ----------------------------------------------------------------


def phase_app(app_args: dict, phase: str):
    """`build_app(app_args)` as is for `affinity`; for the Ray phases the same app with the
    replicas' deployment swapped for RayMultiplexedReplica under Ray's default request router
    and LRU slots (every other option exactly as build_app set it)."""
    from ray.serve.config import RequestRouterConfig

    from deployments.app import build_app

    if phase == "affinity":
        return build_app(app_args)
    # Ray's own multiplexing evicts the least recently used model, and its routers are told what
    # that LRU holds: the engine's slots follow the same rule in these phases.
    app = build_app({**app_args, "replica": {**app_args.get("replica", {}), "slot_admission": "lru"}})
    router = app._bound_deployment  # Ray keeps the bound deployment here (no public accessor)
    replicas_app = router.init_args[0] if router.init_args else None
    if not hasattr(replicas_app, "_bound_deployment") or replicas_app._bound_deployment.name != REPLICA_DEPLOYMENT:
        raise RuntimeError("build_app's shape changed: expected Router.bind(LoraReplica.bind(settings), settings)")
    replicas = replicas_app._bound_deployment.options(
        func_or_class=RayMultiplexedReplica, request_router_config=RequestRouterConfig()
    )
    loader = "warm" if phase == "ray_default_warm" else "noop"
    return router.bind(replicas.bind(*replicas_app._bound_deployment.init_args, loader), *router.init_args[1:],
                       **router.init_kwargs)


def app_name(phase: str) -> str:
    """One app name per phase: a handle's router keeps the request router class it started with
    even when the deployment is redeployed with another one, so a phase must not reuse a name."""
    return f"routing-{phase}"


def all_replica_stats(phase: str, replicas: int, rounds: int = 30) -> dict[str, dict]:
    """replica id -> `LoraReplica.stats()`: concurrent calls through a handle until every replica
    answered (a router sends concurrent calls to different replicas; sequential ones on an idle
    deployment may all land on one, and so may a few concurrent ones that each finish before the
    next is routed: 8 per replica per round overlap enough)."""
    handle = serve.get_deployment_handle(REPLICA_DEPLOYMENT, app_name=app_name(phase))
    found: dict[str, dict] = {}
    for _ in range(rounds):
        for response in [handle.stats.remote() for _ in range(8 * replicas)]:
            stats = response.result(timeout_s=120)
            found[stats["replica_id"]] = stats
        if len(found) >= replicas:
            return found
        time.sleep(0.2)
    raise TimeoutError(f"stats from {len(found)} of {replicas} replicas after {rounds} rounds")


def router_view(phase: str) -> dict[str, list[str]]:
    """replica id -> the adapters the request routers were last told it holds: the controller's
    RunningReplicaInfo (what it broadcasts to routers): the `RoutingStats.warm` for the affinity
    router, `multiplexed_model_ids` for Ray's."""
    from ray.serve.context import _get_global_client

    from deployments.contracts import RoutingStats

    controller = _get_global_client()._controller
    view = {}
    for deployment_id, infos in ray_get(controller._all_running_replicas.remote()).items():
        if deployment_id.name == REPLICA_DEPLOYMENT and deployment_id.app_name == app_name(phase):
            for info in infos:
                if phase == "affinity":
                    held = RoutingStats.from_dict(info.routing_stats).warm if info.routing_stats else ()
                else:
                    held = info.multiplexed_model_ids or ()
                view[info.replica_id.unique_id] = sorted(held)
    return view


def ray_get(ref, timeout_s: float = 60):
    import ray

    return ray.get(ref, timeout=timeout_s)


def _summed(stats: dict[str, dict], path: tuple[str, ...]) -> int:
    """The counter at `path` in each replica's stats, summed over replicas."""
    total = 0
    for replica_stats in stats.values():
        for key in path:
            replica_stats = replica_stats[key]
        total += replica_stats
    return total


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


# ---- one phase -----------------------------------------------------------------------------


def run_phase(phase: str, app_args: dict, url: str, workload: Callable[[str], list[Arrival]], args) -> dict:
    """`workload(url)` gives the arrivals once the app is up (the first phase calibrates the rate)."""
    replicas = app_args["num_replicas"]
    load_avg_start = load_average_1m()
    t0 = time.perf_counter()
    serve.run(phase_app(app_args, phase), name=app_name(phase), route_prefix="/")
    log(f"[{phase}] {replicas} replicas up ({time.perf_counter() - t0:.1f} s)")
    try:
        arrivals = workload(url)
        warmup = max(1, int(len(arrivals) * WARMUP_FRACTION))
        t0 = time.perf_counter()
        warm = send(url, arrivals[:warmup], args.max_tokens, args.request_timeout)
        log(f"[{phase}] {warmup} warm-up requests ({time.perf_counter() - t0:.1f} s)")
        before = all_replica_stats(phase, replicas)
        outcomes = send(url, arrivals[warmup:], args.max_tokens, args.request_timeout)
        after = all_replica_stats(phase, replicas)
        time.sleep(ROUTER_VIEW_SETTLE_S)  # past a report period: compare the feed, not its lag
        try:
            view = router_view(phase)
        except Exception as error:  # a diagnostic only: Ray's private API may move
            log(f"[{phase}] could not read the routers' view from the controller: {error}")
            view = {}
        result = summarize_phase(phase, outcomes, before, after, view)
        result["warmup_failed"] = sum(1 for o in warm if o.status != 200)
        result["load_avg_1m"] = [load_avg_start, load_average_1m()]
        log(f"[{phase}] hit rate {result['hit_rate']}, p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, "
            f"{result['tokens_per_s']} tokens/s, {result['rows_per_step']} rows/step, {result['failed']} failed")
        return result
    finally:
        serve.delete(app_name(phase))


def summarize_phase(phase: str, outcomes: list[Outcome], before: dict, after: dict, view: dict) -> dict:
    ok = [o for o in outcomes if o.status == 200]
    latencies = [o.latency_ms for o in ok]
    window_s = max(o.done_s for o in outcomes) - min(o.sent_s for o in outcomes)

    def delta(*path: str) -> int:
        return _summed(after, path) - _summed(before, path)

    rows, steps, fills = delta("rows_run"), delta("steps_run"), delta("slots", "misses")
    acquires = fills + delta("slots", "hits")  # = rows, unless warms (ray_default_warm) acquired too
    engine_warm = {rid: set(s["slots"]["warm"]) for rid, s in after.items()}
    failures: dict[str, int] = {}
    examples: dict[str, str] = {}
    for outcome in outcomes:
        if outcome.status != 200:
            failures[str(outcome.status)] = failures.get(str(outcome.status), 0) + 1
            examples.setdefault(str(outcome.status), outcome.error)
    return {
        "phase": phase,
        "requests": len(outcomes),
        "ok": len(ok),
        "failed": len(outcomes) - len(ok),
        "failures": failures,
        "failure_examples": examples,
        "hit_rate": rounded(1 - fills / rows, 4) if rows else None,
        "slot_fills": fills,
        "rows_run": rows,
        "slot_acquires": acquires,
        "rows_per_step": rounded(delta("tokens_generated") / steps, 2) if steps else None,
        "rows_per_replica": {rid[-8:]: s["rows_run"] - before.get(rid, {}).get("rows_run", 0) for rid, s in after.items()},
        "swap_ms_p50": rounded(percentile([v for s in after.values() if (v := s["slots"]["swap_ms_p50"])], 50)),
        "p50_ms": rounded(percentile(latencies, 50), 1),
        "p99_ms": rounded(percentile(latencies, 99), 1),
        "max_ms": rounded(max(latencies), 1) if latencies else None,
        "tokens_per_s": rounded(sum(o.completion_tokens for o in ok) / window_s, 2),
        "requests_per_s": rounded(len(ok) / window_s, 3),
        "window_s": rounded(window_s, 1),
        "router_view_matches_engine": rounded(
            sum(_jaccard(set(view.get(rid, ())), warm) for rid, warm in engine_warm.items()) / len(engine_warm), 3
        ) if view else None,
        "router_view": {rid[-8:]: held for rid, held in view.items()},
        "engine_warm": {rid[-8:]: sorted(warm) for rid, warm in engine_warm.items()},
    }


# ---- main ----------------------------------------------------------------------------------


def simulation(quick: bool, seed: int) -> dict:
    """`routing_sim.run_simulation` with its 50% keys renamed `sim50_*`."""
    from benchmarks.routing_sim import run_simulation

    results = {}
    for key, value in run_simulation(quick=quick, seed=seed).items():
        if key.endswith("_50") and key.startswith("sim_"):
            key = "sim50_" + key.removeprefix("sim_").removesuffix("_50")
        results[key] = value
    return results


def load_average_1m() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.set_defaults(model=None)
    p.add_argument("--requests", type=int, default=None, help="per phase, warm-up included (default 300; --quick 80)")
    p.add_argument("--rate", type=float, default=None, help="arrivals/s (default: --utilization x measured capacity)")
    p.add_argument("--utilization", type=float, default=0.5,
                   help="arrival rate as a fraction of the replicas' base-model capacity with full batches")
    p.add_argument("--adapters", type=int, default=None, help="adapters in S3, Zipf(1.0) (default 32; --quick 24)")
    p.add_argument("--max-tokens", type=int, default=8, help="per request")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--slots", type=int, default=4, help="adapter slots per replica")
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--phases", default="affinity,ray_default", help=f"comma-separated, from {PHASES}")
    p.add_argument("--port", type=int, default=0, help="Serve's HTTP port (default: a free one)")
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--no-sim", action="store_true", help="skip the simulation")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end phases")
    p.add_argument("--worker-logs", action="store_true", help="Ray workers' logs on stderr (log_to_driver)")
    args = p.parse_args(argv)
    args.model = args.model or ("tiny" if args.quick else "smollm2")
    args.capacity_rps = None  # measured by the first phase unless --rate is given
    if args.threads is None:
        args.threads = 1  # the driver only sends HTTP; leave the cores to the replicas
    phases = [phase.strip() for phase in args.phases.split(",") if phase.strip()]
    if unknown := [phase for phase in phases if phase not in PHASES]:
        raise SystemExit(f"--phases: unknown {unknown}; choose from {PHASES}")
    engine_model = common.engine_model_name(args.model)  # SystemExit for llama-1b
    started = time.perf_counter()
    info = common.setup(args)
    args.requests = args.requests or (80 if args.quick else 300)
    args.adapters = args.adapters or (24 if args.quick else 32)

    results: dict = {}
    if not args.no_sim:
        results.update(simulation(args.quick, args.seed))
        log(f"simulation: affinity {results['sim_hit_rate_affinity']} vs ray_default "
            f"{results['sim_hit_rate_ray_default']} vs oracle {results['sim_hit_rate_oracle']} ({results['sim_wall_s']} s)")
    if not args.no_e2e:
        results.update(end_to_end(args, engine_model, phases))
    return common.emit(info, results, started)


def end_to_end(args, engine_model: str, phases: list[str]) -> dict:
    import ray

    from adapters_store.store import get_or_create_store
    from benchmarks.moto_s3 import moto_s3_server
    from lora_core.geometry import slot_geometry
    from lora_core.settings import EngineConfig, SourceInput, StoreConfig

    engine_config = EngineConfig(
        base_model=engine_model, compile="off", device="cpu", num_slots=args.slots,
        max_num_seqs=args.max_num_seqs, max_seq_len=128, max_new_tokens=max(32, args.max_tokens),
    )
    t0 = time.perf_counter()
    shapes = dict(slot_geometry(engine_config).module_shapes)
    ids = adapter_ids(args.adapters)
    ranks = common.mixed_ranks(len(ids), args.seed)
    files = {
        adapter_id: common.adapter_files(common.make_adapter(shapes, rank, seed=args.seed * 1000 + i))
        for i, (adapter_id, rank) in enumerate(zip(ids, ranks))
    }
    megabytes = sum(len(b) for f in files.values() for b in f.values()) / 1e6
    log(f"{len(ids)} adapters, ranks {min(ranks)}-{max(ranks)}, {megabytes:.0f} MB ({time.perf_counter() - t0:.1f} s)")
    arrivals: list[Arrival] = []

    def workload(url: str) -> list[Arrival]:
        """The first phase measures the capacity (unless --rate); every phase gets the same list."""
        if not arrivals:
            if args.rate is None:
                burst = args.replicas * args.max_num_seqs
                args.capacity_rps = base_capacity_rps(url, engine_model, burst, args.max_tokens, args.request_timeout)
                args.rate = args.utilization * args.capacity_rps
                log(f"capacity {args.capacity_rps:.2f} requests/s (base model, {burst} at once): rate {args.rate:.2f}/s")
            arrivals.extend(make_arrivals(ids, args.requests, args.rate, args.seed))
        return arrivals

    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    phase_results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-routing-") as tmp, moto_s3_server() as s3:
        s3.client.create_bucket(Bucket=BUCKET)
        for adapter_id, adapter_files in files.items():
            s3.put_adapter(BUCKET, f"{PREFIX}/{adapter_id}", adapter_files)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=args.worker_logs,
                 logging_config=ray.LoggingConfig(log_level="INFO"))
        try:
            store_config = StoreConfig(
                name="bench-routing-store", root=f"{tmp}/store", sync_interval_s=3600,
                sources=[SourceInput(uri=f"s3://{BUCKET}/{PREFIX}", options={"endpoint_url": s3.endpoint})],
            )
            t0 = time.perf_counter()
            store = get_or_create_store(store_config, engine_config)
            synced = lambda: ray_get(store.status.remote())["serving"] >= len(ids)  # noqa: E731
            common.wait_until(synced, 600, "the store's first sync", 0.2)
            log(f"store synced {len(ids)} adapters from S3 ({time.perf_counter() - t0:.1f} s)")
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            app_args = {
                "num_replicas": args.replicas,
                "replica_num_cpus": 1,
                "tenants": {"auth": "none"},
                "replica": {**engine_config.model_dump(mode="json"), "store": store_config.model_dump(mode="json")},
            }
            for phase in phases:
                phase_results[phase] = run_phase(phase, app_args, url, workload, args)
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
    common.wait_for_ray_exit()
    return e2e_results(args, phase_results, args.requests)


def e2e_results(args, phases: dict[str, dict], requests: int) -> dict:
    capacity = args.capacity_rps
    out: dict = {
        "e2e_requests": requests,
        "e2e_measured_requests": requests - max(1, int(requests * WARMUP_FRACTION)),
        "e2e_rate_rps": rounded(args.rate, 3),
        "e2e_capacity_rps": rounded(capacity, 3),
        "e2e_utilization_of_capacity": rounded(args.rate / capacity, 3) if capacity else None,
        "e2e_adapters": args.adapters,
        "e2e_replicas": args.replicas,
        "e2e_slots_per_replica": args.slots,
        "e2e_max_num_seqs": args.max_num_seqs,
        "e2e_max_tokens": args.max_tokens,
        "e2e_transport": "http",
    }
    for phase, result in phases.items():
        for key in ("hit_rate", "p50_ms", "p99_ms", "tokens_per_s", "requests_per_s", "rows_per_step", "failed",
                    "slot_fills", "swap_ms_p50", "router_view_matches_engine", "load_avg_1m"):
            out[f"e2e_{key}_{phase}"] = result[key]
    out["e2e_phases"] = phases
    affinity, ray_default = phases.get("affinity"), phases.get("ray_default")
    if affinity and ray_default and affinity["hit_rate"] is not None and ray_default["hit_rate"] is not None:
        out["e2e_goal_higher_hit_rate"] = affinity["hit_rate"] > ray_default["hit_rate"]
        out["e2e_p99_ratio"] = rounded(affinity["p99_ms"] / ray_default["p99_ms"], 3)
        out["e2e_goal_p99_le_0_8x"] = affinity["p99_ms"] <= GOAL_P99_RATIO * ray_default["p99_ms"]
    return out


if __name__ == "__main__":
    from benchmarks.routing import main as _main  # by its module name, so Ray pickles the replica class by reference

    _main()
    sys.exit(0)
