"""The host-memory adapter cache: bounded by bytes, LRU, one load per adapter in flight."""

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from deployments.engine.host_cache import CacheEntry, HostCache


@dataclass(frozen=True)
class Blob:
    size_bytes: int


@pytest.fixture
def executor():
    with ThreadPoolExecutor(max_workers=4) as pool:
        yield pool


def test_lru_by_bytes(executor):
    cache = HostCache(100, executor)
    cache.put("a", Blob(40), "v1")
    cache.put("b", Blob(40), "v1")
    assert cache.get("a").version == "v1"
    cache.put("c", Blob(40), "v1")
    assert "b" not in cache and "a" in cache and "c" in cache
    snapshot = cache.snapshot()
    assert snapshot.size_bytes == 80 and snapshot.evictions == 1 and snapshot.entries == 2


def test_replacing_an_entry_updates_size_and_version(executor):
    cache = HostCache(100, executor)
    cache.put("a", Blob(40), "v1")
    cache.put("a", Blob(10), "v2")
    assert cache.get("a").version == "v2"
    assert cache.snapshot().size_bytes == 10


def test_an_entry_larger_than_capacity_is_kept_alone(executor):
    cache = HostCache(100, executor)
    cache.put("a", Blob(40), "v1")
    cache.put("huge", Blob(500), "v1")
    assert "huge" in cache and "a" not in cache


def test_concurrent_loads_of_one_adapter_run_the_loader_once(executor):
    cache = HostCache(100, executor)
    calls = []
    release = threading.Event()

    def loader():
        calls.append(1)
        release.wait(5)
        return CacheEntry(Blob(10), "v1")

    futures = [cache.load("a", loader) for _ in range(5)]
    assert cache.is_loading("a")
    release.set()
    assert {future.result(5).version for future in futures} == {"v1"}
    assert calls == [1]
    assert not cache.is_loading("a") and "a" in cache


def test_a_failed_load_is_not_remembered(executor):
    cache = HostCache(100, executor)

    def failing():
        raise RuntimeError("s3 down")

    with pytest.raises(RuntimeError):
        cache.load("a", failing).result(5)
    assert "a" not in cache and not cache.is_loading("a")
    assert cache.load("a", lambda: CacheEntry(Blob(1), "v2")).result(5).version == "v2"


def test_membership_does_not_count_as_a_hit(executor):
    cache = HostCache(100, executor)
    cache.put("a", Blob(1), "v1")
    assert "a" in cache and "z" not in cache
    snapshot = cache.snapshot()
    assert snapshot.hits == 0 and snapshot.misses == 0
    assert cache.get("z") is None and cache.snapshot().misses == 1


def test_invalidate_drops_the_entry_and_stales_a_load_in_flight(executor):
    cache = HostCache(100, executor)
    cache.put("a", Blob(30), "v1")
    cache.invalidate("a")
    assert "a" not in cache and cache.snapshot().size_bytes == 0
    gate = threading.Event()

    def load():
        assert gate.wait(timeout=10)
        return CacheEntry(Blob(10), "old")

    future = cache.load("b", load)
    cache.invalidate("b")  # a newer version landed while "old" was loading
    gate.set()
    assert future.result().version == "old"  # the waiting caller still gets what it asked for
    assert "b" not in cache  # but the stale result is not kept
