"""Per-tenant shares of the app's queue at the ingress: a tenant may have at most its share of
the requests the replicas can hold (running and queued) in flight at once, so one tenant's
flood cannot fill Serve's shared queue, which would answer 503 to everyone else.

`QueueShares.hold(tenant)` counts a request in flight for as long as the block runs, or raises
`RateLimitedError` (429 with `Retry-After`) when the tenant already holds its share. A plain
request is held until it is answered, a stream until its first token (from then on it has a row,
which the engine shares fairly, `engine.fair_share`). Counters are per tenant name and dropped at
zero, so their number is bounded by the configured tenants. Pure module: no Ray, no FastAPI.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator

from lora_core.errors import RateLimitedError

__all__ = ["QueueShares", "RETRY_AFTER_S"]

RETRY_AFTER_S = 1  # a request in flight ends within about that long under load


class QueueShares:
    """Thread-safe; `limit_for(tenant)` says how many requests a tenant may have in flight (None: no limit)."""

    def __init__(self, limit_for: Callable[[str], int | None]) -> None:
        self._limit_for = limit_for
        self._in_flight: dict[str, int] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def hold(self, tenant: str) -> Iterator[None]:
        limit = self._limit_for(tenant)
        if limit is None:
            yield
            return
        with self._lock:
            held = self._in_flight.get(tenant, 0)
            if held >= limit:
                raise RateLimitedError(
                    f"tenant {tenant!r} has {held} requests in flight, its share of this server's queue; "
                    "retry when one finishes", RETRY_AFTER_S)
            self._in_flight[tenant] = held + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._in_flight[tenant] - 1
                if left:
                    self._in_flight[tenant] = left
                else:
                    del self._in_flight[tenant]

    def in_flight(self, tenant: str) -> int:
        with self._lock:
            return self._in_flight.get(tenant, 0)
