"""The HTTP ingress: an OpenAI-compatible API (FastAPI inside Ray Serve) in front of the replicas.

    POST /v1/completions        CompletionRequest -> CompletionResponse, or SSE with `stream: true`
    POST /v1/chat/completions   ChatCompletionRequest -> ChatCompletionResponse, or SSE
    GET  /v1/models             the base model and the adapters the caller's tenant may use
    GET  /healthz               200 when a replica answers; `degraded` while a source or the store is down
  admin key only (through the adapter store):
    GET    /admin/adapters                  every adapter: versions, status, replicas it is warm on
    POST   /admin/adapters                  {adapter_id, uri, options}: fetch, validate, serve
    GET    /admin/adapters/{tenant}/{name}
    DELETE /admin/adapters/{tenant}/{name}
    POST   /admin/adapters/{tenant}/{name}/disable   {fallback: none | base}: registered, not served
    POST   /admin/adapters/{tenant}/{name}/enable
    POST   /admin/adapters/{tenant}/{name}/rollback  serve the previous good version again
    POST   /admin/adapters/{tenant}/{name}/pin       {replicas: N}: warm on N replicas, never evicted there
    DELETE /admin/adapters/{tenant}/{name}/pin
    POST   /admin/sources                   {uri, options}: watch a root of <tenant>/<name>/ folders
    POST   /admin/sync                      sync every source now
    GET    /admin/store                     the store's status (degraded when a source is down)

`model` names an adapter id, or the base model's name for no adapter (or for a combination:
`adapters: [{"id", "weight"}]`, each id one the caller may use). `Authorization: Bearer
<key>` names the caller (`tenants.py`); a tenant sees its own and `shared/*` adapters, and another
tenant's adapter is answered exactly like one that does not exist (404).

Errors are mapped to HTTP in one place (`deployments.http_errors`). Errors raised in a replica
or the store come back through Ray wrapped; `deployments.ray_errors.typed_ray_errors` unwraps
them to the original typed error. A streamed request reads its first chunk before answering, so
the errors the engine finds at submit (unknown adapter, limits) still get their status code; an
error after the headers went out is sent as a last `data: {"error": ...}` event.

A disabled adapter's requests answer 409 `adapter_disabled`, or run on the base model when it was
disabled with `fallback: base`. The ingress learns what is disabled from the store at most every
`DISABLED_REFRESH_S` (at once for a disable it handled itself); the replicas drop it from their
slots through the store's change feed, and the store refuses to hand it out meanwhile.

Overload: a replica queue that is full (`max_queued_requests`) answers 503 with Retry-After.

Importing this module loads no torch, boto3 or huggingface_hub (a test proves it): the ingress
runs with no CPU of its own and holds no model.
"""

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from typing import AsyncIterator, Awaitable, Callable, Literal, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.responses import StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from adapters_store.allowlist import checked_source
from adapters_store.client import StoreLookup
from adapters_store.merge_spec import MergeSpec
from deployments import http_errors
from deployments.body_limit import BodySizeLimit
from deployments.contracts import Combination, GenerationChunk, GenerationRequest
from deployments.deploy_config import RouterSettings, RouterUserConfig
from deployments.key_check import ADMIN_NEEDED, CALLER_STATE, KeyCheck
from deployments.metrics import IngressMetrics, adapter_label
from deployments.queue_shares import QueueShares
from deployments.rate_limits import TenantRateLimiter
from deployments.ray_errors import typed_ray_errors
from deployments.request_limits import LIMITS
from deployments.schemas.admin import DisableRequest, PinRequest, RegisterAdapterRequest, RegisterSourceRequest
from deployments.schemas.openai import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelList,
)
from deployments.schemas.streaming import StreamFormat, sse_event
from deployments.tenants import OPEN_ACCESS_WARNING, Caller, KeyRing, TenantsConfig, uses_demo_keys
from lora_core.adapter_ids import parse_adapter_id
from lora_core.errors import (
    AdapterDisabledError,
    AdapterNotFoundError,
    DeadlineExceededError,
    ForbiddenError,
    InvalidAdapterIdError,
    InvalidRequestError,
    LoraServeError,
    ReplicaUnavailableError,
    ServiceUnavailableError,
)

__all__ = ["Router", "app", "current_caller"]

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 10.0
DISABLED_REFRESH_S = 1.0
STORE_LOOKUP_TIMEOUT_S = 5.0
REPLICA_RETRIES = 3
STORE_CALL_TIMEOUT_S = 15.0
STORE_WRITE_TIMEOUT_S = 300.0
STORE_DOWNLOADING_CALLS = frozenset({"register", "add_source", "sync_now", "merge"})
STORE_RETRY_AFTER_S = 5
NO_STORE = "this server has no adapter store (set `store` in the app's args)"
REPLICA_RETRY_DELAY_S = 0.25
T = TypeVar("T")

app = FastAPI(title="lora-serve", description="OpenAI-compatible completions over many LoRA adapters on one base model")
http_errors.install(app)
app.add_middleware(BodySizeLimit, max_body_bytes=LIMITS.max_body_bytes)


# ---- callers --------------------------------------------------------------------------------
# One KeyRing per router process, built from settings when the deployment starts.

_KEYRING: list[KeyRing] = []


def _install_keyring(keyring: KeyRing) -> None:
    """Called from `Router.__init__`. A module-level function, so it writes this module's
    `_KEYRING`: Ray pickles the Router class by value (`@serve.ingress` shadows it under the same
    name), and a method's own reference to `_KEYRING` would land in a copy."""
    _KEYRING[:] = [keyring]


def _authenticate(authorization: str | None) -> Caller:
    if not _KEYRING:
        raise LoraServeError("the router has no key ring yet")
    return _KEYRING[0].authenticate(authorization)


async def current_caller(request: Request) -> Caller:
    """The caller `KeyCheck` authenticated; a route outside its paths authenticates here."""
    caller = getattr(request.state, CALLER_STATE, None)
    return caller if caller is not None else _authenticate(request.headers.get("authorization"))


async def admin_caller(caller: Caller = Depends(current_caller)) -> Caller:
    if not caller.is_admin:
        raise ForbiddenError(ADMIN_NEEDED)
    return caller


app.add_middleware(KeyCheck, authenticate=_authenticate)  # the outermost: keys before bodies


# ---- server-sent events ---------------------------------------------------------------------
# Defined above the deployment class: `@serve.ingress(app)` freezes the FastAPI app (a cloudpickle
# round trip of its routes) when the class is decorated, so every global a route uses must exist by
# then. For the same reason this module has no `from __future__ import annotations`: the frozen
# routes could not resolve string annotations and FastAPI read the request body as a query field.


async def _server_sent_events(
    first: GenerationChunk, rest: DeploymentResponseGenerator, fmt: StreamFormat,
    on_done: Callable[[int, GenerationChunk], None], deadline_s: float,
) -> AsyncIterator[str]:
    """The events of one stream; `on_done(status, last chunk)` when it ends (499: the client left)."""
    finished, status = False, 499
    result = first
    try:
        for chunk in fmt.opening():
            yield sse_event(chunk)
        while True:
            for chunk in fmt.chunk(result):
                yield sse_event(chunk)
            if result.finish_reason is not None:
                finished, status = True, 200
                break
            with typed_ray_errors():
                result = await _within(deadline_s - time.monotonic(), rest.__anext__())
    except StopAsyncIteration:
        finished, status = True, 200
    except LoraServeError as error:  # the headers are out: the error becomes the last event
        finished, status = True, error.status_code
        rest.cancel()  # past the deadline, or the replica is gone: nothing more will be read
        yield sse_event(error.to_json())
    except Exception:
        logger.exception("a stream failed")
        finished, status = True, 500
        yield sse_event(LoraServeError("the stream failed; the server's log has the details").to_json())
    finally:
        if not finished:  # the client went away: stop generating on the replica
            rest.cancel()
        on_done(status, result)
    yield sse_event("[DONE]")


async def _within(timeout_s: float, work: Awaitable[T]) -> T:
    """`work`, or DeadlineExceededError (504) once `timeout_s` has passed; the work is cancelled,
    which Serve passes on to the replica, and the engine frees the request's row."""
    try:
        return await asyncio.wait_for(work, max(timeout_s, 0.0))
    except asyncio.TimeoutError:
        raise DeadlineExceededError("the request ran past this server's deadline (request_timeout_s); "
                                    "ask for fewer tokens or retry") from None


async def _on_a_live_replica(call: Callable[[], Awaitable[T]]) -> T:
    """`call()`, again on another replica while the one it reached died or is restarting (Serve's
    router stops picking a dead replica); a generation has no side effects, so a retry is safe."""
    for attempt in range(REPLICA_RETRIES + 1):
        try:
            with typed_ray_errors():
                return await call()
        except ReplicaUnavailableError:
            if attempt == REPLICA_RETRIES:
                raise
            logger.warning("a replica died under a request; retrying (%d of %d)", attempt + 1, REPLICA_RETRIES)
            await asyncio.sleep(REPLICA_RETRY_DELAY_S * (attempt + 1))
    raise AssertionError("unreachable")


# ---- the deployment --------------------------------------------------------------------------


@serve.deployment(name="Router")
@serve.ingress(app)
class Router:
    """Authenticates, validates requests, picks the adapter, forwards to a replica (routed by
    adapter affinity through `multiplexed_model_id`), formats OpenAI responses."""

    def __init__(self, replicas: DeploymentHandle, settings: dict) -> None:
        self._args = RouterSettings.model_validate(settings)
        self.settings = self._args
        self._use_tenants(self._args.tenants)
        self.replicas = replicas
        self.store = StoreLookup(self.settings.store) if self.settings.store is not None else None
        self.metrics = IngressMetrics()
        self._rate_limiter = TenantRateLimiter(lambda tenant: self.settings.tenants.rate_limit_for(tenant))
        self._queue_shares = QueueShares(
            lambda tenant: self.settings.tenants.in_flight_limit_for(tenant, self.settings.queue_capacity))
        self._disabled: dict[str, str] = {}  # adapter id -> fallback, as the store last said
        self._disabled_at_s = -math.inf

    def reconfigure(self, user_config: dict | None) -> None:
        """A `serve deploy` changed the Router's user_config (`deploy_config.RouterUserConfig`):
        new tenants and keys, and the deadline, take effect for the next request; a bad one raises and
        changes nothing."""
        settings = RouterUserConfig.model_validate(user_config or {}).applied_to(self._args)
        if settings.tenants != self.settings.tenants:
            self._use_tenants(settings.tenants)
            logger.info("tenants now %s", sorted(settings.tenants.tenants))
        self.settings = settings

    def _use_tenants(self, tenants: TenantsConfig) -> None:
        keyring = KeyRing(tenants)  # refuses a bad config before the current key ring is replaced
        _install_keyring(keyring)
        if keyring.auth == "none":
            logger.warning(OPEN_ACCESS_WARNING)
        if uses_demo_keys(keyring):
            logger.warning("DEMO API KEYS ARE IN USE (sk-acme-demo, sk-globex-demo, sk-admin-demo): anyone can "
                           "call this server; set real keys in serve_config.yaml `tenants` or keys_env")

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, caller: Caller = Depends(current_caller)):
        return await self._complete(body, "completion", caller)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, caller: Caller = Depends(current_caller)):
        return await self._complete(body, "chat", caller)

    @app.get("/v1/models")
    async def models(self, caller: Caller = Depends(current_caller)) -> ModelList:
        with typed_ray_errors():
            listing = await self.replicas.list_adapters.remote()
        records = await self._store_call("list_adapters", tenant=caller.tenant) if self.store is not None else []
        served = {r["adapter_id"] for r in records if r["serving"] is not None and r["disabled"] is None}
        served |= set(listing["adapters"])
        return ModelList.of(self.settings.base_model_name, [a for a in served if caller.can_see(a)])

    @app.post("/v1/adapters/merge", status_code=201)
    async def merge_adapters(self, body: MergeSpec, caller: Caller = Depends(current_caller)):
        """A named merge (PEFT's `add_weighted_adapter`) of the caller's own and `shared/` adapters,
        named in the caller's tenant, served like any adapter from then on."""
        if not caller.is_admin and parse_adapter_id(body.name).tenant != caller.tenant:
            raise ForbiddenError(f"a merge is named in your own tenant: {caller.tenant}/<name>, not {body.name!r}")
        for item in body.adapters:
            if not caller.can_see(item.id):
                raise AdapterNotFoundError(f"adapter {item.id!r} not found")
        return await self._store_call("merge", body.model_dump(mode="json"))

    # ---- admin ----------------------------------------------------------------------------------

    @app.get("/admin/adapters")
    async def admin_list(self, include_deleted: bool = False, _admin: Caller = Depends(admin_caller)):
        return {"object": "list", "data": await self._store_call("list_adapters", include_deleted=include_deleted)}

    @app.post("/admin/adapters", status_code=201)
    async def admin_register(self, body: RegisterAdapterRequest, _admin: Caller = Depends(admin_caller)):
        uri, options = self._allowed_source(body.uri, body.options)
        return await self._store_call("register", body.adapter_id, uri, options)

    @app.get("/admin/adapters/{tenant}/{name}")
    async def admin_get(self, tenant: str, name: str, _admin: Caller = Depends(admin_caller)):
        return await self._store_call("get", f"{tenant}/{name}")

    @app.delete("/admin/adapters/{tenant}/{name}")
    async def admin_delete(self, tenant: str, name: str, _admin: Caller = Depends(admin_caller)):
        return await self._store_call("delete", f"{tenant}/{name}")

    @app.post("/admin/adapters/{tenant}/{name}/disable")
    async def admin_disable(self, tenant: str, name: str, body: DisableRequest | None = None,
                            _admin: Caller = Depends(admin_caller)):
        fallback = (body or DisableRequest()).fallback
        record = await self._store_call("disable", f"{tenant}/{name}", fallback)
        self._disabled[record["adapter_id"]] = fallback
        return record

    @app.post("/admin/adapters/{tenant}/{name}/enable")
    async def admin_enable(self, tenant: str, name: str, _admin: Caller = Depends(admin_caller)):
        record = await self._store_call("enable", f"{tenant}/{name}")
        self._disabled.pop(record["adapter_id"], None)
        return record

    @app.post("/admin/adapters/{tenant}/{name}/rollback")
    async def admin_rollback(self, tenant: str, name: str, _admin: Caller = Depends(admin_caller)):
        return await self._store_call("rollback", f"{tenant}/{name}")

    @app.post("/admin/adapters/{tenant}/{name}/pin")
    async def admin_pin(self, tenant: str, name: str, body: PinRequest, _admin: Caller = Depends(admin_caller)):
        return await self._store_call("pin", f"{tenant}/{name}", body.replicas)

    @app.delete("/admin/adapters/{tenant}/{name}/pin")
    async def admin_unpin(self, tenant: str, name: str, _admin: Caller = Depends(admin_caller)):
        return await self._store_call("unpin", f"{tenant}/{name}")

    @app.post("/admin/sources", status_code=201)
    async def admin_add_source(self, body: RegisterSourceRequest, _admin: Caller = Depends(admin_caller)):
        uri, options = self._allowed_source(body.uri, body.options)
        return await self._store_call("add_source", uri, options)

    @app.post("/admin/sync")
    async def admin_sync(self, _admin: Caller = Depends(admin_caller)):
        return await self._store_call("sync_now")

    @app.get("/admin/store")
    async def admin_store(self, _admin: Caller = Depends(admin_caller)):
        return await self._store_call("status")

    @app.get("/healthz")
    async def healthz(self):
        try:
            with typed_ray_errors():
                await asyncio.wait_for(self.replicas.list_adapters.remote(), HEALTH_TIMEOUT_S)
        except asyncio.TimeoutError:
            return http_errors.error_response(
                ServiceUnavailableError(f"no replica answered within {HEALTH_TIMEOUT_S:.0f} s"))
        except LoraServeError as error:
            return http_errors.error_response(ServiceUnavailableError(f"the replicas cannot answer: {error}"))
        health = {"status": "ok", "base_model": self.settings.base_model_name}
        if self.store is not None:
            health.update(await self._store_health())
        if self.settings.tenants.auth == "none":
            health["warning"] = OPEN_ACCESS_WARNING
        return health

    async def _store_health(self) -> dict:
        """The store's state for `/healthz`: `degraded` while a source is down or a store restarts
        (the replicas serve from their copies, so the answer stays 200). Counts only: anyone may
        ask, and sources name buckets and endpoints (`/admin/store` has them)."""
        try:
            with typed_ray_errors("the adapter store"):
                status = await asyncio.wait_for(self.store.handle().status.remote(), HEALTH_TIMEOUT_S)
        except (asyncio.TimeoutError, LoraServeError):
            return {"status": "degraded", "store": "unreachable"}
        unreachable = sum(1 for source in status["sources"] if not source["reachable"])
        return {"status": status["status"], "store": status["status"], "sources_unreachable": unreachable}

    # ---- internals ------------------------------------------------------------------------------

    def _adapter_for(self, model: str, caller: Caller) -> str | None:
        """The adapter id a request's `model` names; None for the base model. Another tenant's
        adapter gets the same 404 as an unknown one; an id nobody registered is refused by the
        replica (404)."""
        if model == self.settings.base_model_name:
            return None
        try:
            adapter_id = str(parse_adapter_id(model))
        except InvalidAdapterIdError:
            raise AdapterNotFoundError(
                f"model {model!r} is neither the base model {self.settings.base_model_name!r} nor an adapter id "
                "('<tenant>/<name>'); GET /v1/models lists what you can use") from None
        if not caller.can_see(adapter_id):
            raise AdapterNotFoundError(f"adapter {adapter_id!r} is not registered")
        return adapter_id

    def _combination_for(self, body: CompletionRequest | ChatCompletionRequest, caller: Caller) -> Combination:
        """The combination a body's `adapters` names, each id one the caller may use (else 404)."""
        if body.model != self.settings.base_model_name:
            raise InvalidRequestError(
                f"with `adapters`, `model` is the base model's name {self.settings.base_model_name!r}, "
                f"not {body.model!r}")
        weights = {}
        for item in body.adapters:
            adapter_id = self._adapter_for(item.id, caller)
            if adapter_id is None:
                raise InvalidRequestError("`adapters` names adapters; the base model is the `model`")
            weights[adapter_id] = item.weight
        return Combination.of(weights)

    async def _complete(
        self, body: CompletionRequest | ChatCompletionRequest, kind: Literal["completion", "chat"], caller: Caller
    ):
        """Both OpenAI endpoints, counted (`deployments.metrics`): an error is counted with its status."""
        started_s = time.perf_counter()
        tenant = caller.tenant or "admin"
        request = None
        try:
            if caller.tenant is not None:
                self._rate_limiter.admit(caller.tenant)
            request = dataclasses.replace(self._generation_request(body, caller, await self._disabled_adapters()),
                                          tenant=caller.tenant)
            # a stream holds its place in the queue until its first token, a plain request until answered
            with self._queue_shares.hold(caller.tenant) if caller.tenant is not None else contextlib.nullcontext():
                if body.stream:
                    return await self._stream(request, StreamFormat(kind, body.model, body.include_usage), tenant,
                                              started_s, deadline_s=time.monotonic() + self.settings.request_timeout_s)
                result: GenerationChunk = await _within(self.settings.request_timeout_s, _on_a_live_replica(
                    lambda: self._replicas_for(request).generate.remote(request)))
        except LoraServeError as error:
            self.metrics.request_done(tenant, adapter_label(request, error.status_code), error.status_code,
                                      time.perf_counter() - started_s)
            raise
        self.metrics.request_done(tenant, adapter_label(request, 200), 200, time.perf_counter() - started_s,
                                  result.prompt_tokens, result.completion_tokens)
        response = CompletionResponse if kind == "completion" else ChatCompletionResponse
        return response.of(body.model, result)

    def _generation_request(self, body: CompletionRequest | ChatCompletionRequest, caller: Caller,
                            disabled: dict[str, str]) -> GenerationRequest:
        """The request a body asks for, with the caller's rights and the disabled adapters applied."""
        if body.adapters is not None:
            combination = self._combination_for(body, caller)
            if off := [a for a in combination.adapter_ids if a in disabled]:
                raise AdapterDisabledError(f"adapter {off[0]!r} is disabled")
            return body.to_generation_request(None, combination)
        adapter_id = self._adapter_for(body.model, caller)
        fallback = disabled.get(adapter_id) if adapter_id is not None else None
        if fallback is not None and fallback != "base":
            raise AdapterDisabledError(f"adapter {adapter_id!r} is disabled")
        return body.to_generation_request(None if fallback == "base" else adapter_id)

    def _replicas_for(self, request: GenerationRequest) -> DeploymentHandle:
        """The handle with the request's adapter (or combination) as its routing key (`request_router.py`)."""
        return self.replicas.options(multiplexed_model_id=request.routing_key)

    async def _disabled_adapters(self) -> dict[str, str]:
        """adapter id -> fallback for the disabled ones, refreshed from the store at most every
        DISABLED_REFRESH_S; while the store cannot answer, the last answer holds."""
        now = time.monotonic()
        if self.store is None or now - self._disabled_at_s < DISABLED_REFRESH_S:
            return self._disabled
        self._disabled_at_s = now  # requests meanwhile use the last answer
        try:
            with typed_ray_errors("the adapter store"):
                handle = self.store.handle()
                self._disabled = await asyncio.wait_for(handle.disabled_adapters.remote(), STORE_LOOKUP_TIMEOUT_S)
        except (asyncio.TimeoutError, LoraServeError) as error:
            logger.warning("could not refresh the disabled adapters from the store: %s", error)
        return self._disabled

    def _allowed_source(self, uri: str, options: dict) -> tuple[str, dict]:
        """The URI and the options to fetch it with, if it lies under an allowed root (`allowlist`)."""
        if self.settings.store is None:
            raise AdapterNotFoundError(NO_STORE)
        return checked_source(uri, options, self.settings.store)

    async def _store_call(self, method: str, *args, **kwargs):
        """A call to the store, with a timeout: while the store restarts Ray holds calls until it
        is back, and a caller gets 503 + Retry-After instead of waiting. Calls that download
        (registrations, syncs, merges) get longer, and may still finish after a 503."""
        if self.store is None:
            raise AdapterNotFoundError(NO_STORE)
        timeout_s = STORE_WRITE_TIMEOUT_S if method in STORE_DOWNLOADING_CALLS else STORE_CALL_TIMEOUT_S
        try:
            with typed_ray_errors("the adapter store"):
                return await asyncio.wait_for(getattr(self.store.handle(), method).remote(*args, **kwargs), timeout_s)
        except asyncio.TimeoutError:
            raise ServiceUnavailableError(
                f"the adapter store did not answer within {timeout_s:.0f} s (it may be restarting); retry shortly"
                + ("; the call may still finish: GET /admin/adapters shows it" if method in STORE_DOWNLOADING_CALLS else ""),
                STORE_RETRY_AFTER_S) from None

    async def _stream(self, request: GenerationRequest, fmt: StreamFormat, tenant: str,
                      started_s: float, deadline_s: float) -> StreamingResponse:
        responses: DeploymentResponseGenerator | None = None

        async def first_chunk() -> GenerationChunk:
            nonlocal responses
            responses = self._replicas_for(request).options(stream=True).stream.remote(request)
            try:
                return await responses.__anext__()
            except BaseException:
                responses.cancel()
                raise

        # nothing sent yet: a dead replica is retried
        first = await _within(deadline_s - time.monotonic(), _on_a_live_replica(first_chunk))
        ttft_s = time.perf_counter() - started_s

        def done(status: int, last: GenerationChunk) -> None:
            self.metrics.request_done(tenant, adapter_label(request, status), status, time.perf_counter() - started_s,
                                      last.prompt_tokens, last.completion_tokens, ttft_s=ttft_s)

        return StreamingResponse(
            _server_sent_events(first, responses, fmt, done, deadline_s),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
