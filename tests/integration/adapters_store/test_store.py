"""The AdapterStore actor on a real local Ray: detached and named (joined with get_if_exists),
weights shared through the object store, long-poll change feed, restart without loss, and
replicas that swap a new version into their warm slots between batches."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from benchmarks.common import wait_until
from lora_core.checkpoint import read_checkpoint
from lora_core.payload import checkpoint_from_payload
from lora_core.settings import EngineConfig, SourceInput, StoreConfig
from tests.support.adapters import make_peft_adapter
from tests.support.ray_cluster import local_ray
from tests.support.requests import request

pytestmark = pytest.mark.integration

ENGINE = EngineConfig(base_model="tiny-random-llama", compile="off", num_slots=2, max_num_seqs=4,
                      max_seq_len=64, max_new_tokens=8)


def wait_for(predicate, what: str):
    return wait_until(predicate, 30.0, what, interval_s=0.1)


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    with local_ray(http_port=None):
        yield ray


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    root = tmp_path_factory.mktemp("templates")
    return {seed: make_peft_adapter(root / f"seed{seed}", seed=seed) for seed in (0, 1, 2)}


class SourceRoot(type(Path())):
    """The local source folder; `place(adapter_id, seed)` puts (or replaces) an adapter in it."""

    templates: dict = {}

    def place(self, adapter_id: str, seed: int) -> Path:
        folder = self / adapter_id
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(self.templates[seed], folder)
        return folder


@pytest.fixture
def source_root(tmp_path, templates):
    SourceRoot.templates = templates
    root = SourceRoot(tmp_path / "adapters")
    root.place("acme/pirate", 0)
    return root


@pytest.fixture
def store(ray_cluster, tmp_path, source_root):
    from adapters_store.store import get_or_create_store

    config = StoreConfig(name=f"store-{tmp_path.name}", root=str(tmp_path / "store"),
                         sources=[SourceInput(uri=str(source_root))], sync_interval_s=0.5)
    handle = get_or_create_store(config, ENGINE)
    wait_for(lambda: ray_cluster.get(handle.status.remote())["serving"] == 1, what="the first sync")
    yield handle
    ray_cluster.kill(handle)


def test_store_is_named_detached_and_joined(ray_cluster, store, tmp_path):
    from adapters_store.store import get_or_create_store, get_store

    config = StoreConfig(name=f"store-{tmp_path.name}", root=str(tmp_path / "store"))
    assert get_or_create_store(config, ENGINE)._actor_id == store._actor_id
    assert get_store(config)._actor_id == store._actor_id


def test_locate_hands_out_the_validated_weights_through_the_object_store(ray_cluster, store, source_root):
    version, [ref] = ray_cluster.get(store.locate.remote("acme/pirate"))
    again, [same] = ray_cluster.get(store.locate.remote("acme/pirate"))
    assert again == version and same == ref  # put once per version
    checkpoint = checkpoint_from_payload(ray_cluster.get(ref))
    expected = read_checkpoint(source_root / "acme" / "pirate")
    assert checkpoint.sha256 == expected.sha256 and checkpoint.modules.keys() == expected.modules.keys()
    for name, weights in expected.modules.items():
        assert torch.equal(checkpoint.modules[name].lora_a, weights.lora_a)
        assert torch.equal(checkpoint.modules[name].lora_b, weights.lora_b)
    from lora_core.errors import AdapterNotFoundError

    for index in range(20):  # ids any caller sends leave nothing behind in the store
        with pytest.raises(AdapterNotFoundError):
            ray_cluster.get(store.locate.remote(f"acme/nobody-{index}"))
    locks = ray_cluster.get(store.__ray_call__.remote(lambda self: sorted(self._payload_locks)))
    assert all("nobody" not in adapter_id for adapter_id in locks) and "acme/pirate" in locks


def test_poll_resyncs_first_then_waits_for_changes(ray_cluster, store, source_root):
    first = ray_cluster.get(store.poll.remote("r1", None, 0, {}, 1.0))
    assert first.resync and set(first.serving) == {"acme/pirate"}
    started = time.monotonic()
    empty = ray_cluster.get(store.poll.remote("r1", first.epoch, first.seq, {}, 0.5))
    assert not empty.resync and empty.changes == () and time.monotonic() - started >= 0.4

    result = {}
    poller = threading.Thread(target=lambda: result.update(
        batch=ray_cluster.get(store.poll.remote("r1", first.epoch, first.seq, {"acme/pirate": "v"}, 20.0))))
    poller.start()
    source_root.place("acme/pirate", 1)
    poller.join(timeout=30)
    batch = result["batch"]
    assert [c.adapter_id for c in batch.changes] == ["acme/pirate"]
    assert batch.changes[0].version != first.serving["acme/pirate"]
    assert ray_cluster.get(store.status.remote())["replicas"] == {"r1": ["acme/pirate"]}


def test_a_killed_store_restarts_with_nothing_lost(ray_cluster, store, source_root, tmp_path):
    ray_cluster.get(store.register.remote("globex/support", str(source_root / "acme" / "pirate")))
    before = ray_cluster.get(store.list_adapters.remote())
    epoch = ray_cluster.get(store.status.remote())["epoch"]
    ray_cluster.kill(store, no_restart=False)
    wait_for(lambda: (status := _status_or_none(ray_cluster, store)) and status["epoch"] != epoch,
             what="the restarted store (a new epoch)")
    after = ray_cluster.get(store.list_adapters.remote())
    assert [(r["adapter_id"], r["serving"]) for r in after] == [(r["adapter_id"], r["serving"]) for r in before]
    assert ray_cluster.get(store.locate.remote("globex/support"))[0] == after[0]["serving"]["version"]


def _status_or_none(ray_cluster, store):
    try:
        return ray_cluster.get(store.status.remote(), timeout=5)
    except Exception:
        return None


def test_bad_registrations_are_refused_and_change_nothing(ray_cluster, store, source_root, tmp_path):
    from lora_core.errors import InvalidAdapterError, InvalidAdapterIdError

    before = ray_cluster.get(store.list_adapters.remote())
    bad = make_peft_adapter(tmp_path / "big", r=32)
    with pytest.raises(InvalidAdapterIdError):
        ray_cluster.get(store.register.remote("acme/../../etc", str(source_root / "acme" / "pirate")))
    with pytest.raises(InvalidAdapterError) as refused:
        ray_cluster.get(store.register.remote("acme/pirate", str(bad)))
    assert refused.value.reason == "rank_too_large"
    after = ray_cluster.get(store.list_adapters.remote())
    assert [r["serving"] for r in after] == [r["serving"] for r in before]


def test_replicas_swap_a_new_version_into_warm_slots(ray_cluster, store, source_root, tmp_path):
    from ray import serve

    from deployments.replica import LoraReplica

    config = StoreConfig(name=f"store-{tmp_path.name}", root=str(tmp_path / "store"))
    settings = {**ENGINE.model_dump(mode="json"), "store": config.model_dump(mode="json")}
    handle = serve.run(
        LoraReplica.options(num_replicas=2, ray_actor_options={"num_cpus": 0.5}).bind(settings),
        name="store-test", route_prefix=None,
    )
    try:
        greedy = request("hello", "acme/pirate", max_tokens=4)
        for _ in range(8):
            handle.generate.remote(greedy).result()
        warm_replicas = set(wait_for(lambda: ray_cluster.get(store.get.remote("acme/pirate"))["warm_on"],
                                     what="replicas reporting the adapter warm"))
        old = ray_cluster.get(store.get.remote("acme/pirate"))["serving"]["version"]
        failures = []
        stop = threading.Event()

        def keep_asking():
            while not stop.is_set():
                try:
                    handle.generate.remote(greedy).result()
                except Exception as error:  # counted: an update must not fail a request
                    failures.append(error)

        client = threading.Thread(target=keep_asking)
        client.start()
        source_root.place("acme/pirate", 2)
        new = wait_for(lambda: (v := ray_cluster.get(store.get.remote("acme/pirate"))["serving"]["version"]) != old and v,
                       what="the new version")
        record = wait_for(lambda: (r := ray_cluster.get(store.get.remote("acme/pirate")))["warm_on"] and
                          all(_warm_version(ray_cluster, store, rid) == new for rid in r["warm_on"]) and r,
                          what="every warm replica on the new version")
        stop.set()
        client.join(timeout=30)
        assert failures == []
        assert warm_replicas <= set(record["warm_on"])  # the client may warm the other replica meanwhile
    finally:
        serve.delete("store-test")


def _warm_version(ray_cluster, store, replica_id):
    return ray_cluster.get(store.replica_versions.remote(replica_id)).get("acme/pirate")


def test_a_changed_store_config_is_applied_to_the_running_store_or_moves_it(ray_cluster, tmp_path, templates):
    """`serve deploy` with new store settings: new sources and intervals apply to the running
    actor (no restart, its registry kept); a new root replaces it, the old manifest left in place."""
    from adapters_store.store import get_or_create_store

    first, second = SourceRoot(tmp_path / "first"), SourceRoot(tmp_path / "second")
    first.templates = second.templates = templates
    first.place("acme/one", 0)
    second.place("acme/two", 1)
    config = StoreConfig(name="config-change-store", root=str(tmp_path / "store"), sync_interval_s=30,
                         sources=[SourceInput(uri=str(first))])
    store = get_or_create_store(config, ENGINE)
    ray_cluster.get(store.sync_now.remote())
    actor_id = store._actor_id
    changed = config.model_copy(update={"sync_interval_s": 0.5,
                                        "sources": [SourceInput(uri=str(first)), SourceInput(uri=str(second))]})
    again = get_or_create_store(changed, ENGINE)
    assert again._actor_id == actor_id  # the same actor
    status = ray_cluster.get(again.status.remote())
    assert status["sync_interval_s"] == 0.5 and len(status["sources"]) == 2
    wait_for(lambda: {r["adapter_id"] for r in ray_cluster.get(again.list_adapters.remote())} == {"acme/one", "acme/two"},
             "the new source to be synced on the new interval")

    moved = get_or_create_store(changed.model_copy(update={"root": str(tmp_path / "store2")}), ENGINE)
    assert moved._actor_id != actor_id and ray_cluster.get(moved.root.remote()) == str((tmp_path / "store2").resolve())
    assert (tmp_path / "store" / "manifest.json").is_file()  # the old root's registry is kept
    ray_cluster.kill(moved)


def test_demand_pins_and_leaving_as_the_replicas_report_them(ray_cluster, store, source_root):
    """What autoscaling asks the store: the adapters live replicas served most (a new replica's
    prewarm), the pin floor (scale-in never under it), and a leaving replica's pins moving."""
    from lora_core.changes import AdapterOnReplica

    source_root.place("acme/poet", 2)
    ray_cluster.get(store.sync_now.remote())
    first = ray_cluster.get(store.poll.remote("r1", None, 0, {}, 0.1, {
        "acme/pirate": AdapterOnReplica(requests=3), "acme/poet": AdapterOnReplica(requests=1)}))
    ray_cluster.get(store.poll.remote("r2", None, 0, {}, 0.1, {
        "acme/poet": AdapterOnReplica(requests=5), "acme/gone": AdapterOnReplica(requests=9)}))
    demand = ray_cluster.get(store.adapter_demand.remote(8))
    assert list(demand.requests.items()) == [("acme/poet", 6), ("acme/pirate", 3)]  # not served: left out
    assert demand.replica_ids == ("r1", "r2")
    assert list(ray_cluster.get(store.adapter_demand.remote(1)).requests) == ["acme/poet"]
    assert first.pin_floor == 0

    ray_cluster.get(store.pin.remote("acme/pirate", 1))
    r1, r2 = (ray_cluster.get(store.poll.remote(r, None, 0, {}, 0.1)) for r in ("r1", "r2"))
    assert r1.pin_floor == r2.pin_floor == 1 and len(r1.pins | r2.pins) == 1
    holder = "r1" if r1.pins else "r2"
    ray_cluster.get(store.leave.remote(holder))
    other = "r2" if holder == "r1" else "r1"
    assert ray_cluster.get(store.poll.remote(other, None, 0, {}, 0.1)).pins == frozenset({"acme/pirate"})
    assert ray_cluster.get(store.adapter_demand.remote(8)).replica_ids == (other,)
