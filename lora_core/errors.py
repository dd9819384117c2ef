"""Every error the service raises on purpose, each with the HTTP status and headers it maps to.

    LoraServeError                      500  base class; `status_code`, `code`, `headers()` live on the class
    ├── InvalidRequestError             400  a request the service understands but refuses (limits)
    ├── InvalidAdapterIdError           400  an adapter id with path tricks or bad characters
    ├── UnauthorizedError               401  no API key, or one nobody issued (WWW-Authenticate: Bearer)
    ├── ForbiddenError                  403  a tenant key on the admin API
    ├── AdapterNotFoundError            404  no such adapter (or not visible to the caller)
    ├── AdapterExistsError              409  a create (a named merge) for an id already registered
    ├── AdapterDisabledError            409  an adapter an admin disabled (registered, not served)
    ├── PayloadTooLargeError            413  a request body over `max_body_bytes`
    ├── InvalidAdapterError             422  a checkpoint that does not fit the engine; `reason` says why
    ├── InvalidRequestBodyError         422  a body that does not parse or validate; `details` per field
    ├── RateLimitedError                429  a tenant over its rate limit (Retry-After)
    ├── OverloadedError                 503  every replica's queue is full (Retry-After)
    ├── SlotsExhaustedError             503  every slot is held by in-flight requests or pinned
    ├── EngineClosedError               503  the engine was shut down
    ├── SwapValidationError             503  a new version failed its check after a swap (rolled back)
    ├── ServiceUnavailableError         503  no replica answers (/healthz), or the store restarts (Retry-After)
    │   └── ReplicaUnavailableError     503      the replica called died or is restarting (Retry-After)
    ├── DeadlineExceededError           504  a completion ran past `request_timeout_s` (its row is freed)
    ├── SourceError                          a source of adapters failed:
    │   ├── SourceUnavailableError      503      it could not be reached or answered 5xx: retry later
    │   └── SourceRefusedError          400      it answered "no": no such bucket / repo / revision,
    │                                            access denied, bad credentials; retrying cannot help
    └── ManifestError                   500  the adapter registry's manifest cannot be read:
        ├── ManifestCorruptError             the store must not start from an empty registry
        └── ManifestVersionError             written by a newer lora-serve

Errors cross Ray actor boundaries pickled, so every constructor argument is passed on to
`Exception.__init__` (Ray issue #50211); a unit test checks that each one round-trips.
The mapping to HTTP happens in one place (`deployments.http_errors`), from `status_code`,
`headers()` and `to_json()`; nothing matches on message text. Pure module: stdlib only.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AdapterDisabledError",
    "AdapterExistsError",
    "AdapterNotFoundError",
    "DeadlineExceededError",
    "EngineClosedError",
    "ForbiddenError",
    "InvalidAdapterError",
    "InvalidAdapterIdError",
    "InvalidRequestBodyError",
    "InvalidRequestError",
    "LoraServeError",
    "ManifestCorruptError",
    "ManifestError",
    "ManifestVersionError",
    "OverloadedError",
    "PayloadTooLargeError",
    "RateLimitedError",
    "ReplicaUnavailableError",
    "ServiceUnavailableError",
    "SlotsExhaustedError",
    "SourceError",
    "SourceRefusedError",
    "SourceUnavailableError",
    "SwapValidationError",
    "UnauthorizedError",
]


class LoraServeError(Exception):
    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, *args: object) -> None:
        super().__init__(message, *args)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def headers(self) -> dict[str, str]:
        """HTTP headers the answer carries besides the JSON body."""
        return {}

    def to_json(self) -> dict[str, Any]:
        return {"error": {"type": self.code, "message": self.message}}


class _RetryLater:
    """Mixed into errors the client should retry after `retry_after_s` (the Retry-After header)."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message, retry_after_s)  # type: ignore[call-arg]
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class InvalidRequestError(LoraServeError):
    status_code = 400
    code = "invalid_request"


class InvalidAdapterIdError(LoraServeError):
    status_code = 400
    code = "invalid_adapter_id"


class UnauthorizedError(LoraServeError):
    status_code = 401
    code = "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class ForbiddenError(LoraServeError):
    """A valid key that may not do this (a tenant key on the admin API)."""

    status_code = 403
    code = "forbidden"


class AdapterNotFoundError(LoraServeError):
    status_code = 404
    code = "adapter_not_found"


class AdapterExistsError(LoraServeError):
    """A create (a named merge) for an id that is already registered."""

    status_code = 409
    code = "adapter_exists"


class AdapterDisabledError(LoraServeError):
    """An adapter an admin disabled: still registered, not served until it is enabled again."""

    status_code = 409
    code = "adapter_disabled"


class PayloadTooLargeError(LoraServeError):
    status_code = 413
    code = "body_too_large"


class InvalidAdapterError(LoraServeError):
    """A checkpoint refused before anything was copied; `reason` is one of `REASONS`."""

    status_code = 422
    code = "invalid_adapter"
    REASONS = (
        "missing_file",
        "corrupt_file",
        "pickle_file",
        "invalid_config",
        "unsupported_peft_type",
        "unsupported_feature",
        "base_model_mismatch",
        "rank_too_large",
        "unknown_target_module",
        "shape_mismatch",
        "non_finite",
        "too_large",
        "unreadable",
    )

    def __init__(self, message: str, reason: str) -> None:
        if reason not in self.REASONS:
            raise ValueError(f"unknown InvalidAdapterError reason {reason!r}")
        super().__init__(message, reason)
        self.reason = reason

    def to_json(self) -> dict[str, Any]:
        body = super().to_json()
        body["error"]["reason"] = self.reason
        return body


class InvalidRequestBodyError(LoraServeError):
    """The body is not JSON or does not fit the endpoint's schema; `details` lists every field."""

    status_code = 422
    code = "invalid_request_body"

    def __init__(self, message: str, details: list | None = None) -> None:
        super().__init__(message, details)
        self.details = list(details or [])

    def to_json(self) -> dict[str, Any]:
        body = super().to_json()
        body["error"]["details"] = self.details
        return body


class DeadlineExceededError(LoraServeError):
    status_code = 504
    code = "deadline_exceeded"


class RateLimitedError(_RetryLater, LoraServeError):
    """A tenant over its rate limit; the client should retry after `retry_after_s`."""

    status_code = 429
    code = "rate_limited"


class OverloadedError(_RetryLater, LoraServeError):
    """Every replica's queue is full; the client should retry after `retry_after_s`."""

    status_code = 503
    code = "overloaded"


class SlotsExhaustedError(LoraServeError):
    status_code = 503
    code = "slots_exhausted"


class EngineClosedError(LoraServeError):
    status_code = 503
    code = "engine_closed"


class SwapValidationError(LoraServeError):
    """A new version did not pass the check after it landed in a slot (its slot rows did not match
    the store's checksum, or its probe's answer was wrong): it is not served and is reported."""

    status_code = 503
    code = "swap_validation_failed"


class ServiceUnavailableError(_RetryLater, LoraServeError):
    """No replica answered in time, or the store cannot answer now; retry after `retry_after_s`."""

    status_code = 503
    code = "unavailable"


class ReplicaUnavailableError(ServiceUnavailableError):
    """The replica called died or is restarting (a non-streaming request was retried first)."""

    code = "replica_unavailable"


class SourceError(LoraServeError):
    """A source of adapters failed; the subclass says whether retrying can help."""

    status_code = 503
    code = "source_error"


class SourceUnavailableError(SourceError):
    """S3 / the Hub / a folder could not be reached, timed out or answered 5xx: retry later."""

    status_code = 503
    code = "source_unavailable"


class SourceRefusedError(SourceError):
    """The source answered, and retrying will not change the answer: no such bucket, repository
    or revision, access denied, unknown or mismatched credentials, the wrong region. Fix the
    source's URI, options or credentials."""

    status_code = 400
    code = "source_refused"


class ManifestError(LoraServeError):
    """The manifest could not be read; the store must not start from an empty registry."""

    status_code = 500
    code = "manifest_error"


class ManifestCorruptError(ManifestError):
    code = "manifest_corrupt"


class ManifestVersionError(ManifestError):
    code = "manifest_version"
