"""The ingress's HTTP edges on a FastAPI app, called in process through httpx's ASGI transport (no server,
no Ray): a body over the limit is a 413 JSON error, one under it is read, and Starlette's own errors are JSON too."""

from __future__ import annotations

import asyncio

import httpx
from fastapi import FastAPI, Request

from deployments import http_errors
from deployments.body_limit import BodySizeLimit

LIMIT_BYTES = 1000


def app() -> FastAPI:
    api = FastAPI()
    http_errors.install(api)
    api.add_middleware(BodySizeLimit, max_body_bytes=LIMIT_BYTES)

    @api.post("/echo")
    async def echo(request: Request) -> dict:
        return {"bytes": len(await request.body())}

    return api


def post(content, headers=None) -> httpx.Response:
    async def call() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app()), base_url="http://test") as client:
            return await client.post("/echo", content=content, headers=headers)

    return asyncio.run(call())


def test_a_body_within_the_limit_is_read():
    assert post(b"x" * LIMIT_BYTES).json() == {"bytes": LIMIT_BYTES}


def test_a_declared_length_over_the_limit_is_413_before_the_body_is_read():
    response = post(b"x" * (LIMIT_BYTES + 1))
    assert response.status_code == 413 and response.json()["error"]["type"] == "body_too_large"
    assert post(b"x", headers={"Content-Length": "not-a-number"}).status_code == 413


def test_a_chunked_body_is_counted_as_it_arrives():
    async def chunks():
        for _ in range(5):
            yield b"x" * 400

    response = post(chunks())
    assert response.status_code == 413 and "1000 bytes" in response.json()["error"]["message"]


def test_starlettes_own_errors_come_in_the_same_json_shape():
    async def call() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app()), base_url="http://test") as client:
            return [await client.get("/nowhere"), await client.get("/echo")]

    missing, wrong_method = asyncio.run(call())
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["type"] == "method_not_allowed"
