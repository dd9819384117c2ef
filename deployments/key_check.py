"""`KeyCheck`: a caller's key is checked before its body is read.

FastAPI decodes a body before it runs a route's dependencies, so with the key checked only there
a body that is not JSON got 422 whatever the key, and a caller with no key could make the ingress
parse a body. This ASGI middleware answers 401 (no or unknown key) and 403 (a tenant key on
`/admin`) first, and leaves the caller in the request's state (`CALLER_STATE`) for the routes'
dependencies, so a key is hashed and compared once per request.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Literal, Optional

from deployments.http_errors import error_response
from deployments.tenants import Caller
from lora_core.errors import ForbiddenError, LoraServeError

__all__ = ["ADMIN_NEEDED", "CALLER_STATE", "KeyCheck", "required_caller"]

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ADMIN_NEEDED = "this needs an admin key"
CALLER_STATE = "caller"  # `request.state.caller` for the routes behind it


def required_caller(path: str) -> Optional[Literal["any", "admin"]]:
    """Who may call `path`: an admin (`/admin`), any caller with a key (`/v1`), or anyone (None)."""
    if path == "/admin" or path.startswith("/admin/"):
        return "admin"
    if path == "/v1" or path.startswith("/v1/"):
        return "any"
    return None


class KeyCheck:
    def __init__(self, app: Callable[..., Awaitable[None]], authenticate: Callable[[Optional[str]], Caller]) -> None:
        self.app, self.authenticate = app, authenticate

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        needed = required_caller(scope["path"]) if scope["type"] == "http" else None
        if needed is not None:
            header = next((value for name, value in scope.get("headers") or () if name == b"authorization"), None)
            try:
                caller = self.authenticate(header.decode("latin-1") if header is not None else None)
                if needed == "admin" and not caller.is_admin:
                    raise ForbiddenError(ADMIN_NEEDED)
            except LoraServeError as error:
                await error_response(error)(scope, receive, send)
                return
            scope.setdefault("state", {})[CALLER_STATE] = caller
        await self.app(scope, receive, send)
