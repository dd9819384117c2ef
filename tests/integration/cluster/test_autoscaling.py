"""Autoscaling across nodes: a 3-node local cluster (`ray.cluster_utils.Cluster`, one 1-CPU
replica per node), the adapter-aware policy, adapters on moto's S3.

A load step scales LoraReplica from 1 to 3 replicas, which land on the other two nodes, prewarm
the most requested adapters and serve them with S3 down (so their weights came through Ray's
object store, from the store's node); the load ends and it scales back in; no request fails.
Run alone with `pytest -m multinode`."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from benchmarks.common import wait_until
from benchmarks.local_cluster import multi_node_ray, replica_nodes
from benchmarks.moto_s3 import moto_s3_server
from tests.support.adapters import make_peft_adapter
from tests.support.ray_jobs import free_port

pytestmark = [pytest.mark.integration, pytest.mark.multinode]

ADAPTERS = ("acme/a", "acme/b", "acme/c")
APP = "lora-serve"


def app_args(bucket: str, endpoint: str, root: str) -> dict:
    return {
        "replica_num_cpus": 1,
        "tenants": {"auth": "none"},
        "autoscaling": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2, "upscale_delay_s": 1,
                        "downscale_delay_s": 4, "look_back_period_s": 2, "metrics_interval_s": 0.5},
        "replica": {"base_model": "tiny-random-llama", "compile": "off", "num_slots": 2, "max_rank": 16,
                    "max_num_seqs": 2, "max_seq_len": 128, "max_new_tokens": 32, "prewarm_adapters": 2,
                    "store": {"name": "autoscale-store", "root": root, "sync_interval_s": 2,
                              "sources": [{"uri": f"s3://{bucket}/adapters", "options": {"endpoint_url": endpoint}}]}},
    }


class Load(threading.Thread):
    """`clients` callers, each sending completions back to back (mostly acme/a, then b, c)."""

    def __init__(self, base_url: str, clients: int) -> None:
        super().__init__(daemon=True)
        self.base_url, self.clients = base_url, clients
        self.statuses: list[int] = []
        self.failures: list[str] = []
        self._stop_event = threading.Event()

    def _caller(self, index: int) -> None:
        models = ("acme/a", "acme/a", "acme/b", "acme/a", "acme/c")
        with httpx.Client(base_url=self.base_url, timeout=120) as http:
            sent = index
            while not self._stop_event.is_set():
                model = models[sent % len(models)]
                sent += 1
                try:
                    response = http.post("/v1/completions", json={"model": model, "prompt": "hello", "max_tokens": 32,
                                                                   "ignore_eos": True})
                    status, text = response.status_code, response.text
                except httpx.HTTPError as error:
                    status, text = 0, repr(error)
                self.statuses.append(status)
                if status != 200:
                    self.failures.append(f"{model}: {status} {text[:300]}")

    def run(self) -> None:
        threads = [threading.Thread(target=self._caller, args=(i,), daemon=True) for i in range(self.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=120)


def running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    return app.deployments["LoraReplica"].replica_states.get("RUNNING", 0) if app is not None else 0


def test_a_load_step_spreads_replicas_over_the_nodes_and_back_with_no_failed_request(tmp_path):
    from ray import serve

    from deployments.app import build_app

    http_port = free_port()
    with moto_s3_server() as s3, multi_node_ray(3, cpus_per_node=1, http_port=http_port,
                                                 dashboard_port=free_port()) as cluster:
        s3.client.create_bucket(Bucket="scaling")
        for seed, adapter_id in enumerate(ADAPTERS):
            folder = make_peft_adapter(tmp_path / "made" / adapter_id, seed=seed)
            s3.put_adapter("scaling", f"adapters/{adapter_id}", {p.name: p.read_bytes() for p in folder.iterdir()})
        serve.run(build_app(app_args("scaling", s3.endpoint, str(tmp_path / "store"))), name=APP, route_prefix="/")
        base_url = f"http://127.0.0.1:{http_port}"
        with httpx.Client(base_url=base_url, timeout=60) as http:
            for adapter_id in ADAPTERS:  # what the store counts as requested: acme/a most
                for _ in range(3 if adapter_id == "acme/a" else 1):
                    assert http.post("/v1/completions", json={"model": adapter_id, "prompt": "hi",
                                                              "max_tokens": 2}).status_code == 200
        first = replica_nodes(APP)
        assert running_replicas() == 1 and len(first) == 1
        s3.stop()  # from here on, a replica's adapter can only come from Ray's object store

        load = Load(base_url, clients=8)
        load.start()
        try:
            started_s = time.monotonic()
            wait_until(lambda: running_replicas() == 3, 120, "autoscaling to 3 replicas", interval_s=0.5)
            scale_up_s = time.monotonic() - started_s
            time.sleep(3)  # the new replicas take traffic
            nodes = replica_nodes(APP)
            assert len(set(nodes.values())) == 3  # one replica per node: spread over all three
            stats = wait_until(lambda: (found := _every_replica_stats(3)) and found, 30, "each replica's stats")
        finally:
            load.stop()
        new = [s for s in stats if s["replica_actor_id"] not in first]
        assert len(new) == 2
        assert all(s["prewarmed"] and s["prewarmed"][0] == "acme/a" for s in new), [s["prewarmed"] for s in new]
        assert all(s["host_cache"]["misses"] >= 1 and s["slots"]["hits"] >= 1 for s in new)  # loaded, served; S3 down
        with httpx.Client(base_url=base_url, timeout=60) as http:
            health = http.get("/healthz")
            assert health.status_code == 200 and health.json()["store"] == "degraded", health.text
            assert health.json()["sources_unreachable"] == 1 and s3.endpoint not in health.text
            store = http.get("/admin/store").json()
            assert store["status"] == "degraded" and store["sources"][0]["reachable"] is False
            assert store["serving"] == len(ADAPTERS)  # nothing dropped while S3 is down

        started_s = time.monotonic()
        wait_until(lambda: running_replicas() == 1, 120, "scaling back in to 1 replica", interval_s=0.5)
        scale_down_s = time.monotonic() - started_s
        assert len(load.statuses) > 20
        assert load.failures == [], load.failures[:5]
        s3.start()
        with httpx.Client(base_url=base_url, timeout=60) as http:
            assert http.post("/admin/sync").status_code == 200
            assert http.get("/healthz").json()["store"] == "ok"
            assert http.get("/admin/store").json()["status"] == "ok"
            assert http.post("/v1/completions", json={"model": "acme/b", "prompt": "hi", "max_tokens": 2}).status_code == 200
        print(f"scale up {scale_up_s:.1f} s, down {scale_down_s:.1f} s, {len(load.statuses)} requests, "
              f"nodes {sorted(set(nodes.values()))}")
        assert cluster is not None


def _every_replica_stats(expected: int) -> list[dict] | None:
    from ray import serve

    handle = serve.get_deployment_handle("LoraReplica", app_name=APP)
    found = {}
    for response in [handle.stats.remote() for _ in range(4 * expected)]:  # at once: the router spreads them
        stats = response.result()
        found[stats["replica_actor_id"]] = stats
    return list(found.values()) if len(found) == expected else None
