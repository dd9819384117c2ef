"""The messages between the adapter store and replicas: the changes it sends them (through its
change feed), and what each replica reports back about the adapters it holds.

Frozen dataclasses: they cross Ray pickled, between the store actor and every replica.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["AdapterChange", "AdapterDemand", "AdapterOnReplica", "ChangeBatch"]


@dataclass(frozen=True)
class AdapterChange:
    adapter_id: str
    version: str | None  # None: deleted, or no valid version serves any more


@dataclass(frozen=True)
class ChangeBatch:
    """One long-poll answer: the changes after the caller's `seq`, or a full resync."""

    epoch: str
    seq: int  # pass it back as `since` on the next poll
    changes: tuple[AdapterChange, ...] = ()
    resync: bool = False
    """True: `serving` holds every adapter's serving version; forget anything not in it."""
    serving: Mapping[str, str] = field(default_factory=dict)
    pins: frozenset[str] = frozenset()
    """The adapters the polling replica must keep warm and never evict (an admin's pins)."""
    pin_floor: int = 0
    """The most replicas one adapter is pinned on: autoscaling never scales in under it."""

    def versions(self) -> dict[str, str | None]:
        """adapter id -> its serving version, None for deleted; on a resync, every served adapter."""
        if self.resync:
            return dict(self.serving)
        return {change.adapter_id: change.version for change in self.changes}


@dataclass(frozen=True)
class AdapterOnReplica:
    """One adapter as one replica holds it (`GET /admin/adapters/{id}` shows one per replica)."""

    version: str | None = None
    """The version its next batch runs there; None when only its folder is known."""
    slot: int | None = None
    pinned: bool = False
    last_swap_ms: float | None = None
    requests: int = 0
    tokens: int = 0
    """Requests that ended there, and the tokens they generated."""
    validation: str | None = None
    """"ok", or why the last version checked there was rejected; None: none checked yet."""


@dataclass(frozen=True)
class AdapterDemand:
    """What a starting replica asks the store, to choose what to prewarm."""

    requests: Mapping[str, int] = field(default_factory=dict)
    """Requests the live replicas served, per adapter that is served now (most requested first)."""
    replica_ids: tuple[str, ...] = ()
    """The replicas the store heard from lately: the others the routers place adapters among."""
