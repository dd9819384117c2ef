"""Update propagation: a new adapter version in S3 -> in the slots of every replica that has it warm.

    python -m benchmarks.propagation [--quick] [--model smollm2|tiny] [--sync-interval 2.0]

Setup (all real, on this machine): a local Ray (`num_cpus=2`), moto's S3 server over HTTP, the
AdapterStore actor watching `s3://bench/prod` every `--sync-interval` s, and `--replicas` (2)
`LoraReplica` Serve replicas (num_cpus 1 each, compile off, 4 slots) that use it. The rank-16
adapter `acme/bench` (q,k,v,o) is made warm on every replica by sending requests until the
store's `status()["replicas"]` lists it on all of them. Then `--clients` threads send requests
for it through the handle without pause (max_tokens 4) for the whole run, counting failures.

Loop (`--updates` times, 10; --quick 4): wait a random 0.3 s to max(1.5, 0.3 + sync interval) s,
put a new version (new seed, same config) to S3, and time from the put's return
until every replica that had the adapter warm reports the new version in its slot
(`store.replica_versions`, what the replica said on its last long poll: it polls again right
after a swap). The driver polls the store every `--tick-ms` (20) ms.
Why the wait spans a whole sync period: each put follows the previous update's end, which comes
a fixed ~0.5 s after a sync tick; a wait of only 0.3-1.5 s with a 2 s interval then never puts
right after a listing (the worst case), so the maximum would be understated.

Where the time goes, per update (in the JSON as `breakdown`: p50 and max over the updates):
  detect_s     put -> the start of the store's sync that saw it: the wait for the sync tick
               (estimated from the store's sync end times: the previous sync's end + interval).
  fetch_s      that sync: list + download + validate + keep a copy (-> the record's `updated_at`).
  store_s      put -> the registry serves the new version (= detect_s + fetch_s).
  publish_s    -> the change feed carries it (the store re-reads its copy and puts the payload
               into the object store first; seen through `status()["seq"]`, every 50 ms).
  apply_s      -> the last replica reports the new version in its slot: the long poll returns,
               locate + object-store get + prepare (validation), the swap waiting for the batch
               in flight (`replica_stats.mean_step_s` says how long one takes), the copy, and the
               next poll carrying the report back.
  replicas_s   publish_s + apply_s.
Goal: propagation max <= sync interval + 0.5 s, and 0 failed requests.
"""

from __future__ import annotations

import random
import sys
import tempfile
import threading
import time
from datetime import datetime

from benchmarks import common
from benchmarks.common import log, percentile, rounded

ADAPTER_ID = "acme/bench"
BUCKET, PREFIX = "bench", "prod"
RANK = 16


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--sync-interval", type=float, default=2.0, help="the store's sync_interval_s")
    p.add_argument("--updates", type=int, default=None, help="default: 10 (--quick: 4)")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--clients", type=int, default=4, help="threads sending requests without pause")
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--tick-ms", type=float, default=20.0, help="how often the driver asks the store")
    p.add_argument("--update-timeout", type=float, default=60.0, help="give up on one update after this")
    p.add_argument("--worker-logs", action="store_true", help="Ray workers' INFO logs on stderr (log_to_driver)")
    args = p.parse_args(argv)
    if args.threads is None:
        args.threads = 1  # the driver does little torch work; leave the cores to the replicas
    started = time.perf_counter()
    info = common.setup(args)
    updates = args.updates or (4 if args.quick else 10)
    rng = random.Random(args.seed)

    import ray
    from ray import serve

    if ray.is_initialized():
        raise SystemExit("this benchmark starts its own local Ray (and its S3 env first): ray.shutdown() before")

    from adapters_store.store import get_or_create_store
    from benchmarks.moto_s3 import moto_s3_server
    from deployments.contracts import GenerationRequest, SamplingParams
    from deployments.replica import LoraReplica
    from lora_core.settings import SourceInput, StoreConfig

    engine_config, shapes = common.store_bench_engine(args.model)
    versions = [common.adapter_files(common.make_adapter(shapes, RANK, seed=args.seed * 1000 + i)) for i in range(updates + 1)]
    size = sum(len(b) for b in versions[0].values())
    log(f"{updates + 1} versions of {ADAPTER_ID} (rank {RANK}, {size / 1e6:.2f} MB each) ready")

    key_prefix = f"{PREFIX}/{ADAPTER_ID}"
    failures: list[str] = []
    latencies: list[float] = []
    served = [0]
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-propagation-") as tmp, moto_s3_server() as s3:
        s3.client.create_bucket(Bucket=BUCKET)
        s3.put_adapter(BUCKET, key_prefix, versions[0])
        ray.init(
            num_cpus=2, include_dashboard=False, log_to_driver=args.worker_logs,
            logging_config=ray.LoggingConfig(log_level="INFO"),
        )
        stop = threading.Event()
        threads: list[threading.Thread] = []
        store = None
        try:
            store_config = StoreConfig(
                name="bench-propagation-store", root=f"{tmp}/store", sync_interval_s=args.sync_interval,
                sources=[SourceInput(uri=f"s3://{BUCKET}/{PREFIX}", options={"endpoint_url": s3.endpoint})],
            )
            t0 = time.perf_counter()
            store = get_or_create_store(store_config, engine_config)
            common.wait_until(lambda: ray.get(store.status.remote())["serving"] >= 1, 300, "the store's first sync")
            log(f"store up and serving {ADAPTER_ID} ({time.perf_counter() - t0:.1f} s)")

            serve.start(proxy_location="Disabled")
            settings = {**engine_config.model_dump(mode="json"), "store": store_config.model_dump(mode="json")}
            t0 = time.perf_counter()
            handle = serve.run(
                LoraReplica.options(
                    num_replicas=args.replicas, ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32,
                ).bind(settings),
                name="propagation", route_prefix=None,
            )
            log(f"{args.replicas} replicas up ({time.perf_counter() - t0:.1f} s)")
            request = GenerationRequest(
                ADAPTER_ID, SamplingParams(max_tokens=args.max_tokens, temperature=0.0), prompt="Tell me a story about"
            )

            # Warm on every replica: requests until the store hears from each that it holds it.
            def warm_everywhere():
                for response in [handle.generate.remote(request) for _ in range(2 * args.replicas)]:
                    response.result()
                replicas = ray.get(store.status.remote())["replicas"]
                warm = sorted(r for r, ids in replicas.items() if ADAPTER_ID in ids)
                return warm if len(warm) >= args.replicas else None

            t0 = time.perf_counter()
            warm_replicas = common.wait_until(warm_everywhere, 180, f"{ADAPTER_ID} warm on {args.replicas} replicas", 0.2)
            log(f"{ADAPTER_ID} warm on {warm_replicas} ({time.perf_counter() - t0:.1f} s)")

            def client() -> None:
                while not stop.is_set():
                    try:
                        t_request = time.monotonic()
                        handle.generate.remote(request).result(timeout_s=60)
                        latencies.append(time.monotonic() - t_request)
                        served[0] += 1
                    except Exception as error:  # counted, never raised: an update must not fail one
                        failures.append(f"{type(error).__name__}: {error}"[:300])

            # Counters before the load starts (idle replicas: the handle reaches each of them).
            stats_before = replica_stats(handle, args.replicas)
            served_before, window_started = served[0], time.monotonic()
            threads = [threading.Thread(target=client, name=f"client-{i}", daemon=True) for i in range(args.clients)]
            for thread in threads:
                thread.start()

            sync_ends = StoreWatcher(ray, store)
            sync_ends.start()
            time.sleep(1.0)  # the clients reach a steady state
            measured = []
            gap_max_s = max(1.5, 0.3 + args.sync_interval)  # every phase of the sync tick
            for i in range(1, updates + 1):
                time.sleep(rng.uniform(0.3, gap_max_s))
                measured.append(one_update(ray, store, s3, key_prefix, versions[i], args, i))
                log(f"update {i}/{updates}: {measured[-1]['summary']}")
            sync_ends.stop()
            for row in measured:
                row.update(sync_ends.split(row, args.sync_interval))
            stop.set()
            for thread in threads:
                thread.join(timeout=90)
            window_s = time.monotonic() - window_started
            served_during = served[0] - served_before
            stats_after = replica_stats(handle, args.replicas)
            results = summarize(measured, args, failures, served[0], served_during, latencies, window_s,
                                stats_before, stats_after, warm_replicas)
        finally:
            stop.set()
            common.shut_down_ray(store)
    return common.emit(info, results, started)


def one_update(ray, store, s3, key_prefix: str, files: dict[str, bytes], args, index: int) -> dict:
    """Put a new version, then poll until every replica with the adapter warm reports it."""
    before, status = ray.get([store.get.remote(ADAPTER_ID), store.status.remote()])
    old_version = before["serving"]["version"]
    warm_on = list(before["warm_on"])
    put_started = time.monotonic()
    s3.put_adapter(BUCKET, key_prefix, files)
    put_done, put_wall = time.monotonic(), time.time()
    tick = args.tick_ms / 1000
    deadline = put_done + args.update_timeout
    new_version, store_seen, reported = None, None, {}
    record = None
    while time.monotonic() < deadline:
        refs = [store.get.remote(ADAPTER_ID)] + [store.replica_versions.remote(r) for r in warm_on]
        record, *replica_versions = ray.get(refs)
        now = time.monotonic()
        serving = record["serving"]["version"]
        if new_version is None and serving != old_version:
            new_version, store_seen = serving, now
        if new_version is not None:
            for replica, held in zip(warm_on, replica_versions):
                if replica not in reported and held.get(ADAPTER_ID) == new_version:
                    reported[replica] = now
            if len(reported) == len(warm_on):
                break
        time.sleep(tick)
    else:
        raise TimeoutError(f"update {index}: not on every replica after {args.update_timeout} s: "
                           f"store {'saw' if new_version else 'did not see'} it, reported by {sorted(reported)}")
    ready_wall = _timestamp(record["serving"]["updated_at"])
    propagation = max(reported.values()) - put_done
    return {
        "update": index,
        "put_s": put_done - put_started,
        "put_wall": put_wall,
        "seq_after": status["seq"] + 1,
        "done_wall": put_wall + propagation,
        "ready_wall": ready_wall,
        "propagation_s": propagation,
        "store_s": ready_wall - put_wall,
        "store_seen_s": store_seen - put_done,
        "replicas_s": propagation - (ready_wall - put_wall),
        "per_replica_s": {r: t - put_done for r, t in reported.items()},
        "summary": f"{propagation:.2f} s (store serving after {ready_wall - put_wall:.2f} s, "
                   f"replicas +{propagation - (ready_wall - put_wall):.2f} s; put took {put_done - put_started:.2f} s)",
    }


class StoreWatcher:
    """A thread that asks the store's `status()` every 50 ms and records the end time of each
    sync (the source's `last_success_at`) and when each change-feed `seq` was first seen, to
    split an update's time into: the wait for the sync tick, the sync's own work, the publish
    (payload into the object store, then the feed), and the replicas' part."""

    def __init__(self, ray, store) -> None:
        self._ray, self._store = ray, store
        self.ends: set[float] = set()
        self.seq_seen: dict[int, float] = {}  # feed seq -> wall time first seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="store-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status = self._ray.get(self._store.status.remote(), timeout=10)
                now = time.time()
                self.seq_seen.setdefault(status["seq"], now)
                for source in status["sources"]:
                    if source["last_success_at"]:
                        self.ends.add(_timestamp(source["last_success_at"]))
            except Exception:
                pass
            self._stop.wait(0.05)

    def split(self, row: dict, interval_s: float) -> dict:
        """detect_s: put -> the detecting sync's start (previous sync end + interval);
        fetch_s: that start -> the registry serves it; publish_s: -> the feed carries it;
        apply_s: -> the last replica reported it."""
        out: dict = {"detect_s": None, "fetch_s": None, "publish_s": None, "apply_s": None}
        earlier = [t for t in self.ends if t < row["ready_wall"] - 1e-3]
        if earlier:
            sync_start = max(earlier) + interval_s
            out["detect_s"] = sync_start - row["put_wall"]
            out["fetch_s"] = row["ready_wall"] - sync_start
        published = [t for seq, t in self.seq_seen.items() if seq >= row["seq_after"] and t >= row["ready_wall"]]
        if published:
            out["publish_s"] = min(published) - row["ready_wall"]
            out["apply_s"] = row["done_wall"] - min(published)
        return out


def _timestamp(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _dist(values: list) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"p50": None, "max": None}
    return {"p50": rounded(percentile(values, 50)), "max": rounded(max(values))}


def replica_stats(handle, replicas: int, tries: int = 40) -> dict[str, dict]:
    """replica id -> its `stats()`, asking through the handle until every replica answered."""
    found: dict[str, dict] = {}
    for _ in range(tries):
        stats = handle.stats.remote().result(timeout_s=60)
        found[stats["replica_id"]] = stats
        if len(found) >= replicas:
            break
    return found


def summarize(measured, args, failures, served_total, served_during, latencies, window_s,
              stats_before, stats_after, warm_replicas) -> dict:
    propagation = [row["propagation_s"] for row in measured]
    goal_max_s = args.sync_interval + 0.5
    by_replica: dict[str, dict] = {}
    for replica_id, after in stats_after.items():
        before = stats_before.get(replica_id)
        steps = after["steps_run"] - before["steps_run"] if before else None
        by_replica[replica_id] = {
            "steps_under_load": steps,
            "rows_under_load": after["rows_run"] - before["rows_run"] if before else None,
            # the replica is busy all along, so this is about how long one decode step takes, i.e.
            # how long a new version can wait before the next request admitted takes it
            "mean_step_s": rounded(window_s / steps) if steps else None,
            "swaps": after["slots"]["swaps"],
            "swap_ms_p50": rounded(after["slots"]["swap_ms_p50"]),
            "swap_ms_p99": rounded(after["slots"]["swap_ms_p99"]),
        }
    results = {
        "sync_interval_s": args.sync_interval,
        "updates": len(measured),
        "replicas": args.replicas,
        "warm_replicas": len(warm_replicas),
        "clients": args.clients,
        "max_tokens": args.max_tokens,
        "adapter_rank": RANK,
        "propagation_p50_s": rounded(percentile(propagation, 50)),
        "propagation_max_s": rounded(max(propagation)),
        "propagation_s": [rounded(v) for v in propagation],
        "failed_requests": len(failures),
        "failure_examples": sorted(set(failures))[:3],
        "requests_served": served_total,
        "requests_served_under_load": served_during,
        "request_latency_p50_s": rounded(percentile(latencies, 50)),
        "request_latency_p99_s": rounded(percentile(latencies, 99)),
        "load_window_s": rounded(window_s, 1),
        "breakdown": {
            key: _dist([row.get(key) for row in measured])
            for key in ("detect_s", "fetch_s", "store_s", "publish_s", "apply_s", "replicas_s", "put_s")
        },
        "replica_stats": by_replica,
        "goal_max_s": goal_max_s,
    }
    results["goal_propagation_max_le_interval_plus_0_5"] = max(propagation) <= goal_max_s
    results["goal_0_failed_requests"] = not failures
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
