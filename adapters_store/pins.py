"""Which replicas keep which pinned adapter warm: rendezvous hashing over the live replicas.

An admin pins an adapter on N replicas (`POST /admin/adapters/{id}/pin`); the store answers each
replica's poll with the adapters it must keep pinned. Rendezvous (highest random weight)
hashing gives every adapter its own order of replicas, so the N chosen ones stay the same while
the set of replicas does, a replica that dies hands its pins to the next in each order (the
replacement re-warms them), and one that joins takes over only about N/R of the pins. Pure.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

__all__ = ["assign_pins"]


def _weight(adapter_id: str, replica_id: str) -> bytes:
    return hashlib.sha256(f"{adapter_id}\0{replica_id}".encode()).digest()


def assign_pins(pins: Mapping[str, int], replicas: Iterable[str]) -> dict[str, frozenset[str]]:
    """replica id -> the adapters it keeps pinned, for `pins` (adapter id -> replicas wanted);
    an adapter pinned on more replicas than there are is pinned on all of them."""
    live = sorted(set(replicas))
    assigned: dict[str, set[str]] = {replica_id: set() for replica_id in live}
    for adapter_id, wanted in pins.items():
        if wanted < 1:
            continue
        order = sorted(live, key=lambda replica_id: _weight(adapter_id, replica_id), reverse=True)
        for replica_id in order[:wanted]:
            assigned[replica_id].add(adapter_id)
    return {replica_id: frozenset(adapters) for replica_id, adapters in assigned.items()}
