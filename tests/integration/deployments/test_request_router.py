"""The adapter-affinity request router on a real local Ray: two LoraReplica replicas, each
adapter loads on one replica only (Ray's default router thrashes the slots instead)."""

from __future__ import annotations

import asyncio
import time

import pytest

from deployments.contracts import GenerationChunk
from deployments.request_router import affinity_request_router_config
from tests.support.requests import request

MAX_ONGOING = 8

ADAPTERS = ("acme/pirate", "globex/poet", "initech/clerk")


@pytest.fixture(scope="module")
def lora_replicas(tmp_path_factory):
    """Two LoraReplica replicas behind this router; Ray is always shut down, nothing left behind."""
    from ray import serve

    from deployments.replica import LoraReplica
    from tests.support.adapters import make_peft_adapter
    from tests.support.ray_cluster import local_ray

    root = tmp_path_factory.mktemp("adapters")
    folders = {
        adapter_id: str(make_peft_adapter(root / adapter_id.replace("/", "__"), seed=index))
        for index, adapter_id in enumerate(ADAPTERS)
    }
    settings = {
        "base_model": "tiny-random-llama",
        "compile": "off",
        "num_slots": 2,
        "max_num_seqs": 2,
        "max_seq_len": 64,
        "max_new_tokens": 8,
        "adapters": folders,
    }
    with local_ray(http_port=None):
        app = LoraReplica.options(
            num_replicas=2,
            max_ongoing_requests=MAX_ONGOING,
            ray_actor_options={"num_cpus": 0.5},
            request_router_config=affinity_request_router_config(stats_period_s=0.5),
        ).bind(settings)
        yield serve.run(app, name="affinity", route_prefix=None)


async def replica_stats(handle, num_replicas: int) -> dict[str, dict]:
    """Each replica's `stats()`, found by asking until every replica has answered."""
    found: dict[str, dict] = {}
    deadline = time.monotonic() + 20
    while len(found) < num_replicas and time.monotonic() < deadline:
        answers = await asyncio.gather(*(handle.stats.remote() for _ in range(4 * num_replicas)))
        found.update({answer["replica_id"]: answer for answer in answers})
    assert len(found) == num_replicas
    return found


@pytest.mark.integration
def test_each_adapter_loads_on_one_replica_only(lora_replicas):
    """This router keeps every adapter where it first loaded. Ray's default router, same test:
    each adapter on both replicas, 3 adapters thrashing 2 x 2 slots, 21 misses instead of 3."""
    handle = lora_replicas

    async def generate(adapter_id: str) -> GenerationChunk:
        return await handle.options(multiplexed_model_id=adapter_id).generate.remote(
            request("hi", adapter_id, max_tokens=2)
        )

    async def scenario() -> dict[str, dict]:
        for adapter_id in ADAPTERS:  # one at a time: each cold adapter finds its replica
            await generate(adapter_id)
        for _ in range(10):  # then rounds with one request per adapter at once
            results = await asyncio.gather(*(generate(adapter_id) for adapter_id in ADAPTERS))
            assert all(result.completion_tokens >= 1 for result in results)
        base = await asyncio.gather(*(handle.generate.remote(request("hi", max_tokens=2)) for _ in range(4)))
        assert all(result.completion_tokens >= 1 for result in base)
        return await replica_stats(handle, 2)

    started = time.perf_counter()
    per_replica = asyncio.run(scenario())
    print(f"routed {len(ADAPTERS) * 11} adapter requests in {time.perf_counter() - started:.1f} s")
    slots = {replica_id: answer["slots"] for replica_id, answer in per_replica.items()}
    warm_on = {adapter_id: [r for r, s in slots.items() if adapter_id in s["warm"]] for adapter_id in ADAPTERS}
    assert sum(s["misses"] for s in slots.values()) == len(ADAPTERS), slots
    assert sum(s["evictions"] for s in slots.values()) == 0, slots
    assert all(len(replicas) == 1 for replicas in warm_on.values()), warm_on
    assert sum(s["hits"] + s["misses"] for s in slots.values()) == len(ADAPTERS) * 11, slots
