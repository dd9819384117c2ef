"""Per-tenant shares of the app's queue: a cap on each tenant's requests in flight."""

from __future__ import annotations

import pytest

from deployments.queue_shares import QueueShares
from deployments.tenants import TenantsConfig
from lora_core.errors import RateLimitedError


def test_a_tenant_at_its_share_gets_429_and_the_others_and_itself_later_do_not():
    shares = QueueShares(lambda tenant: 2 if tenant == "initech" else None)
    with shares.hold("initech"), shares.hold("initech"):
        with pytest.raises(RateLimitedError) as info:
            with shares.hold("initech"):
                pass
        assert info.value.status_code == 429 and info.value.headers() == {"Retry-After": "1"}
        assert "initech" in str(info.value) and shares.in_flight("initech") == 2
        for _ in range(5):
            with shares.hold("acme"):  # unlimited, and counted apart
                pass
    assert shares.in_flight("initech") == 0
    with shares.hold("initech"):
        assert shares.in_flight("initech") == 1


def test_a_request_that_fails_gives_its_place_back_and_counters_are_dropped_at_zero():
    shares = QueueShares(lambda tenant: 1)
    with pytest.raises(ValueError):
        with shares.hold("acme"):
            raise ValueError("the replica failed")
    with shares.hold("acme"):
        pass
    assert shares._in_flight == {}


def test_the_limit_is_the_tenants_share_of_the_queue_or_its_own_cap():
    config = TenantsConfig.model_validate({
        "auth": "none", "queue_share": 0.25,
        "tenants": {"acme": {"key_sha256": ["a" * 64]}, "initech": {"key_sha256": ["b" * 64], "max_in_flight": 3}}})
    assert config.in_flight_limit_for("acme", 40) == 10
    assert config.in_flight_limit_for("acme", 2) == 1  # never 0
    assert config.in_flight_limit_for("initech", 40) == 3
    assert config.in_flight_limit_for("acme", None) is None  # an unbounded queue (max_queued_requests -1)
    assert TenantsConfig(auth="none", queue_share=1).in_flight_limit_for("acme", 40) is None
    assert TenantsConfig(auth="none").in_flight_limit_for("acme", 40) == 20  # the default: half
    for bad in (0, 1.5):
        with pytest.raises(ValueError):
            TenantsConfig(auth="none", queue_share=bad)
