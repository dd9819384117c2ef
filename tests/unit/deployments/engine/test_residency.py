"""AdapterResidency: the one answer to "which version is where", and the store's changes applied
through its one method, `follow_store`, on a real engine (tiny model, no Ray)."""

from __future__ import annotations

import threading

import pytest

from benchmarks.common import wait_until
from deployments.engine.residency import Placement
from lora_core.checkpoint import read_checkpoint
from lora_core.errors import AdapterNotFoundError
from tests.support.adapters import make_peft_adapter
from tests.support.requests import request


class FakeStore:
    """The replica's view of the store: id -> (checkpoint, version), and a count of fetches."""

    def __init__(self, folders: dict[str, object]) -> None:
        self.serving = {adapter_id: read_checkpoint(folder) for adapter_id, folder in folders.items()}
        self.fetches: list[str] = []

    def resolve(self, adapter_id: str):
        self.fetches.append(adapter_id)
        if adapter_id not in self.serving:
            raise AdapterNotFoundError(f"{adapter_id} is not in the store")
        checkpoint = self.serving[adapter_id]
        return checkpoint, checkpoint.version

    def publish(self, adapter_id: str, folder) -> str:
        self.serving[adapter_id] = read_checkpoint(folder)
        return self.serving[adapter_id].version


@pytest.fixture
def folders(adapter_factory):
    return {f"acme/a{i}": adapter_factory(f"a{i}", seed=i) for i in range(3)} | {"new": adapter_factory("new", seed=9)}


@pytest.fixture
def store(folders):
    return FakeStore({adapter_id: folder for adapter_id, folder in folders.items() if adapter_id != "new"})


def version_of(folder) -> str:
    return read_checkpoint(folder).version


def test_placements_say_where_every_version_is(engine_factory, store, folders):
    engine = engine_factory(resolver=store.resolve, host_cache_bytes=1 << 30)
    local_version = engine.register_adapter("acme/local", folders["acme/a0"])
    assert engine.residency.placements() == {"acme/local": Placement("acme/local", None, local_version, "local")}
    engine.generate("hi", "acme/a1", max_tokens=2, temperature=0)  # through the store, into a slot
    slot = engine.residency.placement("acme/a1").slot
    placements = engine.residency.placements()
    assert placements["acme/a1"] == Placement("acme/a1", slot, version_of(folders["acme/a1"]), "store")
    assert engine.residency.warm_versions() == {"acme/a1": version_of(folders["acme/a1"])}
    engine.evict("acme/a1")
    assert "acme/a1" not in engine.residency.placements()


def test_a_new_version_of_a_warm_adapter_is_fetched_and_its_next_batch_runs_it(engine_factory, store, folders):
    engine = engine_factory(resolver=store.resolve)
    before = engine.generate("version test", "acme/a0", max_tokens=12, temperature=0).text
    new_version = store.publish("acme/a0", folders["new"])
    store.fetches.clear()
    warm = engine.residency.follow_store({"acme/a0": new_version}, complete=False, fetch=store.resolve)
    assert store.fetches == ["acme/a0"]
    assert warm == {"acme/a0": new_version}  # the host copy is new: the next batch rewrites the slot
    after = engine.generate("version test", "acme/a0", max_tokens=12, temperature=0).text
    assert after != before
    assert engine.residency.placement("acme/a0").version == new_version
    assert engine.stats()["slots"]["swaps"] == 2


def test_a_new_version_of_a_cached_adapter_is_dropped_not_fetched(engine_factory, store, folders):
    engine = engine_factory(resolver=store.resolve)
    engine.generate("hi", "acme/a0", max_tokens=2, temperature=0)
    engine.evict("acme/a0")
    engine.residency.host_entry("acme/a0")  # in the host cache, in no slot
    assert engine.residency.placement("acme/a0").slot is None
    new_version = store.publish("acme/a0", folders["new"])
    store.fetches.clear()
    engine.residency.follow_store({"acme/a0": new_version}, complete=False, fetch=store.resolve)
    assert store.fetches == [] and engine.residency.placement("acme/a0") is None
    engine.generate("hi", "acme/a0", max_tokens=2, temperature=0)  # its next use loads the new one
    assert engine.residency.placement("acme/a0").version == new_version


def test_a_deleted_adapter_is_removed_and_its_slot_zeroed(engine_factory, store):
    engine = engine_factory(resolver=store.resolve)
    slot = engine.warm("acme/a0")
    engine.residency.follow_store({"acme/a0": None}, complete=False, fetch=store.resolve)
    assert engine.residency.placement("acme/a0") is None
    assert all(not layer.lora_a[slot].any() for layer in engine.slot_model.layers.values())


def test_a_warm_adapter_the_store_no_longer_has_is_deleted(engine_factory, store):
    engine = engine_factory(resolver=store.resolve)
    engine.warm("acme/a0")
    del store.serving["acme/a0"]
    engine.residency.follow_store({"acme/a0": "some-new-version"}, complete=False, fetch=store.resolve)
    assert engine.residency.placement("acme/a0") is None


def test_a_resync_applies_every_held_store_adapter_and_leaves_local_ones(engine_factory, store, folders):
    engine = engine_factory(resolver=store.resolve)
    engine.register_adapter("acme/local", folders["acme/a2"])
    for adapter_id in ("acme/a0", "acme/a1"):
        engine.warm(adapter_id)
    store.fetches.clear()
    warm = engine.residency.follow_store({"acme/a0": version_of(folders["acme/a0"])}, complete=True, fetch=store.resolve)
    assert store.fetches == []  # a0 is on the serving version: untouched
    assert set(engine.residency.placements()) == {"acme/a0", "acme/local"}  # a1 is not served any more
    assert warm == {"acme/a0": version_of(folders["acme/a0"])}


def test_one_adapters_failure_does_not_stop_the_others(engine_factory, store, folders):
    engine = engine_factory(resolver=store.resolve)
    engine.warm("acme/a0")
    engine.warm("acme/a1")
    new_version = store.publish("acme/a1", folders["new"])

    def fetch(adapter_id):
        if adapter_id == "acme/a0":
            raise RuntimeError("the object store lost it")
        return store.resolve(adapter_id)

    warm = engine.residency.follow_store({"acme/a0": "other", "acme/a1": new_version}, complete=False, fetch=fetch)
    assert warm["acme/a1"] == new_version and warm["acme/a0"] == version_of(folders["acme/a0"])
    assert engine.generate("hi", "acme/a1", max_tokens=2, temperature=0).completion_tokens >= 1


def test_requests_waiting_for_a_deleted_adapter_fail_and_its_load_is_dropped(engine_factory, store):
    gate = threading.Event()

    def held(adapter_id):
        assert gate.wait(timeout=10)
        return store.resolve(adapter_id)

    engine = engine_factory(resolver=held)
    handle = engine.submit(request("hi", "acme/a0", max_tokens=2))  # queued behind its load
    engine.residency.follow_store({"acme/a0": None}, complete=False, fetch=store.resolve)
    with pytest.raises(AdapterNotFoundError, match="deleted"):
        handle.result()
    gate.set()
    wait_until(lambda: not engine.residency.is_loading("acme/a0"), 10, "the staled load to end")
    assert engine.residency.placement("acme/a0") is None  # the load in flight was staled


def test_store_pins_are_applied_exactly_and_other_pins_left_alone(engine_factory, tmp_path):
    engine = engine_factory(num_slots=4)  # at most 3 may be pinned
    for seed, name in enumerate(("a", "b", "c")):
        engine.register_adapter(f"acme/{name}", make_peft_adapter(tmp_path / name, seed=seed, r=4))
    engine.warm("acme/c", pin=True)  # pinned by someone else (a Python caller)
    residency = engine.residency
    residency.apply_store_pins(frozenset({"acme/a", "acme/b"}))
    assert set(residency.pool_snapshot().pinned) == {"acme/a", "acme/b", "acme/c"}
    assert residency.adapter_reports()["acme/a"].pinned
    residency.apply_store_pins(frozenset({"acme/b", "acme/nobody"}))  # an unknown one is logged, not fatal
    assert set(residency.pool_snapshot().pinned) == {"acme/b", "acme/c"}
    assert "acme/b" in engine.routing_stats().pinned


def test_the_engine_setting_picks_the_slot_pools_admission(engine_factory):
    from deployments.engine.admission import LruAdmission, TinyLfuAdmission

    assert isinstance(engine_factory().residency.pool.admission, TinyLfuAdmission)
    assert isinstance(engine_factory(slot_admission="lru").residency.pool.admission, LruAdmission)
