"""The admin API's allowlist: URIs only under allowed roots, options only the harmless typed ones,
the rest from the root's config. Pure: no Ray, no network."""

from __future__ import annotations

import os

import pytest

from adapters_store.allowlist import checked_source
from lora_core.errors import ForbiddenError, InvalidRequestBodyError
from lora_core.settings import SourceInput, StoreConfig

ENDPOINT = "http://127.0.0.1:5000"


@pytest.fixture
def config(tmp_path) -> StoreConfig:
    (tmp_path / "uploads" / "acme").mkdir(parents=True)
    return StoreConfig(
        root=str(tmp_path / "store"),
        sources=[SourceInput(uri="s3://models/prod", options={"endpoint_url": ENDPOINT})],
        allowed_roots=[SourceInput(uri=str(tmp_path / "uploads")), SourceInput(uri="hf://acme-org")],
    )


def test_uris_under_an_allowed_root_are_accepted_with_the_roots_options(config, tmp_path):
    assert checked_source("s3://models/prod/acme/bot", {}, config) == ("s3://models/prod/acme/bot", {"endpoint_url": ENDPOINT})
    assert checked_source(str(tmp_path / "uploads" / "acme"), {}, config)[1] == {}
    assert checked_source(str(tmp_path / "store" / "merged" / "acme" / "m"), {}, config)[1] == {}  # the store's root
    assert checked_source("hf://acme-org/bot@main", {}, config)[1] == {}
    timeouts = checked_source("s3://models/prod/acme/bot", {"read_timeout_s": 60.0}, config)[1]
    assert timeouts == {"endpoint_url": ENDPOINT, "read_timeout_s": 60.0}


@pytest.mark.parametrize("uri", [
    "/", "/proc/self", "file:///root", "/etc/passwd",
    "s3://models/production/x",  # a prefix of the same characters is not under prod/
    "s3://other-bucket/prod/x",
    "hf://evil-org/bot@main", "hf://acme-organisation/bot@main",
])
def test_uris_outside_every_allowed_root_are_refused(config, uri):
    with pytest.raises(ForbiddenError, match="not under an allowed root"):
        checked_source(uri, {}, config)


def test_path_tricks_and_symlinks_out_of_a_root_are_refused(config, tmp_path):
    with pytest.raises(ForbiddenError):
        checked_source(str(tmp_path / "uploads" / ".." / ".." / "etc"), {}, config)
    os.symlink("/etc", tmp_path / "uploads" / "acme" / "escape")
    with pytest.raises(ForbiddenError):
        checked_source(str(tmp_path / "uploads" / "acme" / "escape"), {}, config)


@pytest.mark.parametrize("uri, options", [
    ("s3://models/prod/acme/bot", {"endpoint_url": "http://attacker.example"}),
    ("s3://models/prod/acme/bot", {"region": "us-east-1"}),
    ("s3://models/prod/acme/bot", {"read_timeout_s": "soon"}),
    ("s3://models/prod/acme/bot", {"read_timeout_s": -1}),
    ("hf://acme-org/bot@main", {"endpoint": "http://attacker.example"}),
    ("hf://acme-org/bot@main", {"cache_dir": "/etc"}),
    ("hf://acme-org/bot@main", {"token": "hf_x"}),
])
def test_options_an_api_call_may_not_set_or_of_the_wrong_type_are_422(config, uri, options):
    with pytest.raises(InvalidRequestBodyError, match="options"):
        checked_source(uri, options, config)
