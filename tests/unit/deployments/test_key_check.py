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
