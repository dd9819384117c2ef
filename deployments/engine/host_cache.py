"""A bounded host-memory cache of prepared adapters, with one load in flight per adapter.

A slot miss first looks here, so warm-again adapters need no network and no re-validation.
Two requests for the same cold adapter share one load future (Ray's `LoraModelLoader` shields a
shared task for the same reason). Pure Python: no torch, no Ray; entries report their own size.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Callable, Generic, Protocol, TypeVar


class Sized(Protocol):
    size_bytes: int


EntryT = TypeVar("EntryT", bound=Sized)


@dataclass(frozen=True)
class CacheEntry(Generic[EntryT]):
    value: EntryT
    version: str


@dataclass(frozen=True)
class HostCacheSnapshot:
    entries: int
    size_bytes: int
    capacity_bytes: int
    hits: int
    misses: int
    evictions: int
    loading: tuple[str, ...]


class HostCache(Generic[EntryT]):
    """LRU by bytes. An entry larger than the whole capacity is still kept (alone): the engine
    needs it for the swap it is about to do, and the bound applies to everything else."""

    def __init__(self, capacity_bytes: int, executor: Executor) -> None:
        if capacity_bytes < 0:
            raise ValueError("capacity_bytes must be >= 0")
        self.capacity_bytes = capacity_bytes
        self._executor = executor
        self._entries: OrderedDict[str, CacheEntry[EntryT]] = OrderedDict()
        self._loading: dict[str, Future] = {}
        self._stale: set[str] = set()  # loads in flight whose result is already outdated
        self._size_bytes = 0
        self._hits = self._misses = self._evictions = 0
        self._lock = threading.Lock()

    def get(self, adapter_id: str) -> CacheEntry[EntryT] | None:
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is None:
                self._misses += 1
                return None
            self._entries.move_to_end(adapter_id)
            self._hits += 1
            return entry

    def put(self, adapter_id: str, value: EntryT, version: str) -> None:
        with self._lock:
            self._put_locked(adapter_id, CacheEntry(value, version))

    def invalidate(self, adapter_id: str) -> None:
        """Drop the entry, and the result of a load already in flight (it may hold an old version)."""
        with self._lock:
            entry = self._entries.pop(adapter_id, None)
            if entry is not None:
                self._size_bytes -= entry.value.size_bytes
            if adapter_id in self._loading:
                self._stale.add(adapter_id)

    def versions(self) -> dict[str, str]:
        """adapter id -> cached version, without touching LRU order or hit counts."""
        with self._lock:
            return {adapter_id: entry.version for adapter_id, entry in self._entries.items()}

    def load(self, adapter_id: str, loader: Callable[[], CacheEntry[EntryT]]) -> Future:
        """Start (or join) the load of an adapter; the future resolves to its CacheEntry."""
        with self._lock:
            future = self._loading.get(adapter_id)
            if future is not None:
                return future
            future = self._executor.submit(self._run_load, adapter_id, loader)
            self._loading[adapter_id] = future
            return future

    def __contains__(self, adapter_id: str) -> bool:
        """Membership without touching LRU order or hit counts."""
        with self._lock:
            return adapter_id in self._entries

    def is_loading(self, adapter_id: str) -> bool:
        with self._lock:
            return adapter_id in self._loading

    def _run_load(self, adapter_id: str, loader: Callable[[], CacheEntry[EntryT]]) -> CacheEntry[EntryT]:
        try:
            entry = loader()
            with self._lock:
                if adapter_id in self._stale:
                    self._stale.discard(adapter_id)
                else:
                    self._put_locked(adapter_id, entry)
            return entry
        finally:
            with self._lock:
                self._loading.pop(adapter_id, None)
                self._stale.discard(adapter_id)

    def _put_locked(self, adapter_id: str, entry: CacheEntry[EntryT]) -> None:
        old = self._entries.pop(adapter_id, None)
        if old is not None:
            self._size_bytes -= old.value.size_bytes
        self._entries[adapter_id] = entry
        self._size_bytes += entry.value.size_bytes
        while self._size_bytes > self.capacity_bytes and len(self._entries) > 1:
            _, evicted = self._entries.popitem(last=False)
            self._size_bytes -= evicted.value.size_bytes
            self._evictions += 1

    def snapshot(self) -> HostCacheSnapshot:
        with self._lock:
            return HostCacheSnapshot(
                entries=len(self._entries),
                size_bytes=self._size_bytes,
                capacity_bytes=self.capacity_bytes,
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                loading=tuple(self._loading),
            )
