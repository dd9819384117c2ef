"""Every error class in `lora_core.errors` survives pickling (Ray actor boundaries) intact, and
carries its HTTP status and headers."""

from __future__ import annotations

import copy
import inspect
import pickle

import pytest

from lora_core import errors
from lora_core.errors import (
    InvalidAdapterError,
    InvalidRequestBodyError,
    LoraServeError,
    OverloadedError,
    SourceError,
    SourceRefusedError,
    SourceUnavailableError,
    UnauthorizedError,
)

ERROR_CLASSES = sorted(
    (obj for obj in vars(errors).values() if inspect.isclass(obj) and issubclass(obj, LoraServeError)),
    key=lambda cls: cls.__name__,
)


RETRY_AFTER_CLASSES = (OverloadedError, errors.ServiceUnavailableError, errors.ReplicaUnavailableError,
                       errors.RateLimitedError)


def _instances():
    """One instance per class (every reason for InvalidAdapterError), built as the service builds them."""
    for cls in ERROR_CLASSES:
        if cls is InvalidAdapterError:
            for reason in InvalidAdapterError.REASONS:
                yield pytest.param(cls, (f"refused: {reason}", reason), id=f"{cls.__name__}-{reason}")
        elif cls in RETRY_AFTER_CLASSES:
            yield pytest.param(cls, ("every queue is full", 3), id=cls.__name__)
        elif cls is InvalidRequestBodyError:
            details = [{"loc": ["body", "model"], "msg": "Field required", "type": "missing"}]
            yield pytest.param(cls, ("model: Field required", details), id=cls.__name__)
        else:
            yield pytest.param(cls, (f"{cls.__name__} happened: fix it like so",), id=cls.__name__)


def test_every_error_class_is_found():
    names = {cls.__name__ for cls in ERROR_CLASSES}
    assert names == {
        "LoraServeError",
        "InvalidRequestError",
        "InvalidAdapterIdError",
        "AdapterNotFoundError",
        "AdapterExistsError",
        "AdapterDisabledError",
        "SwapValidationError",
        "InvalidAdapterError",
        "SlotsExhaustedError",
        "SourceError",
        "SourceUnavailableError",
        "SourceRefusedError",
        "EngineClosedError",
        "ServiceUnavailableError",
        "InvalidRequestBodyError",
        "ManifestError",
        "ManifestCorruptError",
        "ManifestVersionError",
        "UnauthorizedError",
        "ForbiddenError",
        "OverloadedError",
        "ReplicaUnavailableError",
        "PayloadTooLargeError",
        "DeadlineExceededError",
        "RateLimitedError",
    }
    assert names == set(errors.__all__)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("cls, args", list(_instances()))
def test_error_pickles_with_its_fields(cls, args, protocol):
    error = cls(*args)
    clone = pickle.loads(pickle.dumps(error, protocol=protocol))
    assert type(clone) is cls
    assert clone.message == error.message == args[0]
    assert str(clone) == args[0]
    assert clone.args == error.args == args
    assert clone.status_code == cls.status_code
    assert clone.code == cls.code
    assert clone.to_json() == error.to_json()
    if cls is InvalidAdapterError:
        assert clone.reason == args[1]
        assert clone.to_json()["error"]["reason"] == args[1]
    if cls in RETRY_AFTER_CLASSES:
        assert clone.retry_after_s == args[1] and clone.headers() == {"Retry-After": str(args[1])}
    if cls is InvalidRequestBodyError:
        assert clone.details == args[1] and clone.to_json()["error"]["details"] == args[1]
    assert clone.headers() == error.headers()


@pytest.mark.parametrize("cls, args", list(_instances()))
def test_error_survives_deepcopy_and_raise(cls, args):
    clone = copy.deepcopy(cls(*args))
    with pytest.raises(cls) as info:
        raise clone
    assert info.value.message == args[0]
    assert vars(info.value) == vars(cls(*args))


def test_extra_constructor_arguments_round_trip():
    error = errors.SourceUnavailableError("s3 timed out", "bucket", 3)
    clone = pickle.loads(pickle.dumps(error))
    assert clone.args == ("s3 timed out", "bucket", 3)
    assert clone.message == "s3 timed out"


def test_status_codes_and_codes_are_distinct_per_class():
    codes = [cls.code for cls in ERROR_CLASSES]
    assert len(codes) == len(set(codes))
    assert {cls.__name__: cls.status_code for cls in ERROR_CLASSES} == {
        "LoraServeError": 500,
        "InvalidRequestError": 400,
        "InvalidAdapterIdError": 400,
        "AdapterNotFoundError": 404,
        "AdapterExistsError": 409,
        "AdapterDisabledError": 409,
        "SwapValidationError": 503,
        "InvalidAdapterError": 422,
        "SlotsExhaustedError": 503,
        "SourceError": 503,
        "SourceUnavailableError": 503,
        "SourceRefusedError": 400,
        "EngineClosedError": 503,
        "ServiceUnavailableError": 503,
        "InvalidRequestBodyError": 422,
        "ManifestError": 500,
        "ManifestCorruptError": 500,
        "ManifestVersionError": 500,
        "UnauthorizedError": 401,
        "ForbiddenError": 403,
        "OverloadedError": 503,
        "ReplicaUnavailableError": 503,
        "PayloadTooLargeError": 413,
        "DeadlineExceededError": 504,
        "RateLimitedError": 429,
    }


def test_invalid_adapter_error_refuses_an_unknown_reason():
    with pytest.raises(ValueError, match="not_a_reason"):
        InvalidAdapterError("bad", "not_a_reason")


def test_headers_are_declared_on_the_error_classes():
    assert UnauthorizedError("no key").headers() == {"WWW-Authenticate": "Bearer"}
    assert OverloadedError("full", 7).headers() == {"Retry-After": "7"}
    assert errors.ReplicaUnavailableError("gone").headers() == {"Retry-After": "1"}
    others = [cls for cls in ERROR_CLASSES if cls not in (UnauthorizedError, InvalidAdapterError,
                                                           InvalidRequestBodyError, *RETRY_AFTER_CLASSES)]
    assert all(cls("x").headers() == {} for cls in others)


def test_permanent_and_transient_source_errors_are_distinct_types():
    assert issubclass(SourceRefusedError, SourceError) and issubclass(SourceUnavailableError, SourceError)
    assert not issubclass(SourceRefusedError, SourceUnavailableError)
    assert not issubclass(SourceUnavailableError, SourceRefusedError)
    assert SourceRefusedError.status_code == 400 and SourceUnavailableError.status_code == 503
