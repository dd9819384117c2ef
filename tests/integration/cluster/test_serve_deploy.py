"""`serve deploy` onto a running local cluster, as an operator runs it: the repo's serve_config.yaml
(on the tiny model, its store on folders here), then one deploy per kind of setting, while a client
sends requests the whole time. What changes in place changes in place (the same replica
processes); what needs a new engine is Serve's rolling update; no request fails.

  Router's user_config       tenants and keys
  LoraReplica's user_config  generation limits, routing weights, the store's sources, interval, pins
                             (and an override without `store` keeps the store; one naming a restart
                             setting fails the deploy, saying so, and the old replicas serve on)
  args.replica.num_slots     a new engine: every replica replaced, a few at a time"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import yaml

from benchmarks.common import wait_until
from lora_core.paths import REPO_ROOT
from tests.support.adapters import make_peft_adapter
from tests.support.ray_cluster import local_ray
from tests.support.ray_jobs import free_port

pytestmark = pytest.mark.integration

ACME, INITECH, ADMIN = "sk-acme-deploy-1", "sk-initech-deploy-1", "sk-admin-deploy-1"
REPLICA = {"base_model": "tiny-random-llama", "compile": "off", "num_slots": 2, "max_rank": 16, "max_num_seqs": 4,
           "max_seq_len": 128, "max_new_tokens": 16}
DEPLOY_TIMEOUT_S = 180


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def the_repos_config(http_port: int, store: dict) -> dict:
    """serve_config.yaml with the tiny model, test keys and this test's store and port."""
    config = yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())
    config["http_options"]["port"] = http_port
    args = config["applications"][0]["args"]
    args.update(demo_adapters=False, replica_num_cpus=0.5,
                tenants={"tenants": {"acme": {"keys": [ACME]}}, "admin_keys": [ADMIN]})
    args["replica"] = {**REPLICA, "store": store}
    return config


class Client(threading.Thread):
    """Completions for two store adapters and the base model, back to back, until stopped."""

    def __init__(self, base_url: str) -> None:
        super().__init__(daemon=True)
        self.base_url = base_url
        self.statuses: list[int] = []
        self.failures: list[str] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        models = ("acme/a", "acme/b", "tiny-random-llama")
        with httpx.Client(base_url=self.base_url, timeout=60) as http:
            while not self._stop_event.is_set():
                model = models[len(self.statuses) % len(models)]
                try:
                    response = http.post("/v1/completions", headers=auth(ACME),
                                         json={"model": model, "prompt": "hello", "max_tokens": 4})
                    status, text = response.status_code, response.text
                except httpx.HTTPError as error:
                    status, text = 0, repr(error)
                self.statuses.append(status)
                if status != 200:
                    self.failures.append(f"{model}: {status} {text[:200]}")

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=60)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-deploy")
    for seed, name in enumerate(("a", "b")):
        make_peft_adapter(root / "first" / "acme" / name, seed=seed)
    make_peft_adapter(root / "second" / "shared" / "late", seed=3)
    store = {"name": f"deploy-store-{root.name}", "root": str(root / "store"), "sources": [{"uri": str(root / "first")}]}
    http_port, dashboard_port = free_port(), free_port()
    with local_ray(http_port=http_port, dashboard_port=dashboard_port):
        yield {"root": root, "store": store, "config": the_repos_config(http_port, store),
               "base_url": f"http://127.0.0.1:{http_port}", "address": f"http://127.0.0.1:{dashboard_port}"}


def serve_deploy(cluster, config: dict, expect_failure: bool = False) -> str:
    """`serve deploy FILE -a ADDRESS`, then wait until the application runs its target (or, with
    `expect_failure`, until Serve gives up on it); the deployments' status messages."""
    from ray import serve

    path = cluster["root"] / f"deploy-{len(list(cluster['root'].glob('deploy-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    command = [str(Path(sys.executable).parent / "serve"), "deploy", str(path), "-a", cluster["address"]]
    done = subprocess.run(command, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]

    def settled() -> str | None:
        app = serve.status().applications.get("lora-serve")
        if app is None:
            return None
        messages = "\n".join(d.message for d in app.deployments.values())
        if expect_failure:
            return messages if app.status == "DEPLOY_FAILED" else None
        assert app.status != "DEPLOY_FAILED", messages
        running = app.status == "RUNNING" and all(
            d.status == "HEALTHY" and set(d.replica_states) == {"RUNNING"} for d in app.deployments.values())
        return messages or "running" if running else None

    return wait_until(settled, DEPLOY_TIMEOUT_S, "the deploy to finish", interval_s=0.5)


def actors() -> dict[str, set[str]]:
    """Deployment name -> the actor ids of its live replicas."""
    from ray.util.state import list_actors

    found: dict[str, set[str]] = {"Router": set(), "LoraReplica": set()}
    for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=1000):
        for name in found:
            if actor.class_name == f"ServeReplica:lora-serve:{name}":
                found[name].add(actor.actor_id)
    return found


def replica_stats() -> list[dict]:
    from ray import serve

    handle = serve.get_deployment_handle("LoraReplica", app_name="lora-serve")
    return [handle.stats.remote().result() for _ in range(8)]


def with_override(config: dict, name: str, user_config: dict) -> dict:
    config = copy.deepcopy(config)
    application = config["applications"][0]
    application["deployments"] = [d for d in application.get("deployments", []) if d["name"] != name]
    application["deployments"].append({"name": name, "user_config": user_config})
    return config


def test_each_kind_of_setting_is_deployed_with_no_failed_request(cluster):
    config = cluster["config"]
    serve_deploy(cluster, config)
    http = httpx.Client(base_url=cluster["base_url"], timeout=60)
    assert http.get("/v1/models", headers=auth(ACME)).status_code == 200
    started = actors()
    assert len(started["LoraReplica"]) == 2 and len(started["Router"]) == 1
    client = Client(cluster["base_url"])
    client.start()
    try:
        # the ingress's tenants and keys: a new tenant, the old keys still work
        assert http.get("/v1/models", headers=auth(INITECH)).status_code == 401
        tenants = {"tenants": {"acme": {"keys": [ACME]}, "initech": {"keys": [INITECH]}}, "admin_keys": [ADMIN]}
        config = with_override(config, "Router", {"tenants": tenants})
        serve_deploy(cluster, config)
        wait_until(lambda: http.get("/v1/models", headers=auth(INITECH)).status_code == 200, 30, "the new key")

        # the replicas' soft settings and the store's: limits, routing weights, a source, the interval, a pin
        store = {"sources": [*cluster["store"]["sources"], {"uri": str(cluster["root"] / "second")}],
                 "sync_interval_s": 1.0, "pins": {"acme/a": 2}}  # field by field: name and root stay
        config = with_override(config, "LoraReplica", {"max_new_tokens": 8, "routing_weights": {"miss_cost": 5.0},
                                                       "store": store})
        serve_deploy(cluster, config)
        stats = wait_until(lambda: (s := replica_stats()) and all(r["max_new_tokens"] == 8 for r in s) and s, 30,
                           "the new limit on every replica")
        assert all(r["routing_weights"] == {"miss_cost": 5.0} and r["engine_builds"] == 1 for r in stats)
        over = http.post("/v1/completions", headers=auth(ACME), json={"model": "acme/a", "prompt": "x", "max_tokens": 9})
        assert over.status_code == 400 and "limit of 8" in over.text
        status = http.get("/admin/store", headers=auth(ADMIN)).json()
        assert status["sync_interval_s"] == 1.0 and len(status["sources"]) == 2
        wait_until(lambda: http.post("/v1/completions", headers=auth(INITECH), json={
            "model": "shared/late", "prompt": "x", "max_tokens": 2}).status_code == 200, 30, "the new source's adapter")

        def pinned_on() -> set[str]:
            reports = http.get("/admin/adapters/acme/a", headers=auth(ADMIN)).json()["replicas"]
            return {r["replica_id"] for r in reports if r["pinned"] and r["slot"] is not None}

        wait_until(lambda: len(pinned_on()) == 2, 30, "the config's pin on both replicas")
        assert actors() == started  # nothing restarted

        # an override that leaves the store out keeps it: its adapters still serve
        config = with_override(config, "LoraReplica", {"max_new_tokens": 12})
        serve_deploy(cluster, config)
        wait_until(lambda: all(r["max_new_tokens"] == 12 for r in replica_stats()), 30, "the limit of 12")
        late = http.post("/v1/completions", headers=auth(INITECH), json={"model": "shared/late", "prompt": "x",
                                                                        "max_tokens": 2})
        assert late.status_code == 200, late.text
        assert actors() == started

        # a user_config asking for what needs a new engine: the deploy fails saying so, and Serve keeps
        # serving from the previous version's replicas (the one it tried to update is stopped)
        bad = with_override(config, "LoraReplica", {"max_new_tokens": 12, "num_slots": 3})
        message = serve_deploy(cluster, bad, expect_failure=True)
        assert "num_slots need a new engine: set them under args.replica" in message, message[-2000:]
        assert http.get("/v1/models", headers=auth(ACME)).status_code == 200

        # what needs a new engine: Serve's rolling update replaces the replicas
        config = copy.deepcopy(config)
        config["applications"][0]["args"]["replica"]["num_slots"] = 3
        serve_deploy(cluster, config)
        replaced = actors()
        assert replaced["LoraReplica"].isdisjoint(started["LoraReplica"]) and len(replaced["LoraReplica"]) == 2
        assert all(r["num_slots"] == 3 and r["max_new_tokens"] == 12 for r in replica_stats())
        assert http.get("/v1/models", headers=auth(INITECH)).status_code == 200  # the override outlives it
    finally:
        client.stop()
        http.close()
    assert len(client.statuses) > 20, client.statuses
    assert client.failures == [], client.failures[:5]
