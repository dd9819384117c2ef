"""`typed_ray_errors`: what comes back through Ray becomes a typed error, and no untyped remote
message reaches a caller (it may name another tenant's ids or paths). No cluster: Ray's own
exception classes, raised here."""

from __future__ import annotations

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, NodeDiedError, RayTaskError, WorkerCrashedError
from ray.serve.exceptions import BackPressureError

from deployments.ray_errors import typed_ray_errors
from lora_core.errors import AdapterNotFoundError, LoraServeError, OverloadedError, ReplicaUnavailableError


def wrapped(cause: Exception) -> RayTaskError:
    return RayTaskError("generate", "Traceback (most recent call last): ... secret", cause)


@pytest.mark.parametrize("gone", [ActorDiedError(), ActorUnavailableError("restarting", None), WorkerCrashedError(),
                                  NodeDiedError("node 1 died")])
def test_a_dead_or_restarting_replica_is_a_503_with_retry_after(gone):
    with pytest.raises(ReplicaUnavailableError) as info, typed_ray_errors():
        raise gone
    assert info.value.status_code == 503 and info.value.headers() == {"Retry-After": "1"}
    assert "a replica is unavailable" in str(info.value)


def test_a_typed_remote_error_comes_back_as_itself_and_an_untyped_one_without_its_text():
    with pytest.raises(AdapterNotFoundError, match="acme/x"), typed_ray_errors():
        raise wrapped(AdapterNotFoundError("no adapter 'acme/x'"))
    with pytest.raises(LoraServeError) as info, typed_ray_errors("the adapter store"):
        raise wrapped(KeyError("globex/secret at s3://globex-bucket"))
    assert type(info.value) is LoraServeError and info.value.status_code == 500
    assert "KeyError" in str(info.value) and "globex" not in str(info.value) and "Traceback" not in str(info.value)


def test_a_full_queue_is_overloaded():
    with pytest.raises(OverloadedError) as info, typed_ray_errors():
        raise BackPressureError(num_queued_requests=64, max_queued_requests=64)
    assert info.value.headers() == {"Retry-After": "1"}
