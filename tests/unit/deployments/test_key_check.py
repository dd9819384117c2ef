"""Which paths the ingress checks keys on before it reads a body (`deployments.key_check`)."""

from __future__ import annotations

import pytest

from deployments.key_check import required_caller


@pytest.mark.parametrize("path, needed", [
    ("/admin", "admin"), ("/admin/adapters", "admin"), ("/admin/adapters/acme/pirate/pin", "admin"),
    ("/v1/completions", "any"), ("/v1/models", "any"), ("/v1/adapters/merge", "any"), ("/v1", "any"),
    ("/healthz", None), ("/", None), ("/administrator", None), ("/v10/x", None),
])
def test_admin_paths_need_an_admin_v1_paths_any_key_and_the_rest_none(path, needed):
    assert required_caller(path) == needed


def test_the_caller_is_authenticated_once_and_left_for_the_routes():
    import asyncio

    from deployments.key_check import CALLER_STATE, KeyCheck
    from deployments.tenants import ADMIN_CALLER, Caller

    presented, seen, sent = [], [], []

    def authenticate(header):
        presented.append(header)
        return Caller(tenant="acme") if header == "Bearer sk-acme-12345" else ADMIN_CALLER

    async def route(scope, receive, send):
        seen.append(scope["state"][CALLER_STATE])

    async def send(message):
        sent.append(message)

    def call(path, key):
        scope = {"type": "http", "path": path, "headers": [(b"authorization", key.encode())]}
        asyncio.run(KeyCheck(route, authenticate)(scope, None, send))

    call("/v1/completions", "Bearer sk-acme-12345")
    assert presented == ["Bearer sk-acme-12345"] and seen == [Caller(tenant="acme")]
    call("/admin/store", "Bearer sk-acme-12345")  # a tenant on /admin: 403, the route never runs
    assert len(seen) == 1 and sent[0]["status"] == 403
