"""Errors that come back through Ray, turned back into the service's typed errors.

A replica's (or the store's) typed error crosses Ray wrapped in a `RayTaskError` (the errors pickle
by design, `lora_core.errors`); a full replica queue is Ray Serve's `BackPressureError`. `typed_ray_errors()` is the one place that unwraps them, used
by the ingress around replica and store calls and by replicas around store calls. No HTTP here:
the mapping to HTTP is `deployments.http_errors`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from ray.exceptions import RayTaskError

from lora_core.errors import LoraServeError, OverloadedError

__all__ = ["RETRY_AFTER_S", "typed_ray_errors", "unwrap_ray_error"]

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1


def unwrap_ray_error(error: BaseException) -> BaseException:
    """The exception the remote side raised, out of Ray's (possibly nested) RayTaskError wrappers."""
    while isinstance(error, RayTaskError) and error.cause is not None:
        error = error.cause
    return error


@contextlib.contextmanager
def typed_ray_errors(what: str = "a replica") -> Iterator[None]:
    """Re-raise a remote typed error as itself; a full queue as OverloadedError (503 + Retry-After);
    anything else the remote side raised as a 500 that names its type."""
    # Here, not at the top: importing `ray.serve` loads FastAPI, which replica-side users of
    # `unwrap_ray_error` (the store subscription) must not pull in.
    from ray.serve.exceptions import BackPressureError

    try:
        yield
    except BackPressureError as error:
        raise OverloadedError(f"every replica is at its queue limit; retry shortly ({error})", RETRY_AFTER_S) from None
    except RayTaskError as wrapped:
        error = unwrap_ray_error(wrapped)
        if isinstance(error, LoraServeError):
            raise error from None
        logger.error("%s failed: %s", what, wrapped)
        raise LoraServeError(f"{what} failed: {type(error).__name__}: {error}") from None
