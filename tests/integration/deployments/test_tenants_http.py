"""Tenants, the admin API and overload, end to end: a real local Ray, the app with the demo keys
and an adapter store on a local folder, real HTTP (httpx and the openai SDK)."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import pytest

from benchmarks.common import wait_until
from tests.integration.deployments.test_serve_http import BASE_URL
from tests.support.ray_cluster import local_ray
from tests.support.ray_jobs import free_port, run_job

pytestmark = pytest.mark.integration

BASE_MODEL = "tiny-random-llama"
DASHBOARD_PORT = free_port()
ACME, GLOBEX, ADMIN = ("Bearer sk-acme-demo", "Bearer sk-globex-demo", "Bearer sk-admin-demo")
INITECH = "Bearer sk-initech-limited"  # a tenant with a tight rate limit


def auth(key: str) -> dict:
    return {"Authorization": key}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from tests.support.adapters import make_peft_adapter

    root = tmp_path_factory.mktemp("tenants")
    source = root / "source"
    for seed, adapter_id in enumerate(("acme/pirate", "globex/poet", "shared/french")):
        make_peft_adapter(source / adapter_id, seed=seed)
    return {
        "root": root,
        "source": source,
        "store": root / "store",
        "extra": make_peft_adapter(root / "extra", seed=5, r=4),
        "too_big": make_peft_adapter(root / "too_big", seed=6, r=32),
    }


def with_limited_tenant(tenants: dict) -> dict:
    """The demo tenants and initech, whose rate limit is tight."""
    limited = {"keys": [INITECH.split()[1]], "rate_limit": {"requests_per_s": 0.2, "burst": 2}}
    return {**tenants, "tenants": {**tenants["tenants"], "initech": limited}}


@pytest.fixture(scope="module")
def served(folders):
    from ray import serve

    from deployments.app import build_app
    from deployments.tenants import demo_tenants_config

    with local_ray(dashboard_port=DASHBOARD_PORT):
        args = {
            "num_replicas": 2,
            "replica_num_cpus": 0.5,
            "max_ongoing_requests": 2,
            "max_queued_requests": 2,
            "tenants": with_limited_tenant(demo_tenants_config().model_dump(mode="json")),
            "replica": {
                "base_model": BASE_MODEL, "compile": "off", "num_slots": 2, "max_num_seqs": 2,
                "max_seq_len": 128, "max_new_tokens": 64,
                "store": {"name": "tenants-test-store", "root": str(folders["store"]), "sync_interval_s": 1.0,
                          "sources": [{"uri": str(folders["source"])}],
                          "allowed_roots": [{"uri": str(folders["root"])}]},
            },
        }
        serve.run(build_app(args), name="lora-serve", route_prefix="/")
        yield


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=BASE_URL, timeout=60) as client:
        def synced() -> bool:  # the store's first sync
            listed = client.get("/v1/models", headers=auth(ADMIN))
            return listed.status_code == 200 and len(listed.json()["data"]) == 4

        wait_until(synced, 60, "the store's first sync", interval_s=0.5)
        yield client


def complete(http, key: str, model: str, **extra) -> httpx.Response:
    return http.post("/v1/completions", headers=auth(key), json={"model": model, "prompt": "hi", "max_tokens": 4, **extra})


def model_ids(http, key: str) -> list[str]:
    response = http.get("/v1/models", headers=auth(key))
    assert response.status_code == 200, response.text
    return [card["id"] for card in response.json()["data"]]


@pytest.mark.parametrize("header", [None, "Bearer sk-wrong-key-123", "Basic c2stYWNtZS1kZW1v", "Bearer"])
def test_no_or_bad_key_is_401_with_a_json_error(http, header):
    headers = {"Authorization": header} if header is not None else {}
    response = http.post("/v1/completions", headers=headers, json={"model": BASE_MODEL, "prompt": "hi"})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["type"] == "unauthorized"
    assert "sk-wrong" not in response.text  # the key is never echoed


def test_each_tenant_sees_its_own_and_the_shared_adapters(http):
    assert model_ids(http, ACME) == [BASE_MODEL, "acme/pirate", "shared/french"]
    assert model_ids(http, GLOBEX) == [BASE_MODEL, "globex/poet", "shared/french"]
    assert model_ids(http, ADMIN) == [BASE_MODEL, "acme/pirate", "globex/poet", "shared/french"]


def test_another_tenants_adapter_is_answered_as_not_found(http):
    assert complete(http, ACME, "acme/pirate").status_code == 200
    assert complete(http, ACME, "shared/french").status_code == 200
    foreign = complete(http, ACME, "globex/poet")
    unknown = complete(http, ACME, "acme/nobody")
    assert foreign.status_code == unknown.status_code == 404
    assert foreign.json()["error"]["type"] == unknown.json()["error"]["type"] == "adapter_not_found"
    assert complete(http, GLOBEX, "globex/poet").status_code == 200


def test_the_openai_sdk_uses_the_api_key(http):
    import openai

    client = openai.OpenAI(base_url=f"{BASE_URL}/v1", api_key="sk-globex-demo", max_retries=0, timeout=60)
    reply = client.completions.create(model="globex/poet", prompt="hi", max_tokens=4)
    assert reply.usage.completion_tokens >= 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{BASE_URL}/v1", api_key="sk-not-a-key", max_retries=0).models.list()


def test_the_admin_api_needs_the_admin_key(http):
    assert http.get("/admin/adapters").status_code == 401
    forbidden = http.get("/admin/adapters", headers=auth(ACME))
    assert forbidden.status_code == 403 and forbidden.json()["error"]["type"] == "forbidden"
    listed = http.get("/admin/adapters", headers=auth(ADMIN)).json()["data"]
    assert [r["adapter_id"] for r in listed] == ["acme/pirate", "globex/poet", "shared/french"]
    assert all(r["status"] == "ready" and r["serving"]["version"] for r in listed)
    status = http.get("/admin/store", headers=auth(ADMIN)).json()
    assert status["status"] == "ok" and status["serving"] == 3


def test_admin_register_serves_at_once_and_bad_input_changes_nothing(http, folders):
    before = http.get("/admin/adapters", headers=auth(ADMIN)).json()["data"]
    bad = http.post("/admin/adapters", headers=auth(ADMIN), json={"adapter_id": "acme/big", "uri": str(folders["too_big"])})
    assert bad.status_code == 422 and bad.json()["error"]["reason"] == "rank_too_large"
    trick = http.post("/admin/adapters", headers=auth(ADMIN), json={"adapter_id": "acme/../x", "uri": str(folders["extra"])})
    assert trick.status_code == 400 and trick.json()["error"]["type"] == "invalid_adapter_id"
    malformed = http.post("/admin/adapters", headers=auth(ADMIN), json={"uri": str(folders["extra"])})
    assert malformed.status_code == 422
    for outside in ("/", "/proc/self", "file:///root", str(folders["root"] / ".." / "..")):
        for path, body in (("/admin/adapters", {"adapter_id": "acme/x", "uri": outside}), ("/admin/sources", {"uri": outside})):
            refused = http.post(path, headers=auth(ADMIN), json=body)
            assert refused.status_code == 403 and "allowed root" in refused.json()["error"]["message"], refused.text
    for options in ({"endpoint_url": "http://attacker.example"}, {"cache_dir": "/etc"}, {"read_timeout_s": "x"}):
        refused = http.post("/admin/adapters", headers=auth(ADMIN),
                            json={"adapter_id": "acme/x", "uri": str(folders["extra"]), "options": options})
        assert refused.status_code == 422 and refused.json()["error"]["type"] == "invalid_request_body", refused.text
    after = [r for r in http.get("/admin/adapters", headers=auth(ADMIN)).json()["data"] if r["adapter_id"] != "acme/big"]
    assert [(r["adapter_id"], r["serving"]) for r in after] == [(r["adapter_id"], r["serving"]) for r in before]

    created = http.post("/admin/adapters", headers=auth(ADMIN), json={"adapter_id": "acme/extra", "uri": str(folders["extra"])})
    assert created.status_code == 201, created.text
    assert created.json()["status"] == "ready" and created.json()["serving"]["config"]["rank"] == 4
    assert "acme/extra" in model_ids(http, ACME) and "acme/extra" not in model_ids(http, GLOBEX)
    assert complete(http, ACME, "acme/extra").status_code == 200

    deleted = http.delete("/admin/adapters/acme/extra", headers=auth(ADMIN))
    assert deleted.status_code == 200 and deleted.json()["status"] == "deleted"
    wait_until(lambda: complete(http, ACME, "acme/extra").status_code == 404, 10, "the delete to reach the replicas",
               interval_s=0.2)
    assert http.delete("/admin/adapters/acme/extra", headers=auth(ADMIN)).status_code == 404
    assert http.post("/admin/sync", headers=auth(ADMIN)).json()["registered"] == []


def test_warm_replicas_are_listed(http):
    for _ in range(4):
        assert complete(http, ACME, "acme/pirate").status_code == 200
    wait_until(lambda: http.get("/admin/adapters/acme/pirate", headers=auth(ADMIN)).json()["warm_on"], 20,
               "a replica to report acme/pirate warm", interval_s=0.5)


def test_overload_is_503_with_retry_after(http):
    def one(_):
        return complete(http, ACME, "acme/pirate", max_tokens=64)

    with concurrent.futures.ThreadPoolExecutor(max_workers=24) as pool:
        responses = list(pool.map(one, range(24)))
    statuses = [r.status_code for r in responses]
    assert 200 in statuses and 503 in statuses, statuses
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.json()["error"]["type"] == "overloaded"
    assert int(rejected.headers["retry-after"]) >= 1


MERGE = {"name": "acme/blend", "adapters": [{"id": "acme/pirate", "weight": 0.5}, {"id": "shared/french", "weight": 0.5}],
         "combination_type": "cat"}
BAD_MERGES = [
    # (changes to MERGE, status, error type)
    ({"name": "globex/blend"}, 403, "forbidden"),
    ({"adapters": [{"id": "globex/poet", "weight": 1.0}, {"id": "shared/french", "weight": 1.0}]}, 404, "adapter_not_found"),
    ({"adapters": [{"id": "acme/nope", "weight": 1.0}, {"id": "shared/french", "weight": 1.0}]}, 404, "adapter_not_found"),
    ({"name": "acme/pirate", "adapters": [{"id": "shared/french", "weight": 1.0}]}, 409, "adapter_exists"),
    ({"combination_type": "average"}, 422, "invalid_request_body"),
    ({"combination_type": "ties", "density": 1.5}, 422, "invalid_request_body"),
    ({"adapters": [{"id": "acme/pirate", "weight": 0}]}, 422, "invalid_request_body"),
    ({"combination_type": "svd", "svd_rank": 32}, 400, "invalid_request"),
]


def test_a_named_merge_is_served_and_bad_merges_change_nothing(http):
    before = http.get("/admin/adapters", headers=auth(ADMIN)).json()["data"]
    for changes, status, error_type in BAD_MERGES:
        response = http.post("/v1/adapters/merge", headers=auth(ACME), json={**MERGE, **changes})
        assert response.status_code == status, (changes, response.text)
        assert response.json()["error"]["type"] == error_type, (changes, response.text)
    after = http.get("/admin/adapters", headers=auth(ADMIN)).json()["data"]
    assert [(r["adapter_id"], r["serving"]) for r in after] == [(r["adapter_id"], r["serving"]) for r in before]

    created = http.post("/v1/adapters/merge", headers=auth(ACME), json=MERGE)
    assert created.status_code == 201, created.text
    record = created.json()
    assert record["adapter_id"] == "acme/blend" and record["status"] == "ready"
    assert record["serving"]["config"]["rank"] == 16  # cat: 8 + 8
    assert "acme/blend" in model_ids(http, ACME) and "acme/blend" not in model_ids(http, GLOBEX)
    blended = complete(http, ACME, "acme/blend", temperature=0)
    assert blended.status_code == 200, blended.text
    again = http.post("/v1/adapters/merge", headers=auth(ACME), json=MERGE)
    assert again.status_code == 409
    assert http.delete("/admin/adapters/acme/blend", headers=auth(ADMIN)).status_code == 200


HALF_AND_HALF = [{"id": "acme/pirate", "weight": 0.5}, {"id": "shared/french", "weight": 0.5}]
BAD_COMBINATIONS = [
    # (changes to the body, status, error type)
    ({"adapters": [{"id": "globex/poet", "weight": 1.0}]}, 404, "adapter_not_found"),
    ({"adapters": [{"id": "acme/nope", "weight": 1.0}, {"id": "shared/french"}]}, 404, "adapter_not_found"),
    ({"model": "acme/pirate"}, 400, "invalid_request"),
    ({"adapters": [{"id": "acme/pirate", "weight": 0}]}, 422, "invalid_request_body"),
    ({"adapters": [{"id": "acme/pirate"}, {"id": "acme/pirate"}]}, 422, "invalid_request_body"),
    ({"adapters": []}, 422, "invalid_request_body"),
]


def test_a_per_request_combination_answers_like_the_named_cat_merge_of_the_same_inputs(http):
    body = {"model": BASE_MODEL, "prompt": "hi", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    combined = http.post("/v1/completions", headers=auth(ACME), json={**body, "adapters": HALF_AND_HALF})
    assert combined.status_code == 200, combined.text
    assert combined.json()["lora_serve"] == {"combination": "exact"}  # 8 + 8 fits max_rank 16
    merge = {"name": "acme/cat-reference", "adapters": HALF_AND_HALF, "combination_type": "cat"}
    assert http.post("/v1/adapters/merge", headers=auth(ACME), json=merge).status_code == 201
    try:
        reference = http.post("/v1/completions", headers=auth(ACME), json={**body, "model": "acme/cat-reference"})
        assert reference.status_code == 200 and reference.json()["lora_serve"] is None
        base = http.post("/v1/completions", headers=auth(ACME), json=body).json()["choices"][0]["text"]
        text = combined.json()["choices"][0]["text"]
        assert text == reference.json()["choices"][0]["text"] and text != base
    finally:
        assert http.delete("/admin/adapters/acme/cat-reference", headers=auth(ADMIN)).status_code == 200

    three = [{"id": "acme/pirate"}, {"id": "globex/poet"}, {"id": "shared/french"}]  # 24 > 16: reduced
    chat = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True,
            "adapters": three}
    with http.stream("POST", "/v1/chat/completions", headers=auth(ADMIN), json=chat) as streamed:
        assert streamed.status_code == 200
        events = [line.removeprefix("data: ") for line in streamed.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks[-1]["lora_serve"] == {"combination": "svd"}
    assert all(chunk["lora_serve"] is None for chunk in chunks[:-1])


def test_bad_combinations_are_4xx_with_a_json_error(http):
    body = {"model": BASE_MODEL, "prompt": "hi", "max_tokens": 2, "adapters": HALF_AND_HALF}
    for changes, status, error_type in BAD_COMBINATIONS:
        response = http.post("/v1/completions", headers=auth(ACME), json={**body, **changes})
        assert response.status_code == status, (changes, response.text)
        assert response.json()["error"]["type"] == error_type, (changes, response.text)


def greedy_text(http, key: str, model: str) -> str:
    response = complete(http, key, model, temperature=0, max_tokens=8, ignore_eos=True)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_a_disabled_adapter_answers_409_or_the_base_model_until_it_is_enabled(http):
    pirate, base = greedy_text(http, ACME, "acme/pirate"), greedy_text(http, ACME, BASE_MODEL)
    assert pirate != base
    assert http.post("/admin/adapters/acme/pirate/disable", headers=auth(ACME)).status_code == 403
    assert http.post("/admin/adapters/acme/nobody/disable", headers=auth(ADMIN)).status_code == 404
    bad = http.post("/admin/adapters/acme/pirate/disable", headers=auth(ADMIN), json={"fallback": "other"})
    assert bad.status_code == 422 and complete(http, ACME, "acme/pirate").status_code == 200  # nothing changed

    disabled = http.post("/admin/adapters/acme/pirate/disable", headers=auth(ADMIN))
    assert disabled.status_code == 200 and disabled.json()["status"] == "disabled", disabled.text
    try:
        refused = complete(http, ACME, "acme/pirate")
        assert refused.status_code == 409 and refused.json()["error"]["type"] == "adapter_disabled"
        combination = complete(http, ACME, BASE_MODEL, adapters=HALF_AND_HALF)
        assert combination.status_code == 409 and combination.json()["error"]["type"] == "adapter_disabled"
        merge = http.post("/v1/adapters/merge", headers=auth(ACME), json={**MERGE, "name": "acme/from-disabled"})
        assert merge.status_code == 409 and merge.json()["error"]["type"] == "adapter_disabled", merge.text
        assert "acme/pirate" not in model_ids(http, ACME)
        assert http.get("/admin/adapters/acme/pirate", headers=auth(ADMIN)).json()["disabled"]["fallback"] == "none"

        fallback = http.post("/admin/adapters/acme/pirate/disable", headers=auth(ADMIN), json={"fallback": "base"})
        assert fallback.status_code == 200
        assert greedy_text(http, ACME, "acme/pirate") == base
        assert complete(http, GLOBEX, "acme/pirate").status_code == 404  # still invisible to others
    finally:
        enabled = http.post("/admin/adapters/acme/pirate/enable", headers=auth(ADMIN))
    assert enabled.status_code == 200 and enabled.json()["status"] == "ready"
    assert greedy_text(http, ACME, "acme/pirate") == pirate
    assert "acme/pirate" in model_ids(http, ACME)


def test_a_version_that_fails_its_probe_is_never_served_and_rollback_goes_back(http, folders, tmp_path):
    import shutil

    from tests.support.adapters import make_peft_adapter

    folder = folders["source"] / "acme" / "probed"

    def new_version(seed: int, probe: dict | None = None) -> None:
        """Files replaced in place, the probe first: a sync in between sees no unprobed weights."""
        staged = make_peft_adapter(tmp_path / f"seed{seed}", seed=seed, r=4)
        if probe is not None:
            (staged / "probe.json").write_text(json.dumps(probe))
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("probe.json", "adapter_config.json", "adapter_model.safetensors"):
            if (staged / name).exists():
                shutil.copy(staged / name, folder / name)
            elif (folder / name).exists():
                (folder / name).unlink()
        assert http.post("/admin/sync", headers=auth(ADMIN)).status_code == 200

    new_version(11)
    first = greedy_text(http, ACME, "acme/probed")
    v1 = http.get("/admin/adapters/acme/probed", headers=auth(ADMIN)).json()["serving"]["version"]

    new_version(12, probe={"prompt": "hi", "expected": "never the answer"})  # new weights it cannot answer with
    for _ in range(4):  # whichever replica answers, and whenever it hears of the new version
        assert greedy_text(http, ACME, "acme/probed") == first

    def rejected() -> dict | None:
        record = http.get("/admin/adapters/acme/probed", headers=auth(ADMIN)).json()
        return record if record["current"]["status"] == "rejected" else None

    record = wait_until(rejected, 30, "a replica to reject the new version", interval_s=0.5)
    assert record["serving"]["version"] == v1 and "probe answered" in record["current"]["reason"]
    assert record["current"]["reason_code"] == "swap_validation"

    def reported() -> list | None:  # replicas report on their next poll (every POLL_TIMEOUT_S)
        reports = http.get("/admin/adapters/acme/probed", headers=auth(ADMIN)).json()["replicas"]
        done = sum(r["requests"] for r in reports) >= 5 and any("rejected" in (r["validation"] or "") for r in reports)
        return reports if done else None

    reports = wait_until(reported, 20, "the replicas to report the requests and the rejection", interval_s=0.5)
    assert all(r["version"] == v1 for r in reports if r["slot"] is not None)
    assert all(r["last_swap_ms"] is not None and r["tokens"] >= r["requests"] for r in reports if r["requests"])

    new_version(13)  # a good third version
    third = wait_until(lambda: (text := greedy_text(http, ACME, "acme/probed")) != first and text, 20,
                       "the third version to serve")
    rolled = http.post("/admin/adapters/acme/probed/rollback", headers=auth(ADMIN))
    assert rolled.status_code == 200 and rolled.json()["serving"]["version"] == v1
    wait_until(lambda: all(greedy_text(http, ACME, "acme/probed") == first for _ in range(2)), 20,
               "the replicas to serve the rolled-back version")
    assert third != first
    again = http.post("/admin/adapters/acme/probed/rollback", headers=auth(ADMIN))
    assert again.status_code == 400 and again.json()["error"]["type"] == "invalid_request"
    assert http.post("/admin/adapters/acme/probed/rollback", headers=auth(ACME)).status_code == 403
    assert http.delete("/admin/adapters/acme/probed", headers=auth(ADMIN)).status_code == 200
    shutil.rmtree(folder)


def test_a_pinned_adapter_stays_warm_on_its_replicas_and_moves_to_a_replacement(http):
    import ray

    assert http.post("/admin/adapters/shared/french/pin", headers=auth(ACME), json={"replicas": 2}).status_code == 403
    assert http.post("/admin/adapters/acme/nobody/pin", headers=auth(ADMIN), json={"replicas": 1}).status_code == 404
    assert http.post("/admin/adapters/shared/french/pin", headers=auth(ADMIN), json={"replicas": 0}).status_code == 422
    pinned = http.post("/admin/adapters/shared/french/pin", headers=auth(ADMIN), json={"replicas": 2})
    assert pinned.status_code == 200 and pinned.json()["pin_replicas"] == 2

    def pinned_on() -> set[str]:
        reports = http.get("/admin/adapters/shared/french", headers=auth(ADMIN)).json()["replicas"]
        return {r["replica_id"] for r in reports if r["pinned"] and r["slot"] is not None}

    def pinned_on_two(avoiding: str | None = None) -> set[str] | None:
        found = pinned_on()
        return found if len(found) == 2 and avoiding not in found else None

    holders = wait_until(pinned_on_two, 30, "the pins on both replicas")
    for _ in range(3):  # other adapters churn the other slot of each replica
        for model in ("acme/pirate", "acme/pirate", "shared/french"):
            assert complete(http, ADMIN, model).status_code == 200
        assert complete(http, ADMIN, "globex/poet").status_code == 200
    assert pinned_on() == holders

    victim = sorted(holders)[0]
    actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith(victim)]
    assert len(actors) == 1, actors
    ray.kill(ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"]), no_restart=True)
    replaced = wait_until(lambda: pinned_on_two(avoiding=victim), 90, "a replacement replica to pin shared/french again")
    assert len(replaced - holders) == 1

    assert http.delete("/admin/adapters/shared/french/pin", headers=auth(ADMIN)).json()["pin_replicas"] == 0
    wait_until(lambda: not pinned_on(), 30, "the pins to be released")


def test_the_benchmark_job_loads_the_running_app(http):
    status, logs = run_job(f"http://127.0.0.1:{DASHBOARD_PORT}", "cluster.jobs.benchmark", "--url", BASE_URL,
                           "--api-key", "sk-acme-demo", "--requests", "6", "--rate", "4", "--max-tokens", "4",
                           "--prompt-words", "8")  # spread out: this app queues 2 requests at most
    assert status == "SUCCEEDED", logs
    summary = json.loads(logs.strip().splitlines()[-1])
    assert summary["completed"] == 6 and summary["failed"] == 0 and summary["output_tok_s"] > 0
    assert set(summary["per_model"]) <= {BASE_MODEL, "acme/pirate", "shared/french"}  # what acme may use
    refused, logs = run_job(f"http://127.0.0.1:{DASHBOARD_PORT}", "cluster.jobs.benchmark", "--url", BASE_URL,
                            "--api-key", "sk-acme-demo", "--models", "globex/poet")
    assert refused == "FAILED" and "not among" in logs


def test_metrics_are_exported_after_real_requests(http):
    """Ray's metrics export (the node's metrics port, Prometheus text) carries the ingress's,
    the replicas' and the store's metrics, with adapter ids only for adapters that exist."""
    import ray

    assert complete(http, ACME, "acme/pirate").status_code == 200
    assert complete(http, ACME, "acme/nobody-here").status_code == 404
    chat = {"model": "shared/french", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    with http.stream("POST", "/v1/chat/completions", headers=auth(ACME), json=chat) as streamed:
        assert streamed.status_code == 200 and list(streamed.iter_lines())
    port = ray._private.worker.global_worker.node.metrics_export_port
    wanted = [
        ('ray_lora_serve_requests_total{', 'adapter="acme/pirate"', 'status="200"', 'tenant="acme"'),
        ('ray_lora_serve_requests_total{', 'adapter="unknown"', 'status="404"'),
        ('ray_lora_serve_tokens_total{', 'kind="completion"'),
        ('ray_lora_serve_ttft_seconds_bucket{',),
        ('ray_lora_serve_time_per_output_token_seconds_bucket{',),
        ('ray_lora_serve_slot_misses_total{',),
        ('ray_lora_serve_swap_ms_bucket{',),
        ('ray_lora_serve_queue_depth{',),
        ('ray_lora_serve_store_sync_seconds_bucket{',),
        ('ray_lora_serve_store_adapters_serving{',),
    ]

    def scraped() -> str | None:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        lines = text.splitlines()
        found = all(any(all(part in line for part in parts) for line in lines) for parts in wanted)
        return text if found else None

    text = wait_until(scraped, 90, "the metrics in Ray's export", interval_s=2)
    assert "acme/nobody-here" not in text  # unknown ids never become labels


def test_a_tenant_over_its_rate_limit_gets_429_and_the_others_are_served(http):
    """initech may send 2 at once, then one per 5 s: its third is 429 with Retry-After; acme,
    with no limit, is served meanwhile; admin calls are never limited."""
    assert [complete(http, INITECH, BASE_MODEL).status_code for _ in range(2)] == [200, 200]
    limited = complete(http, INITECH, BASE_MODEL)
    assert limited.status_code == 429 and limited.json()["error"]["type"] == "rate_limited"
    assert 1 <= int(limited.headers["Retry-After"]) <= 5
    assert all(complete(http, ACME, "acme/pirate").status_code == 200 for _ in range(4))
    assert all(complete(http, ADMIN, BASE_MODEL).status_code == 200 for _ in range(3))


def test_a_killed_store_restarts_with_its_registry_and_serving_never_stops(http):
    """Ray restarts the detached store (max_restarts=-1); it reloads its manifest. Meanwhile the
    replicas serve from their slots, and admin calls answer 200 or a 503 JSON, never hang."""
    import ray

    before = sorted((r["adapter_id"], r["serving"]["version"]) for r in http.get(
        "/admin/adapters", headers=auth(ADMIN)).json()["data"] if r["serving"])
    store = ray.get_actor("tenants-test-store", namespace="lora-serve")
    ray.kill(store, no_restart=False)
    started = time.monotonic()
    while time.monotonic() - started < 5:
        assert complete(http, ACME, "acme/pirate").status_code == 200
        admin = http.get("/admin/store", headers=auth(ADMIN), timeout=30)
        body = admin.json()
        assert (admin.status_code == 200 and body["status"]) or (admin.status_code == 503 and body["error"]["type"]), \
            admin.text
    wait_until(lambda: http.get("/admin/store", headers=auth(ADMIN)).status_code == 200, 60, "the store to be back")
    after = sorted((r["adapter_id"], r["serving"]["version"]) for r in http.get(
        "/admin/adapters", headers=auth(ADMIN)).json()["data"] if r["serving"])
    assert after == before
    assert complete(http, GLOBEX, "globex/poet").status_code == 200
