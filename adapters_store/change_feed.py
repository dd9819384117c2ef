"""The store's change feed: what replicas long-poll to learn that an adapter changed.

Every change gets the next sequence number. A subscriber asks for everything after the last
number it saw and blocks until there is something or its timeout ends. It gets a full resync
(every adapter's serving version) instead of a delta when it has never polled, when the feed was
restarted (a new `epoch`: the store actor restarted and its numbers started over), or when the
changes it missed fell out of the bounded history. So a replica that restarts, or a store that
restarts, never leaves a replica on a stale version.

Pure (stdlib only, threads): the store actor runs it with `max_concurrency` threads. The
messages themselves (`AdapterChange`, `ChangeBatch`) live in `lora_core.changes`.
"""

from __future__ import annotations

import threading
import uuid
from collections import deque
from typing import Callable, Mapping

from lora_core.changes import AdapterChange, ChangeBatch

__all__ = ["ChangeFeed"]


class ChangeFeed:
    def __init__(self, serving: Callable[[], Mapping[str, str]], history: int = 10_000) -> None:
        self.epoch = uuid.uuid4().hex
        self._serving = serving
        self._seq = 0
        self._history: deque[tuple[int, AdapterChange]] = deque(maxlen=history)
        self._changed = threading.Condition()

    @property
    def seq(self) -> int:
        return self._seq

    def publish(self, changes: list[AdapterChange]) -> int:
        with self._changed:
            for change in changes:
                self._seq += 1
                self._history.append((self._seq, change))
            self._changed.notify_all()
            return self._seq

    def poll(self, epoch: str | None, since: int, timeout_s: float) -> ChangeBatch:
        with self._changed:
            if epoch != self.epoch or since > self._seq or self._missed(since):
                return ChangeBatch(self.epoch, self._seq, resync=True, serving=dict(self._serving()))
            self._changed.wait_for(lambda: self._seq > since, timeout=timeout_s)
            if self._missed(since):
                return ChangeBatch(self.epoch, self._seq, resync=True, serving=dict(self._serving()))
            changes = tuple(change for seq, change in self._history if seq > since)
            return ChangeBatch(self.epoch, self._seq, changes)

    def _missed(self, since: int) -> bool:
        """Changes after `since` fell out of the history."""
        return bool(self._history) and self._history[0][0] > since + 1 and self._seq > since
