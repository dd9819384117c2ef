"""Per-tenant rate limits at the ingress: a token bucket per tenant, so one tenant's flood is
answered 429 (with `Retry-After`) before it takes queue places and rows from the others.

`RateLimit` is the config (`TenantsConfig.rate_limit`, and a tenant's own override);
`TenantRateLimiter.admit(tenant)` takes one token or raises `RateLimitedError`. The buckets are
keyed by tenant name, which only the key ring can produce, so their number is bounded by the
configured tenants. Admin callers are not limited. Pure module: no Ray, no FastAPI.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field

from lora_core.errors import RateLimitedError

__all__ = ["RateLimit", "TenantRateLimiter"]


class RateLimit(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_s: float = Field(gt=0, description="sustained completions per second")
    burst: int = Field(ge=1, description="completions at once above the sustained rate")


class TenantRateLimiter:
    """Thread-safe; `limits(tenant)` says each tenant's limit (None: unlimited)."""

    def __init__(self, limits: Callable[[str], RateLimit | None], clock: Callable[[], float] = time.monotonic) -> None:
        self._limits, self._clock = limits, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, when counted)
        self._lock = threading.Lock()

    def admit(self, tenant: str) -> None:
        limit = self._limits(tenant)
        if limit is None:
            return
        now = self._clock()
        with self._lock:
            tokens, then = self._buckets.get(tenant, (float(limit.burst), now))
            tokens = min(float(limit.burst), tokens + (now - then) * limit.requests_per_s)
            if tokens < 1.0:
                self._buckets[tenant] = (tokens, now)
                wait_s = (1.0 - tokens) / limit.requests_per_s
                raise RateLimitedError(
                    f"tenant {tenant!r} is over its rate limit of {limit.requests_per_s:g} requests/s "
                    f"(burst {limit.burst}); retry in {wait_s:.1f} s", max(1, math.ceil(wait_s)))
            self._buckets[tenant] = (tokens - 1.0, now)
