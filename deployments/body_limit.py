"""`BodySizeLimit`: the ingress reads at most `max_body_bytes` of a request body.

A `Content-Length` over the limit is answered 413 before a byte of the body is read; a body sent
without one (chunked) is counted as it arrives and refused (413) once it passes the limit, so
no body of any size is held in the router's memory beyond the limit. An ASGI middleware.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from deployments.http_errors import error_response
from lora_core.errors import PayloadTooLargeError

__all__ = ["BodySizeLimit"]

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class BodySizeLimit:
    def __init__(self, app: Callable[..., Awaitable[None]], max_body_bytes: int) -> None:
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            await error_response(self._too_large())(scope, receive, send)
            return
        received_bytes = 0

        async def counted() -> dict[str, Any]:
            nonlocal received_bytes
            message = await receive()
            if message["type"] == "http.request":
                received_bytes += len(message.get("body", b""))
                if received_bytes > self.max_body_bytes:
                    raise self._too_large()
            return message

        await self.app(scope, counted, send)

    def _too_large(self) -> PayloadTooLargeError:
        return PayloadTooLargeError(f"the request body is over the limit of {self.max_body_bytes} bytes")
