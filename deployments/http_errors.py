"""The one mapping from errors to HTTP answers: `error_response(error)`.

Every answer with an error goes through it: a `LoraServeError` raised by a route (its
`status_code`, `headers()` and `to_json()` body), a body FastAPI could not validate (as
`InvalidRequestBodyError`, 422), and `/healthz` when no replica answers (`ServiceUnavailableError`,
503). Anything else a route raises is a bug: logged with its traceback, answered 500 with a JSON
body that holds neither the traceback nor the message. `install(app)` registers the handlers.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from lora_core.errors import InvalidRequestBodyError, LoraServeError

__all__ = ["error_response", "install", "request_body_error"]

logger = logging.getLogger(__name__)


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


_HTTP_ERROR_TYPES = {404: "not_found", 405: "method_not_allowed"}


async def _http_error(_request: Request, error: HTTPException) -> JSONResponse:
    """Starlette's own answers (an unknown path, a wrong method, a body it cannot decode) in the
    same JSON shape; FastAPI's only 400 is a body it could not read (bad UTF-8), a 422 here."""
    if error.status_code == 400:
        return error_response(InvalidRequestBodyError(f"the body cannot be read as JSON ({error.detail})", []))
    body = {"error": {"type": _HTTP_ERROR_TYPES.get(error.status_code, "http_error"), "message": str(error.detail)}}
    return JSONResponse(body, status_code=error.status_code, headers=error.headers)


async def _unexpected_error(request: Request, error: Exception) -> JSONResponse:
    logger.error("%s %s failed", request.method, request.url.path, exc_info=error)
    return error_response(LoraServeError("the server failed to answer this request; its log has the details"))


def install(app: FastAPI) -> None:
    app.add_exception_handler(LoraServeError, _typed_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
