"""Errors that come back through Ray, turned back into the service's typed errors.

A replica's (or the store's) typed error crosses Ray wrapped in a `RayTaskError` (the errors pickle
by design, `lora_core.errors`); a full replica queue is Ray Serve's `BackPressureError`; a dead or
restarting actor is one of Ray's actor, worker or node errors. `typed_ray_errors()` is the one place
that turns them into typed errors, used by the ingress around replica and store calls and by
replicas around store calls. An untyped remote failure is logged in full and answered with its
type only: a message may hold another tenant's ids or paths. No HTTP here: the mapping to HTTP is
`deployments.http_errors`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError, RayTaskError, WorkerCrashedError

from lora_core.errors import LoraServeError, OverloadedError, ReplicaUnavailableError

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
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
    from ray.serve.exceptions import ReplicaUnavailableError as ServeReplicaUnavailableError

    try:
        yield
    except BackPressureError:
        raise OverloadedError("every replica is at its queue limit; retry shortly", RETRY_AFTER_S) from None
    except RayTaskError as wrapped:
        error = unwrap_ray_error(wrapped)
        if isinstance(error, LoraServeError):
            raise error from None
        logger.error("%s failed: %s", what, wrapped)
        raise LoraServeError(f"{what} failed ({type(error).__name__}); the server's log has the details") from None
    except (RayActorError, WorkerCrashedError, NodeDiedError, ObjectLostError, ServeReplicaUnavailableError,
            DeploymentUnavailableError) as gone:
        logger.warning("%s is unavailable: %s: %s", what, type(gone).__name__, gone)
        raise ReplicaUnavailableError(f"{what} is unavailable (it stopped or is restarting); retry shortly",
                                      RETRY_AFTER_S) from None
