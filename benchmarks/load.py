"""Three tenants under load, one flooding: statuses, latencies, the quiet tenant's p99 alone and
under the flood, and the replicas' memory growth.

    python -m benchmarks.load [--quick] [--model tiny|smollm2] [--duration-s S] [--flood-users N]
                              [--flood-rate-per-s R] [--flood-wait-s W]

locust (installed under .cache/locust-venv on first use) runs headless in its own process
against the local app (`build_app`: 2 replicas of 1 CPU, auth keys, each tenant rate-limited
to `--rate-per-s` with a burst as large, one adapter per tenant from a local store source).
  alone   acme, 1 user with a 0.5 s pause, for `--alone-s`
  flood   acme as before, globex 2 users with a 0.5 s pause, initech `--flood-users` users
          with no pause (`--flood-wait-s`), for `--duration-s`
Prints requests, status_counts, errors_5xx (5xx but 503 with Retry-After), retry_after_503,
p50_ms and p99_ms (200s of the flood phase), p99_quiet_tenant_ms_alone,
p99_quiet_tenant_ms_with_flood and rss_growth_mb (the replicas' RSS before the flood phase and
after it, summed).
Goals: errors_5xx == 0; p99 quiet with flood <= 2x alone; rss_growth_mb < 50.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common
from benchmarks.common import log, percentile

APP = "lora-serve"
TENANTS = {"acme": "sk-load-acme-0001", "globex": "sk-load-globex-01", "initech": "sk-load-initech-1"}
FLOODER = "initech"
LOCUST_VENV = common.REPO_ROOT / ".cache" / "locust-venv"
LOCUST_VERSION = "2.47.0"


def locust_bin() -> Path:
    """locust in a venv of its own under .cache (gevent stays out of the project's venv)."""
    binary = LOCUST_VENV / "bin" / "locust"
    if not binary.exists():
        log(f"installing locust {LOCUST_VERSION} into {LOCUST_VENV}")
        subprocess.run([sys.executable, "-m", "venv", str(LOCUST_VENV)], check=True)
        subprocess.run([str(LOCUST_VENV / "bin" / "pip"), "install", "-q", f"locust=={LOCUST_VERSION}"], check=True)
    return binary


def rate_limit(requests_per_s: float) -> dict:
    return {"requests_per_s": requests_per_s, "burst": max(1, int(requests_per_s))}


def app_args(model: str, source: str, store_root: str, rate_per_s: float, flood_rate_per_s: float | None = None) -> dict:
    tenants = {t: {"keys": [k]} for t, k in TENANTS.items()}
    if flood_rate_per_s is not None:
        tenants[FLOODER]["rate_limit"] = rate_limit(flood_rate_per_s)
    return {
        "num_replicas": 2, "replica_num_cpus": 1, "max_queued_requests": 32,
        "tenants": {"tenants": tenants, "rate_limit": rate_limit(rate_per_s)},
        "replica": {"base_model": common.engine_model_name(model), "compile": "off", "num_slots": 4,
                    "max_num_seqs": 4, "max_seq_len": 128, "max_new_tokens": 32, "torch_threads": 1,
                    "store": {"name": "bench-load-store", "root": store_root, "sync_interval_s": 5,
                              "sources": [{"uri": source}]}},
    }


def write_adapters(model: str, folder: Path, seed: int) -> None:
    _, shapes = common.store_bench_engine(model)
    for index, tenant in enumerate(TENANTS):
        adapter = common.make_adapter(shapes, rank=8, seed=seed * 100 + index)
        target = folder / tenant / "a"
        target.mkdir(parents=True)
        for name, data in common.adapter_files(adapter).items():
            (target / name).write_bytes(data)


def replica_rss_bytes() -> int:
    import psutil
    from ray.util.state import list_actors

    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
    pids = [a.pid for a in actors if "LoraReplica" in (a.class_name or "")]
    return sum(psutil.Process(pid).memory_info().rss for pid in pids)


def run_locust(url: str, users: dict[str, tuple[int, float]], duration_s: float, max_tokens: int, out: Path) -> dict:
    env = {**os.environ, "LOAD_USERS": ",".join(f"{t}:{n}:{w}" for t, (n, w) in users.items()),
           "LOAD_KEYS": ",".join(f"{t}:{k}" for t, k in TENANTS.items()), "LOAD_OUT": str(out),
           "LOAD_MAX_TOKENS": str(max_tokens)}
    total = sum(n for n, _ in users.values())
    command = [str(locust_bin()), "-f", str(Path(__file__).with_name("load_locustfile.py")), "--headless",
               "-H", url, "-u", str(total), "-r", str(total), "-t", f"{int(duration_s)}s", "--only-summary",
               "--stop-timeout", "30", "--loglevel", "WARNING"]
    subprocess.run(command, env=env, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   timeout=duration_s + 120)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.set_defaults(model="tiny")
    p.add_argument("--duration-s", type=float, default=None, help="the flood phase (default 60, --quick 30)")
    p.add_argument("--alone-s", type=float, default=None, help="the quiet tenant alone (default 30, --quick 20)")
    p.add_argument("--flood-users", type=int, default=16)
    p.add_argument("--rate-per-s", type=float, default=10.0, help="each tenant's rate limit")
    p.add_argument("--flood-rate-per-s", type=float, default=None,
                   help="the flooding tenant's own rate limit (default --rate-per-s); to tell 429 churn from busy rows")
    p.add_argument("--flood-wait-s", type=float, default=0.0, help="the flooding users' pause between requests")
    p.add_argument("--max-tokens", type=int, default=16)
    args = p.parse_args(argv)
    args.duration_s = args.duration_s or (30.0 if args.quick else 60.0)
    args.alone_s = args.alone_s or (20.0 if args.quick else 30.0)
    args.threads = args.threads or 1
    started = time.perf_counter()
    info = common.setup(args)
    locust_bin()

    from ray import serve

    from benchmarks.local_cluster import free_port, multi_node_ray
    from deployments.app import build_app

    http_port = free_port()
    url = f"http://127.0.0.1:{http_port}"
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp, \
            multi_node_ray(1, cpus_per_node=2, http_port=http_port, dashboard_port=free_port()):
        write_adapters(args.model, Path(tmp) / "src", args.seed)
        serve.run(build_app(app_args(args.model, str(Path(tmp) / "src"), str(Path(tmp) / "store"), args.rate_per_s,
                                     args.flood_rate_per_s)), name=APP, route_prefix="/")
        common.wait_until(lambda: _models_listed(url), 120, "the store's first sync", interval_s=0.5)
        log(f"phase alone: acme only, {args.alone_s:.0f} s")
        alone = run_locust(url, {"acme": (1, 0.5)}, args.alone_s, args.max_tokens, Path(tmp) / "alone.json")
        rss_before = replica_rss_bytes()
        log(f"phase flood: initech x{args.flood_users}, {args.duration_s:.0f} s")
        flood = run_locust(url, {"acme": (1, 0.5), "globex": (2, 0.5), FLOODER: (args.flood_users, args.flood_wait_s)},
                           args.duration_s, args.max_tokens, Path(tmp) / "flood.json")
        rss_after = replica_rss_bytes()
        serve.delete(APP)
    return common.emit(info, summarize(alone, flood, rss_before, rss_after), started)


def _models_listed(url: str) -> bool:
    import httpx

    try:
        listed = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {TENANTS['acme']}"}, timeout=5)
    except httpx.HTTPError:
        return False
    return listed.status_code == 200 and any(card["id"] == "acme/a" for card in listed.json()["data"])


def summarize(alone: dict, flood: dict, rss_before: int, rss_after: int) -> dict:
    counts: dict[str, int] = {}
    for result in flood.values():
        for status, count in result["status_counts"].items():
            counts[status] = counts.get(status, 0) + count
    retry_after = sum(result["retry_after_503"] for result in flood.values())
    errors_5xx = sum(count for status, count in counts.items() if int(status) >= 500) - retry_after
    latencies = sorted(ms for result in flood.values() for ms in result["latencies_ms"])
    quiet_alone = sorted(alone.get("acme", {}).get("latencies_ms", []))
    quiet_flood = sorted(flood.get("acme", {}).get("latencies_ms", []))
    p99_alone, p99_flood = percentile(quiet_alone, 99), percentile(quiet_flood, 99)
    ratio = p99_flood / p99_alone if p99_alone else None
    growth_mb = (rss_after - rss_before) / 2**20
    results = {
        "requests": sum(counts.values()), "status_counts": dict(sorted(counts.items())),
        "status_counts_by_tenant": {t: r["status_counts"] for t, r in sorted(flood.items())},
        "errors_5xx": errors_5xx, "retry_after_503": retry_after,
        "p50_ms": round(percentile(latencies, 50), 1) if latencies else None,
        "p99_ms": round(percentile(latencies, 99), 1) if latencies else None,
        "p99_quiet_tenant_ms_alone": round(p99_alone, 1) if quiet_alone else None,
        "p99_quiet_tenant_ms_with_flood": round(p99_flood, 1) if quiet_flood else None,
        "quiet_p99_ratio": round(ratio, 2) if ratio else None,
        "quiet_requests_alone": len(quiet_alone), "quiet_requests_with_flood": len(quiet_flood),
        "rss_growth_mb": round(growth_mb, 1),
    }
    results["goals_met"] = {"no_5xx": errors_5xx == 0, "quiet_p99_within_2x": ratio is not None and ratio <= 2.0,
                            "rss_growth_under_50_mb": growth_mb < 50}
    log(f"load: {results}")
    return results


if __name__ == "__main__":
    main()
