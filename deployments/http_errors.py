"""The one mapping from errors to HTTP answers: `error_response(error)`.

Every answer with an error goes through it: a `LoraServeError` raised by a route (its
`status_code`, `headers()` and `to_json()` body), a body FastAPI could not validate (as
`InvalidRequestBodyError`, 422), and `/healthz` when no replica answers (`ServiceUnavailableError`,
503). `install(app)` registers the handlers on the FastAPI app.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from lora_core.errors import InvalidRequestBodyError, LoraServeError

__all__ = ["error_response", "install", "request_body_error"]


def error_response(error: LoraServeError) -> JSONResponse:
    return JSONResponse(error.to_json(), status_code=error.status_code, headers=error.headers() or None)


def request_body_error(error: RequestValidationError) -> InvalidRequestBodyError:
    """FastAPI's validation errors as one message naming the first bad field, and all as details."""
    details = jsonable_encoder(error.errors(), exclude={"input", "ctx", "url"})
    first = details[0] if details else {"loc": (), "msg": "invalid request body"}
    location = [str(part) for part in first["loc"]]
    if first.get("type") == "json_invalid":
        message = f"the body is not valid JSON ({first['msg']} at character {location[-1]})"
    else:
        where = ".".join(location[1:] if location[:1] == ["body"] else location)
        message = f"{where}: {first['msg']}" if where else first["msg"]
    return InvalidRequestBodyError(message, details)


async def _typed_error(_request: Request, error: LoraServeError) -> JSONResponse:
    return error_response(error)


async def _validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
    return error_response(request_body_error(error))


def install(app: FastAPI) -> None:
    app.add_exception_handler(LoraServeError, _typed_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
