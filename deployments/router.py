"""The HTTP ingress: an OpenAI-compatible API (FastAPI inside Ray Serve) in front of the replicas.

    POST /v1/completions        CompletionRequest -> CompletionResponse, or SSE with `stream: true`
    POST /v1/chat/completions   ChatCompletionRequest -> ChatCompletionResponse, or SSE
    GET  /v1/models             the base model and the registered adapters
    GET  /healthz               200 when a replica answers

`model` names an adapter id, or the base model's name for no adapter.

Errors are mapped to HTTP in one place: the `LoraServeError` handler answers its `status_code`
with its `to_json()` body. Errors raised in a replica come back through Ray wrapped in a
`RayTaskError`; `replica_errors()` is the one place that unwraps them to the original typed error
(they pickle by design). A streamed request reads its first chunk before answering, so the
errors the engine finds at submit (unknown adapter, limits) still get their status code; an error
after the headers went out is sent as a last `data: {"error": ...}` event.

Every route takes the caller from the `current_caller` dependency. Today every caller is
anonymous and sees every adapter; tenants and API keys replace that one dependency.
"""

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from typing import AsyncIterator, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from deployments.errors import LoraServeError
from deployments.schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    EngineResult,
    ModelList,
    StreamFormat,
)

__all__ = ["Caller", "Router", "RouterSettings", "app", "current_caller", "unwrap_replica_error"]

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 10.0

app = FastAPI(title="lora-serve", description="OpenAI-compatible completions over many LoRA adapters on one base model")


# ---- errors: the one mapping to HTTP ---------------------------------------------------------


@app.exception_handler(LoraServeError)
async def _lora_serve_error(_request: Request, error: LoraServeError) -> JSONResponse:
    return JSONResponse(error.to_json(), status_code=error.status_code)


@app.exception_handler(RequestValidationError)
async def _validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
    details = jsonable_encoder(error.errors(), exclude={"input", "ctx", "url"})
    first = details[0] if details else {"loc": (), "msg": "invalid request body"}
    location = [str(part) for part in first["loc"]]
    if first.get("type") == "json_invalid":
        message = f"the body is not valid JSON ({first['msg']} at character {location[-1]})"
    else:
        where = ".".join(location[1:] if location[:1] == ["body"] else location)
        message = f"{where}: {first['msg']}" if where else first["msg"]
    body = {"error": {"type": "invalid_request_body", "message": message, "details": details}}
    return JSONResponse(body, status_code=422)


def unwrap_replica_error(error: BaseException) -> BaseException:
    """The exception a replica raised, out of Ray's (possibly nested) RayTaskError wrappers."""
    while isinstance(error, RayTaskError) and error.cause is not None:
        error = error.cause
    return error


@contextlib.contextmanager
def replica_errors():
    """Re-raise a replica's typed error as itself; anything else a replica raised becomes a 500."""
    try:
        yield
    except RayTaskError as wrapped:
        error = unwrap_replica_error(wrapped)
        if isinstance(error, LoraServeError):
            raise error from None
        logger.error("replica call failed: %s", wrapped)
        raise LoraServeError(f"a replica failed: {type(error).__name__}: {error}") from None


# ---- callers (the seam where tenants and API keys go) ----------------------------------------


@dataclass(frozen=True)
class Caller:
    """Who is calling. `tenant` None: no authentication is configured, every adapter is visible."""

    tenant: str | None = None


async def current_caller() -> Caller:
    return Caller()


# ---- server-sent events ---------------------------------------------------------------------
# Defined above the deployment class: `@serve.ingress(app)` freezes the FastAPI app (a cloudpickle
# round trip of its routes) when the class is decorated, so every global a route uses must exist by
# then. For the same reason this module has no `from __future__ import annotations`: the frozen
# routes could not resolve string annotations and FastAPI read the request body as a query field.


def _event(payload: BaseModel | dict | Literal["[DONE]"]) -> str:
    if isinstance(payload, BaseModel):
        data = payload.model_dump_json(exclude_none=False)
    elif isinstance(payload, dict):
        data = json.dumps(payload)
    else:
        data = payload
    return f"data: {data}\n\n"


async def _server_sent_events(
    first: EngineResult, rest: DeploymentResponseGenerator, fmt: StreamFormat
) -> AsyncIterator[str]:
    finished = False
    try:
        for chunk in fmt.opening():
            yield _event(chunk)
        result = first
        while True:
            for chunk in fmt.chunk(result):
                yield _event(chunk)
            if result["finish_reason"] is not None:
                finished = True
                break
            with replica_errors():
                result = await rest.__anext__()
    except StopAsyncIteration:
        finished = True
    except LoraServeError as error:  # the headers are out: the error becomes the last event
        finished = True
        yield _event(error.to_json())
    finally:
        if not finished:  # the client went away: stop generating on the replica
            rest.cancel()
    yield _event("[DONE]")


# ---- the deployment --------------------------------------------------------------------------


class RouterSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    base_model_name: str = Field(min_length=1, description="the `model` value that means no adapter")


@serve.deployment(name="Router")
@serve.ingress(app)
class Router:
    """Validates requests, picks the adapter, forwards to a replica, formats OpenAI responses."""

    def __init__(self, replicas: DeploymentHandle, settings: dict) -> None:
        self.settings = RouterSettings.model_validate(settings)
        self.replicas = replicas

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, caller: Caller = Depends(current_caller)):
        request = body.to_engine_request(self._adapter_for(body.model, caller))
        if body.stream:
            return await self._stream(request, StreamFormat("completion", body.model, body.include_usage))
        with replica_errors():
            result: EngineResult = await self.replicas.generate.remote(request)
        return CompletionResponse.of(body.model, result)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, caller: Caller = Depends(current_caller)):
        request = body.to_engine_request(self._adapter_for(body.model, caller))
        if body.stream:
            return await self._stream(request, StreamFormat("chat", body.model, body.include_usage))
        with replica_errors():
            result: EngineResult = await self.replicas.generate.remote(request)
        return ChatCompletionResponse.of(body.model, result)

    @app.get("/v1/models")
    async def models(self, caller: Caller = Depends(current_caller)) -> ModelList:
        with replica_errors():
            listing = await self.replicas.list_adapters.remote()
        return ModelList.of(self.settings.base_model_name, listing["adapters"])

    @app.get("/healthz")
    async def healthz(self):
        try:
            with replica_errors():
                await asyncio.wait_for(self.replicas.list_adapters.remote(), HEALTH_TIMEOUT_S)
        except (LoraServeError, asyncio.TimeoutError) as error:
            return JSONResponse({"status": "unavailable", "reason": str(error) or "timeout"}, status_code=503)
        return {"status": "ok", "base_model": self.settings.base_model_name}

    # ---- internals ------------------------------------------------------------------------------

    def _adapter_for(self, model: str, caller: Caller) -> str | None:
        """The adapter id a request's `model` names; None for the base model. An id nobody
        registered is refused by the replica (404); tenant visibility checks go here."""
        return None if model == self.settings.base_model_name else model

    async def _stream(self, request: dict, fmt: StreamFormat) -> StreamingResponse:
        responses: DeploymentResponseGenerator = self.replicas.options(stream=True).stream.remote(request)
        try:
            with replica_errors():
                first = await responses.__anext__()
        except BaseException:
            responses.cancel()
            raise
        return StreamingResponse(
            _server_sent_events(first, responses, fmt),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
