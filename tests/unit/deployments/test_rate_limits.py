"""The per-tenant token buckets, on a fake clock."""

from __future__ import annotations

import pytest

from deployments.rate_limits import RateLimit, TenantRateLimiter
from deployments.tenants import TenantsConfig
from lora_core.errors import RateLimitedError


class Clock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def test_a_burst_then_the_sustained_rate_then_429_with_retry_after():
    clock = Clock()
    limiter = TenantRateLimiter(lambda tenant: RateLimit(requests_per_s=2, burst=3), clock)
    for _ in range(3):
        limiter.admit("acme")
    with pytest.raises(RateLimitedError) as info:
        limiter.admit("acme")
    assert info.value.status_code == 429 and info.value.headers() == {"Retry-After": "1"}
    limiter.admit("globex")  # another tenant has its own bucket
    clock.now_s += 0.5  # one token back at 2/s
    limiter.admit("acme")
    with pytest.raises(RateLimitedError):
        limiter.admit("acme")
    clock.now_s += 60  # refills to the burst, not beyond
    for _ in range(3):
        limiter.admit("acme")
    with pytest.raises(RateLimitedError):
        limiter.admit("acme")


def test_the_retry_after_says_when_the_next_token_comes():
    clock = Clock()
    limiter = TenantRateLimiter(lambda tenant: RateLimit(requests_per_s=0.1, burst=1), clock)
    limiter.admit("acme")
    with pytest.raises(RateLimitedError) as info:
        limiter.admit("acme")
    assert info.value.retry_after_s == 10


def test_a_tenants_own_limit_wins_and_no_limit_means_unlimited():
    config = TenantsConfig(tenants={"acme": {"key_sha256": ["a" * 64], "rate_limit": {"requests_per_s": 1, "burst": 1}},
                                    "globex": {"key_sha256": ["b" * 64]}},
                           rate_limit={"requests_per_s": 5, "burst": 10})
    assert config.rate_limit_for("acme") == RateLimit(requests_per_s=1, burst=1)
    assert config.rate_limit_for("globex") == config.rate_limit_for("from-env") == RateLimit(requests_per_s=5, burst=10)
    unlimited = TenantRateLimiter(lambda tenant: None, Clock())
    for _ in range(1000):
        unlimited.admit("acme")
