"""The messages the adapter store sends replicas when adapters change (through its change feed).

Frozen dataclasses: they cross Ray pickled, between the store actor and every replica.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["AdapterChange", "ChangeBatch"]


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

    def versions(self) -> dict[str, str | None]:
        """adapter id -> its serving version, None for deleted; on a resync, every served adapter."""
        if self.resync:
            return dict(self.serving)
        return {change.adapter_id: change.version for change in self.changes}
