"""Tenants, the admin API and overload, end to end: a real local Ray, the app with the demo keys
and an adapter store on a local folder, real HTTP (httpx and the openai SDK)."""

from __future__ import annotations

import concurrent.futures
import http.client as http_client
import json
import os
import time
import urllib.parse
from pathlib import Path
from typing import NamedTuple

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


QUEUE_SHARE = 0.3  # of 6 places (2 replicas x max_ongoing 2 + max_queued 2): 2 a tenant


def with_limited_tenant(tenants: dict) -> dict:
    """The demo tenants and initech, whose rate limit is tight; each tenant holds at most 2 of
    the 6 queue places, which leaves Serve room for its replicas' queue lengths being a moment
    stale (at half, 3, acme's flood was now and then answered 503 by Serve itself)."""
    limited = {"keys": [INITECH.split()[1]], "rate_limit": {"requests_per_s": 0.2, "burst": 2}}
    return {**tenants, "tenants": {**tenants["tenants"], "initech": limited}, "queue_share": QUEUE_SHARE}


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


def test_a_flooding_tenant_gets_429_past_its_share_of_the_queue_and_the_others_are_served(http):
    """Replicas 2 x max_ongoing 2 + max_queued 2 = 6 places, `QUEUE_SHARE` of them (2) acme's."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=24) as pool:
        flood = [pool.submit(complete, http, ACME, "acme/pirate", max_tokens=64) for _ in range(20)]
        quiet = [complete(http, GLOBEX, "globex/poet", max_tokens=4) for _ in range(2)]
        responses = [future.result() for future in flood]
    statuses = [r.status_code for r in responses]
    assert 200 in statuses and 429 in statuses and 503 not in statuses, statuses
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["type"] == "rate_limited" and "share of this server's queue" in refused.text
    assert int(refused.headers["retry-after"]) >= 1
    assert [r.status_code for r in quiet] == [200, 200]


def test_overload_is_503_with_retry_after(http):
    """Admin keys hold no share: their flood fills Serve's queue. Streams are refused the same way
    (before their headers: a JSON 503, not an event stream)."""
    def one(index):
        return complete(http, ADMIN, "acme/pirate", max_tokens=64, stream=index % 2 == 1)

    with concurrent.futures.ThreadPoolExecutor(max_workers=24) as pool:
        responses = list(pool.map(one, range(24)))
    statuses = [r.status_code for r in responses]
    assert 200 in statuses and 503 in statuses and set(statuses) <= {200, 503}, statuses
    for index, rejected in enumerate(responses):
        if rejected.status_code == 503:
            assert rejected.json()["error"]["type"] == "overloaded", (index, rejected.text)
            assert int(rejected.headers["retry-after"]) >= 1
    assert any(r.status_code == 503 for r in responses[1::2]), statuses  # a stream among them


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


# ---- bad input to the admin and tenant endpoints: one matrix, and nothing changes ---------------
# The plain completion bodies are test_serve_http.BAD_REQUESTS; these are the admin API's, the merge
# endpoint's and every endpoint's keys. Requests go out through http.client: httpx resolves '..' in
# a URL's path before sending it, and these rows must reach the server as written.

BAD_KEY = "Bearer sk-wrong-key-123"
FOREIGN_TO_ACME = ("globex",)  # globex/poet and any other globex id


class _Tripwire:
    """Unpickling this creates the folder `path`: a store or replica that unpickled weights would
    leave it behind."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


class Raw(NamedTuple):
    """A body sent as these bytes, with this content type."""

    content: bytes
    content_type: str = "application/json"


class Row(NamedTuple):
    name: str
    method: str
    path: str  # sent as written: no dot segments resolved, no percent-decoding
    key: str | None
    body: object  # None: no body; Raw: those bytes; anything else: sent as JSON
    status: int
    error_type: str
    reason: str | None = None  # InvalidAdapterError's reason
    recorded: bool = False  # a checkpoint refused after it was fetched: a rejected record, documented (syncer.register)


class Answer(NamedTuple):
    status: int
    content_type: str
    www_authenticate: str | None
    text: str


def send(method: str, path: str, key: str | None, body: object) -> Answer:
    url = urllib.parse.urlsplit(BASE_URL)
    headers = {} if key is None else {"Authorization": key}
    content = None
    if isinstance(body, Raw):
        content, headers["Content-Type"] = body.content, body.content_type
    elif body is not None:
        content, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    connection = http_client.HTTPConnection(url.hostname, url.port, timeout=120)
    try:
        connection.request(method, path, body=content, headers=headers)
        response = connection.getresponse()
        return Answer(response.status, response.getheader("content-type") or "", response.getheader("www-authenticate"),
                      response.read().decode("utf-8", "replace"))
    finally:
        connection.close()


@pytest.fixture(scope="module")
def bad_checkpoints(folders):
    """Folders under the allowlisted root whose checkpoints the store must refuse, broken the way the
    checkpoint unit tests break them (their builders, reused), plus what only a folder can be."""
    import pickle

    from lora_core.settings import EngineConfig
    from tests.support.adapters import edit_adapter_config, make_peft_adapter
    from tests.unit.lora_core import test_checkpoint as breakers

    root = folders["root"] / "bad"

    def built(name: str, build) -> Path:
        where = root / name
        where.mkdir(parents=True)
        return build(lambda sub, **options: make_peft_adapter(where / sub, seed=9, **options), where)

    tripwire = root / "unpickled"  # must never exist
    found = {
        "truncated": built("truncated", breakers._weights_bytes(lambda data: data[: len(data) // 2])),
        "pickle_bin": built("pickle_bin", breakers._pickle_only),  # PEFT's own adapter_model.bin
        "pickle_bytes": built("pickle_bytes", breakers._weights_bytes(lambda data: pickle.dumps(_Tripwire(tripwire)))),
        "wider_base": built("wider_base", breakers._wider_llama),  # named tiny-random-llama, shaped otherwise
        "nan": built("nan", breakers._poison(float("nan"), "B")),
        "inf": built("inf", breakers._poison(float("inf"), "A")),
        "other_base": make_peft_adapter(root / "other_base", seed=9),
        "oversized": make_peft_adapter(root / "oversized", seed=9),
        "symlinked": make_peft_adapter(root / "symlinked", seed=9),
        "empty": root / "empty",
        "empty_source": root / "empty_source",
        "link_out": root / "link_out",
        "tripwire": tripwire,
    }
    edit_adapter_config(found["other_base"], base_model_name_or_path="meta-llama/Llama-3.1-8B")
    # Over the size limit (the app leaves max_adapter_bytes at its default) by one byte, sparse: no
    # disk or memory spent on it until the store copies it, and it is refused before it is parsed.
    os.truncate(found["oversized"] / "adapter_model.safetensors", EngineConfig().max_adapter_bytes + 1)
    weights = found["symlinked"] / "adapter_model.safetensors"
    weights.unlink()
    weights.symlink_to(folders["extra"] / "adapter_model.safetensors")  # a file outside its folder
    found["empty"].mkdir()
    found["empty_source"].mkdir()
    found["link_out"].symlink_to(folders["root"].parent, target_is_directory=True)  # out of the allowed root
    yield found
    (found["oversized"] / "adapter_model.safetensors").unlink()


def bad_input_rows(folders: dict, bad: dict) -> list[Row]:
    root, extra = str(folders["root"]), str(folders["extra"])
    pirate = "/admin/adapters/acme/pirate"
    register = {"adapter_id": "acme/auth-probe", "uri": extra}  # would register, if the key were let through
    merge = {**MERGE, "name": "acme/auth-probe"}
    calls = [  # every admin call, with a body it would accept: the keys decide alone
        ("GET", "/admin/adapters", None), ("POST", "/admin/adapters", register),
        ("GET", pirate, None), ("DELETE", pirate, None), ("GET", "/admin/adapters/globex/poet", None),
        ("POST", f"{pirate}/disable", {"fallback": "base"}), ("POST", f"{pirate}/enable", None),
        ("POST", f"{pirate}/rollback", None), ("POST", f"{pirate}/pin", {"replicas": 2}), ("DELETE", f"{pirate}/pin", None),
        ("POST", "/admin/sources", {"uri": str(bad["empty_source"])}), ("POST", "/admin/sync", None),
        ("GET", "/admin/store", None),
    ]
    rows = [Row(f"{method} {path}: {who}", method, path, key, body, status, error_type)
            for method, path, body in calls
            for who, key, status, error_type in (("a tenant key", ACME, 403, "forbidden"),
                                                 ("no key", None, 401, "unauthorized"),
                                                 ("a bad key", BAD_KEY, 401, "unauthorized"))]
    rows += [Row(f"{method} {path}: {who}", method, path, key, body, 401, "unauthorized")
             for method, path, body in (("GET", "/v1/models", None), ("POST", "/v1/adapters/merge", merge))
             for who, key in (("no key", None), ("a bad key", BAD_KEY), ("a Basic key", "Basic c2stYWNtZS1kZW1v"))]

    def registration(name: str, uri: str, status: int, error_type: str, reason: str | None = None, **fields) -> Row:
        body = {"adapter_id": "acme/bad", "uri": uri, **fields}
        return Row(f"register: {name}", "POST", "/admin/adapters", ADMIN, body, status, error_type, reason)

    def checkpoint(name: str, folder: Path, reason: str) -> Row:
        body = {"adapter_id": f"acme/bad-{name.replace(' ', '-')}", "uri": str(folder)}
        return Row(f"register a checkpoint: {name}", "POST", "/admin/adapters", ADMIN, body, 422, "invalid_adapter",
                   reason, recorded=True)

    R, BODY = Row, "invalid_request_body"
    rows += [
        # POST /admin/adapters: bodies that do not parse or validate
        R("register: malformed JSON", "POST", "/admin/adapters", ADMIN, Raw(b'{"adapter_id": "acme/x", "uri": '), 422,
          BODY),
        R("register: a JSON array", "POST", "/admin/adapters", ADMIN, ["acme/x", extra], 422, BODY),
        R("register: a JSON string", "POST", "/admin/adapters", ADMIN, "acme/x", 422, BODY),
        R("register: JSON null", "POST", "/admin/adapters", ADMIN, Raw(b"null"), 422, BODY),
        R("register: no body", "POST", "/admin/adapters", ADMIN, None, 422, BODY),
        R("register: bad UTF-8", "POST", "/admin/adapters", ADMIN, Raw(b'{"adapter_id": "acme/\xff\xfe", "uri": "/x"}'),
          422, BODY),
        R("register: JSON sent as text/plain", "POST", "/admin/adapters", ADMIN,
          Raw(json.dumps({"adapter_id": "acme/x", "uri": extra}).encode(), "text/plain"), 422, BODY),
        R("register: an id that is a number", "POST", "/admin/adapters", ADMIN, {"adapter_id": 5, "uri": extra}, 422, BODY),
        R("register: a uri that is a list", "POST", "/admin/adapters", ADMIN, {"adapter_id": "acme/x", "uri": [extra]},
          422, BODY),
        R("register: options that are a string", "POST", "/admin/adapters", ADMIN,
          {"adapter_id": "acme/x", "uri": extra, "options": "fast"}, 422, BODY),
        R("register: an unknown field", "POST", "/admin/adapters", ADMIN,
          {"adapter_id": "acme/x", "uri": extra, "tenant": "globex"}, 422, BODY),
        # a body that decodes but does not validate is refused for its key first (one that does not: UNDECODED_BODIES)
        R("register: wrong types, no key", "POST", "/admin/adapters", None, {"adapter_id": 5, "uri": []}, 401,
          "unauthorized"),
        R("register: wrong types, a tenant key", "POST", "/admin/adapters", ACME, {"adapter_id": 5}, 403, "forbidden"),
        R("pin: a wrong type, a bad key", "POST", f"{pirate}/pin", BAD_KEY, {"replicas": "many"}, 401, "unauthorized"),
        R("register: a body over 1 MiB", "POST", "/admin/adapters", ADMIN,
          {"adapter_id": "acme/x", "uri": extra, "options": {"pad": "x" * (1 << 20)}}, 413, "body_too_large"),
        # ids with path tricks (the folder is a good adapter: only the id is wrong)
        *[R(f"register: the id {adapter_id[:40]!r}", "POST", "/admin/adapters", ADMIN,
            {"adapter_id": adapter_id, "uri": extra}, 400, "invalid_adapter_id")
          for adapter_id in ("acme/../globex/poet", "../globex/poet", "acme/..", "acme/%2e%2e", "acme%2fpoet",
                             "acme%2F..%2Fglobex", "/acme/x", "/etc/passwd", "acme/x/../../y", "acme\\..\\x", "./acme/x",
                             "acme/x\x00", "ACME/x", "acme/pir\u0430te", "acme/" + "x" * 10_000)],
        # URIs outside the allowed roots, or no URI at all
        *[registration(f"the uri {uri!r}", uri, 403, "forbidden")
          for uri in ("/etc", "file:///etc", f"{root}/../..", f"file://{root}/%2e%2e/%2e%2e", f"{root}/bad/link_out",
                      str(folders["root"].parent), "s3://another-bucket/adapters", "hf://another-org/adapters")],
        *[registration(f"the uri {uri!r}", uri, 400, "invalid_request")
          for uri in ("", "relative/folder", "ftp://host/adapters", "file://host/adapters", f"{root}/x\x00y",
                      "s3://Bad_Bucket/x", "hf://org/repo@../main")],
        # options an API call may not set, or of the wrong type (checked before the allowlist)
        *[registration(f"the options {options!r} for {uri.split(':')[0]}", uri, 422, BODY, options=options)
          for uri, options in ((extra, {"endpoint_url": "http://attacker.example"}), (extra, {"cache_dir": "/etc"}),
                               (extra, {"read_timeout_s": 5}), (extra, {"token": "hf_secret"}),
                               ("s3://another-bucket/x", {"read_timeout_s": "x"}),
                               ("s3://another-bucket/x", {"read_timeout_s": -1}),
                               ("s3://another-bucket/x", {"connect_timeout_s": 10**30}),
                               ("s3://another-bucket/x", {"aws_secret_access_key": "k"}),
                               ("s3://another-bucket/x", {"endpoint_url": "http://attacker.example"}))],
        R("register: a NaN option", "POST", "/admin/adapters", ADMIN,
          Raw(b'{"adapter_id": "acme/x", "uri": "s3://another-bucket/x", "options": {"read_timeout_s": NaN}}'), 422, BODY),
        # folders under the allowed root that hold no adapter, or one the store must refuse
        # (refused before anything is recorded; a missing local folder is a source that cannot be reached, local.py)
        registration("the store's own folder", str(folders["store"]), 422, "invalid_adapter", "missing_file"),
        registration("a folder that does not exist", f"{root}/bad/nowhere", 503, "source_unavailable"),
        registration("a file, not a folder", f"{extra}/adapter_config.json", 503, "source_unavailable"),
        registration("a folder with no files", str(bad["empty"]), 422, "invalid_adapter", "missing_file"),
        registration("weights linked from outside the folder", str(bad["symlinked"]), 422, "invalid_adapter",
                     "missing_file"),
        checkpoint("truncated", bad["truncated"], "corrupt_file"),
        checkpoint("pickle bin", bad["pickle_bin"], "pickle_file"),
        checkpoint("pickle bytes", bad["pickle_bytes"], "corrupt_file"),  # read as safetensors, never unpickled
        checkpoint("wider base", bad["wider_base"], "shape_mismatch"),
        checkpoint("other base", bad["other_base"], "base_model_mismatch"),
        checkpoint("over rank", folders["too_big"], "rank_too_large"),
        checkpoint("nan", bad["nan"], "non_finite"),
        checkpoint("inf", bad["inf"], "non_finite"),
        checkpoint("oversized", bad["oversized"], "too_large"),

        # POST /admin/sources
        R("source: malformed JSON", "POST", "/admin/sources", ADMIN, Raw(b'{"uri": "/'), 422, BODY),
        R("source: a JSON array", "POST", "/admin/sources", ADMIN, [str(bad["empty_source"])], 422, BODY),
        R("source: bad UTF-8", "POST", "/admin/sources", ADMIN, Raw(b'{"uri": "/\xc3\x28"}'), 422, BODY),
        R("source: a uri that is a number", "POST", "/admin/sources", ADMIN, {"uri": 5}, 422, BODY),
        R("source: no uri", "POST", "/admin/sources", ADMIN, {}, 422, BODY),
        R("source: an unknown field", "POST", "/admin/sources", ADMIN,
          {"uri": str(bad["empty_source"]), "adapter_id": "acme/x"}, 422, BODY),
        R("source: an option it may not set", "POST", "/admin/sources", ADMIN,
          {"uri": str(bad["empty_source"]), "options": {"endpoint_url": "http://attacker.example"}}, 422, BODY),
        R("source: a wrong-typed option", "POST", "/admin/sources", ADMIN,
          {"uri": "s3://another-bucket/x", "options": {"connect_timeout_s": [1]}}, 422, BODY),
        *[R(f"source: the uri {uri!r}", "POST", "/admin/sources", ADMIN, {"uri": uri}, 403, "forbidden")
          for uri in ("/", "/proc/self", f"{root}/../..", f"file://{root}/%2E%2E", f"{root}/bad/link_out",
                      "s3://another-bucket", "hf://another-org/adapters@main")],
        R("source: a relative uri", "POST", "/admin/sources", ADMIN, {"uri": "adapters"}, 400, "invalid_request"),

        # the adapter's own calls, on a served adapter: bodies that must change nothing
        *[R(f"pin: replicas {value}", "POST", f"{pirate}/pin", ADMIN, Raw(f'{{"replicas": {value}}}'.encode()), 422,
            BODY)
          for value in ("-1", "0", "1025", str(10**30), "-" + str(10**30), "1e400", "NaN", "Infinity", "1.5",
                        '"many"', '"2"', "true", "2.0", "[2]", "null", "{}")],
        R("pin: malformed JSON", "POST", f"{pirate}/pin", ADMIN, Raw(b'{"replicas": 1'), 422, BODY),
        R("pin: a JSON array", "POST", f"{pirate}/pin", ADMIN, [1], 422, BODY),
        R("pin: bad UTF-8", "POST", f"{pirate}/pin", ADMIN, Raw(b'{"replicas": 1, "\xff": 1}'), 422, BODY),
        R("pin: an unknown field", "POST", f"{pirate}/pin", ADMIN, {"replicas": 1, "everywhere": True}, 422, BODY),
        R("pin: no body", "POST", f"{pirate}/pin", ADMIN, None, 422, BODY),
        R("disable: an unknown fallback", "POST", f"{pirate}/disable", ADMIN, {"fallback": "other"}, 422, BODY),
        R("disable: a number fallback", "POST", f"{pirate}/disable", ADMIN, {"fallback": 1}, 422, BODY),
        R("disable: a JSON array", "POST", f"{pirate}/disable", ADMIN, ["base"], 422, BODY),
        R("disable: malformed JSON", "POST", f"{pirate}/disable", ADMIN, Raw(b'{"fallback": "base"'), 422, BODY),
        R("disable: bad UTF-8", "POST", f"{pirate}/disable", ADMIN, Raw(b'{"fallback": "bas\xe9"}'), 422, BODY),
        R("disable: an unknown field", "POST", f"{pirate}/disable", ADMIN, {"fallback": "base", "until": 1}, 422, BODY),
        R("rollback: no earlier version", "POST", f"{pirate}/rollback", ADMIN, None, 400, "invalid_request"),
        R("list: include_deleted not a bool", "GET", "/admin/adapters?include_deleted=maybe", ADMIN, None, 422, BODY),

        # unknown adapters
        *[R(f"{method} {path}: unknown", method, path, ADMIN, body, 404, "adapter_not_found")
          for method, path, body in (("GET", "/admin/adapters/acme/nobody", None),
                                     ("GET", "/admin/adapters/globex/nobody", None),
                                     ("DELETE", "/admin/adapters/acme/nobody", None),
                                     ("POST", "/admin/adapters/acme/nobody/disable", {"fallback": "none"}),
                                     ("POST", "/admin/adapters/shared/nobody/enable", None),
                                     ("POST", "/admin/adapters/acme/nobody/rollback", None),
                                     ("POST", "/admin/adapters/acme/nobody/pin", {"replicas": 1}),
                                     ("DELETE", "/admin/adapters/acme/nobody/pin", None))],

        # ids with path tricks in the path: a bad id is 400; a path no route has is 404
        *[R(f"{method} {path}: a bad id", method, path, ADMIN, body, 400, "invalid_adapter_id")
          for method, path, body in (("GET", "/admin/adapters/acme/..", None),
                                     ("GET", "/admin/adapters/acme/%2e%2e", None),
                                     ("GET", "/admin/adapters/%2e%2e/pirate", None),
                                     ("GET", "/admin/adapters/acme/%2e", None),
                                     ("DELETE", "/admin/adapters/%2E%2E/pirate", None),
                                     ("POST", "/admin/adapters/acme/..%5C..%5Cglobex/pin", {"replicas": 1}),
                                     ("POST", "/admin/adapters/acme/pirate%00/enable", None),
                                     ("POST", "/admin/adapters/ACME/pirate/rollback", None),
                                     ("POST", "/admin/adapters/acme/..%2e/disable", {"fallback": "base"}),
                                     ("DELETE", "/admin/adapters/acme/pir%D0%B0te/pin", None))],
        *[R(f"{method} {path}: no such route", method, path, ADMIN, body, 404, "not_found")
          for method, path, body in (("DELETE", "/admin/adapters/acme/../globex/poet", None),
                                     ("GET", "/admin/adapters/acme%2F..%2Fglobex/poet", None),
                                     ("DELETE", "/admin/adapters/acme/nobody%2F..%2F..%2Fglobex%2Fpoet", None),
                                     ("GET", "/admin/adapters/acme/%2Fetc%2Fpasswd", None),
                                     ("POST", "/admin/adapters/%2Fetc/passwd/disable", {"fallback": "base"}),
                                     ("POST", "/admin/adapters/acme/../../sources", {"uri": str(bad["empty_source"])}),
                                     ("GET", "/admin/nothing", None))],
        *[R(f"{method} {path}: wrong method", method, path, ADMIN, None, 405, "method_not_allowed")
          for method, path in (("PUT", "/admin/adapters"), ("GET", "/admin/sync"), ("PATCH", pirate),
                               ("POST", "/healthz"), ("DELETE", "/v1/models"))],

        # POST /v1/adapters/merge (a tenant endpoint): what BAD_MERGES does not send
        R("merge: malformed JSON", "POST", "/v1/adapters/merge", ACME, Raw(b'{"name": "acme/m", "adapters": ['), 422,
          BODY),
        R("merge: a JSON array", "POST", "/v1/adapters/merge", ACME, [MERGE], 422, BODY),
        R("merge: bad UTF-8", "POST", "/v1/adapters/merge", ACME, Raw(b'{"name": "acme/\xc0\xaf"}'), 422, BODY),
        R("merge: as text/plain", "POST", "/v1/adapters/merge", ACME, Raw(json.dumps(MERGE).encode(), "text/plain"), 422,
          BODY),
        *[R(f"merge: the name {name!r}", "POST", "/v1/adapters/merge", ACME, {**MERGE, "name": name}, 422, BODY)
          for name in ("acme/../globex/x", "acme/%2e%2e", "/acme/x", "acme\\x", "acme/x/y", "", 5)],
        R("merge: an input id with '..'", "POST", "/v1/adapters/merge", ACME,
          {**MERGE, "adapters": [{"id": "acme/../shared/french", "weight": 1.0}]}, 422, BODY),
        *[R(f"merge: {field} {value}", "POST", "/v1/adapters/merge", ACME,
            Raw(json.dumps(MERGE)[:-1].encode() + f', "{field}": {value}}}'.encode()), 422, BODY)
          for field, value in (("seed", "-1"), ("seed", str(10**30)), ("svd_rank", "-1"), ("density", "NaN"))],
        *[R(f"merge: weight {value}", "POST", "/v1/adapters/merge", ACME,
            Raw(f'{{"name": "acme/m", "adapters": [{{"id": "acme/pirate", "weight": {value}}}]}}'.encode()), 422, BODY)
          for value in ("NaN", "Infinity", "-Infinity", "1e400", '"heavy"', "null")],
        R("merge: svd_rank 10**30", "POST", "/v1/adapters/merge", ACME,
          {**MERGE, "combination_type": "svd", "svd_rank": 10**30}, 400, "invalid_request"),
    ]
    return rows


def answer_problems(row: Row, answer: Answer, folders: dict) -> list[str]:
    """What is wrong with the answer to a row: status, a JSON error of its type, nothing leaked."""
    where = f"{row.name!r} ({row.method} {row.path})"
    problems = []
    if answer.status != row.status:
        problems.append(f"{where}: status {answer.status}, expected {row.status}: {answer.text[:300]}")
    try:
        error = json.loads(answer.text)["error"]
        assert isinstance(error, dict) and isinstance(error["message"], str) and error["message"]
    except Exception:
        return [*problems, f"{where}: not a JSON error body ({answer.content_type}): {answer.text[:300]!r}"]
    if not answer.content_type.startswith("application/json"):
        problems.append(f"{where}: content type {answer.content_type!r}")
    if error.get("type") != row.error_type:
        problems.append(f"{where}: error type {error.get('type')!r}, expected {row.error_type!r}: {answer.text[:300]}")
    if row.reason is not None and error.get("reason") != row.reason:
        problems.append(f"{where}: reason {error.get('reason')!r}, expected {row.reason!r}: {error['message'][:300]}")
    if "Traceback" in answer.text or 'File "' in answer.text:
        problems.append(f"{where}: a traceback in the answer: {answer.text[:300]}")
    if row.status == 401 and answer.www_authenticate != "Bearer":
        problems.append(f"{where}: WWW-Authenticate {answer.www_authenticate!r}")
    if row.key != ADMIN:  # a tenant, or nobody: no other tenant's ids, no server paths, no keys back
        sent = f"{row.path} {row.body!r}"  # the caller's own words may come back to it
        named = [*FOREIGN_TO_ACME, str(folders["root"]), "sk-"]
        if row.key is None or row.key == BAD_KEY:
            named += ["acme/", "shared/"]
        leaked = [text for text in named if text in answer.text and text not in sent]
        if leaked:
            problems.append(f"{where}: the answer names {leaked}: {answer.text[:300]}")
    return problems


def observable_state(http) -> dict:
    """What the matrix must not change: every adapter's record (status, serving version, where it
    comes from, disabled, pins), what each key may use, and the sources the store watches."""
    records = http.get("/admin/adapters", headers=auth(ADMIN)).json()["data"]
    sources = http.get("/admin/store", headers=auth(ADMIN)).json()["sources"]
    return {
        "adapters": {r["adapter_id"]: (r["status"], (r["serving"] or {}).get("version"),
                                       (r["serving"] or {}).get("sha256"), r["source_uri"], r["disabled"],
                                       r["pin_replicas"]) for r in records},
        "models": {key: model_ids(http, key) for key in (ACME, GLOBEX, ADMIN)},
        "sources": sorted((s["uri"], s["adapter_id"]) for s in sources),
    }


def greedy_answers(http, adapters: dict) -> dict[str, str]:
    served = [BASE_MODEL, *sorted(a for a, (status, *_) in adapters.items() if status == "ready")]
    return {model: greedy_text(http, ADMIN, model) for model in served}


def test_bad_admin_and_tenant_input_is_refused_with_a_json_error_and_changes_nothing(http, folders, bad_checkpoints):
    """Every row gets its status and a JSON error of its type, with no traceback, and a tenant's or a
    stranger's answer names no other tenant's adapters, no server path and no key. After all of them,
    every adapter's record and its greedy answer are as before, and no adapter was added but the
    rejected records a refused checkpoint leaves (documented in `AdapterSyncer.register`; removed here)."""
    rows = bad_input_rows(folders, bad_checkpoints)
    assert len({row.name for row in rows}) == len(rows), "row names must be unique"
    recorded = {row.body["adapter_id"]: row.reason for row in rows if row.recorded}
    before = observable_state(http)
    texts = greedy_answers(http, before["adapters"])
    assert len(texts) > 3, texts
    problems: list[str] = []
    try:
        for row in rows:
            problems += answer_problems(row, send(row.method, row.path, row.key, row.body), folders)
        after = observable_state(http)
        new = sorted(set(after["adapters"]) - set(before["adapters"]))
        assert {a: v for a, v in after["adapters"].items() if a in before["adapters"]} == before["adapters"], problems
        assert new == sorted(recorded), (new, problems)  # no new adapter, but the documented rejected records
        for adapter_id in new:
            record = http.get(f"/admin/adapters/{adapter_id}", headers=auth(ADMIN)).json()
            assert record["status"] == "rejected" and record["serving"] is None, record
            assert record["current"]["reason_code"] == recorded[adapter_id], record["current"]
        assert after["models"] == before["models"], problems
        assert [s for s in after["sources"] if s[1] not in recorded] == before["sources"], problems
        assert greedy_answers(http, before["adapters"]) == texts, problems
        assert not bad_checkpoints["tripwire"].exists(), "a weights file was unpickled"
        assert not problems, "\n".join(problems)
    finally:
        current = http.get("/admin/adapters", headers=auth(ADMIN)).json()["data"]
        for adapter_id in sorted({r["adapter_id"] for r in current} - set(before["adapters"])):
            assert http.delete(f"/admin/adapters/{adapter_id}", headers=auth(ADMIN)).status_code == 200
    assert observable_state(http) == before


# A body that does not decode (malformed JSON, bad UTF-8) is refused for its key first too: FastAPI
# decodes a body before it runs the route's key dependency, so the ingress checks keys in a
# middleware (deployments/key_check.py) before any body is read.
UNDECODED_BODIES = [
    Row("register: malformed JSON, no key", "POST", "/admin/adapters", None, Raw(b'{"adapter_id": '), 401,
        "unauthorized"),
    Row("register: bad UTF-8, a bad key", "POST", "/admin/adapters", BAD_KEY, Raw(b'{"uri": "\xff"}'), 401,
        "unauthorized"),
    Row("register: malformed JSON, a tenant key", "POST", "/admin/adapters", ACME, Raw(b'{"uri": '), 403, "forbidden"),
    Row("pin: malformed JSON, no key", "POST", "/admin/adapters/acme/pirate/pin", None, Raw(b'{"replicas": '), 401,
        "unauthorized"),
    Row("merge: malformed JSON, no key", "POST", "/v1/adapters/merge", None, Raw(b'{"name": '), 401, "unauthorized"),
    Row("completions: malformed JSON, no key", "POST", "/v1/completions", None, Raw(b'{"model": '), 401, "unauthorized"),
]


@pytest.mark.parametrize("row", [pytest.param(row, id=row.name) for row in UNDECODED_BODIES])
def test_a_body_that_does_not_decode_is_refused_for_its_key_first(http, folders, row):
    problems = answer_problems(row, send(row.method, row.path, row.key, row.body), folders)
    assert not problems, "\n".join(problems)


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

    def warm_on(adapter_id: str) -> list:
        return http.get(f"/admin/adapters/{adapter_id}", headers=auth(ADMIN)).json()["warm_on"]

    # the replicas poll the restarted store (what they hold warm reaches it) and hear its broadcasts
    wait_until(lambda: warm_on("globex/poet"), 30, "the replicas to report to the restarted store", interval_s=0.5)
    assert http.post("/admin/adapters/globex/poet/disable", headers=auth(ADMIN)).status_code == 200
    try:
        wait_until(lambda: not warm_on("globex/poet"), 30, "the replicas to drop the disabled adapter", interval_s=0.5)
    finally:
        assert http.post("/admin/adapters/globex/poet/enable", headers=auth(ADMIN)).status_code == 200
    assert complete(http, GLOBEX, "globex/poet").status_code == 200
