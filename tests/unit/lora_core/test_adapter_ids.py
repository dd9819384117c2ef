"""Adapter ids and source URIs: every accepted shape, and every trick refused with a reason."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from lora_core.adapter_ids import (
    SHARED_TENANT,
    AdapterId,
    HubUri,
    LocalUri,
    S3Uri,
    adapter_dir,
    parse_adapter_id,
    parse_source_uri,
    validate_adapter_id,
)
from lora_core.errors import InvalidAdapterIdError, InvalidRequestError

GOOD_IDS = [
    ("acme/support-bot", AdapterId("acme", "support-bot")),
    ("acme/v1.2_final", AdapterId("acme", "v1.2_final")),
    ("0/0", AdapterId("0", "0")),
    ("shared/sql-expert", AdapterId("shared", "sql-expert")),
    ("t/" + "a" * 64, AdapterId("t", "a" * 64)),
    ("acme/a.b-c_d", AdapterId("acme", "a.b-c_d")),
]

# (id, a fragment the message must contain)
BAD_IDS = [
    ("", "is empty"),
    ("acme", "no tenant"),
    ("/acme/x", "absolute path"),
    ("acme/", "empty part"),
    ("/x", "absolute path"),
    ("acme//x", "empty part"),
    ("acme/x/", "empty part"),
    ("acme/x/y", "3 parts"),
    ("../x", "'..'"),
    ("acme/..", "'..'"),
    ("acme/../other/x", "'..'"),
    ("acme/a..b", "'..'"),
    ("./x", "'.' segment"),
    ("acme/.hidden", "start with a letter or digit"),
    ("acme/-rf", "start with a letter or digit"),
    ("acme/_x", "start with a letter or digit"),
    ("acme\\x", "backslash"),
    ("acme/x\\..\\..\\etc", "backslash"),
    ("acme/x\x00.txt", "control character"),
    ("acme/x\n", "control character"),
    ("acme/x\t", "control character"),
    ("acme/x\x7f", "control character"),
    ("Acme/x", "uppercase"),
    ("acme/Bot", "uppercase"),
    ("acme/a b", "characters [' ']"),
    ("acme/x%2e%2e", "characters ['%']"),
    ("acme/x:y", "characters [':']"),
    ("acme/x*", "characters ['*']"),
    ("acme/" + "a" * 65, "65 characters"),
    ("acme\uff0fx", "non-ASCII character U+FF0F"),  # fullwidth solidus
    ("acme\u2215x", "non-ASCII character U+2215"),  # division slash
    ("\u0430cme/x", "non-ASCII character U+0430"),  # Cyrillic a
    ("acme/x\u200b", "non-ASCII character U+200B"),  # zero-width space
    ("acme/\u202ex", "non-ASCII character U+202E"),  # right-to-left override
    ("acme/e\u0301", "non-ASCII character U+0301"),  # combining accent
    ("acme/\uff11", "non-ASCII character U+FF11"),  # fullwidth digit one
]


@pytest.mark.parametrize(("text", "expected"), GOOD_IDS)
def test_good_ids(text, expected):
    assert parse_adapter_id(text) == expected
    assert validate_adapter_id(text) == text
    assert str(expected) == text


@pytest.mark.parametrize(("text", "fragment"), BAD_IDS)
def test_bad_ids_are_refused_with_a_reason(text, fragment):
    with pytest.raises(InvalidAdapterIdError) as info:
        parse_adapter_id(text)
    assert fragment in str(info.value)
    assert info.value.status_code == 400
    assert pickle.loads(pickle.dumps(info.value)).message == info.value.message


@pytest.mark.parametrize("value", [None, 3, b"acme/x", ["acme", "x"]])
def test_non_strings_are_refused(value):
    with pytest.raises(InvalidAdapterIdError, match="must be a string"):
        parse_adapter_id(value)


def test_long_ids_are_shortened_in_messages():
    with pytest.raises(InvalidAdapterIdError) as info:
        parse_adapter_id("acme/" + "x" * 10_000)
    assert len(str(info.value)) < 400


def test_adapter_id_cannot_be_built_around_the_checks():
    with pytest.raises(InvalidAdapterIdError, match="'..'"):
        AdapterId("acme", "..")
    with pytest.raises(InvalidAdapterIdError, match="characters"):
        AdapterId("acme", "a/b")


def test_shared_tenant_is_visible_to_everyone():
    shared = parse_adapter_id(f"{SHARED_TENANT}/sql")
    own = parse_adapter_id("acme/bot")
    assert shared.is_shared and not own.is_shared
    assert shared.visible_to("acme") and shared.visible_to("globex")
    assert own.visible_to("acme") and not own.visible_to("globex")


def test_adapter_dir_stays_under_root(tmp_path):
    assert adapter_dir(tmp_path, "acme/bot") == tmp_path / "acme" / "bot"
    with pytest.raises(InvalidAdapterIdError):
        adapter_dir(tmp_path, "../../etc/passwd")


GOOD_URIS = [
    ("s3://adapters", S3Uri("adapters", "")),
    ("s3://adapters/", S3Uri("adapters", "")),
    ("s3://my.bucket-1/prod/lora", S3Uri("my.bucket-1", "prod/lora")),
    ("s3://adapters/prod/", S3Uri("adapters", "prod")),
    ("S3://adapters/p", S3Uri("adapters", "p")),
    ("hf://org/repo", HubUri("org/repo", "main")),
    ("hf://Org/My.Repo_1@v1.0", HubUri("Org/My.Repo_1", "v1.0")),
    ("hf://org/repo@refs/pr/1", HubUri("org/repo", "refs/pr/1")),
    ("hf://org/repo/adapters/acme@" + "a" * 40, HubUri("org/repo", "a" * 40, "adapters/acme")),
    ("file:///srv/adapters", LocalUri(Path("/srv/adapters"))),
    ("file:///srv/my%20adapters/", LocalUri(Path("/srv/my adapters"))),
    ("/srv/adapters", LocalUri(Path("/srv/adapters"))),
    ("/srv/./adapters//x/..", LocalUri(Path("/srv/adapters"))),
]


@pytest.mark.parametrize(("uri", "expected"), GOOD_URIS)
def test_good_source_uris(uri, expected):
    parsed = parse_source_uri(uri)
    assert parsed == expected
    assert parse_source_uri(str(parsed)) == parsed  # str() round-trips (manifests store it)


BAD_URIS = [
    ("", "non-empty"),
    ("gs://bucket/x", "unsupported scheme 'gs'"),
    ("http://example.com/x", "unsupported scheme"),
    ("s3://", "bucket name"),
    ("s3://ab", "bucket name"),
    ("s3://Bucket/x", "bucket name"),
    ("s3://bucket..x/p", "bucket name"),
    ("s3://bucket/a/../b", "'..'"),
    ("s3://bucket/a//b", "empty"),
    ("s3://bucket/a b", "characters outside"),
    ("s3://bucket/a\\b", "backslash"),
    ("s3://bucket/a?x=1", "query"),
    ("s3://bucket/caf\u00e9", "non-ASCII"),
    ("s3://bucket/a\x00", "non-ASCII or control"),
    ("hf://repo-only", "hf://<org>/<repo>"),
    ("hf://org/repo@", "invalid revision"),
    ("hf://org/repo@../main", "invalid revision"),
    ("hf://org/repo@a@b", "invalid revision"),
    ("hf://org/re--po", "repo name"),
    ("hf://org/../x", "repo name"),
    ("hf://org/repo/../x", "'..'"),
    ("hf://org/repo/@main", "empty subfolder"),
    ("relative/path", "not an absolute path"),
    ("./x", "not an absolute path"),
    ("file://host/srv/x", "names a host"),
    ("file:///srv/x%00y", "NUL"),
    ("/srv/x\x00y", "NUL"),
]


@pytest.mark.parametrize(("uri", "fragment"), BAD_URIS)
def test_bad_source_uris_are_refused_with_a_reason(uri, fragment):
    with pytest.raises(InvalidRequestError) as info:
        parse_source_uri(uri)
    assert fragment in str(info.value)


def test_parse_source_uri_passes_parsed_values_through():
    parsed = S3Uri("adapters", "p")
    assert parse_source_uri(parsed) is parsed
    assert parse_source_uri(Path("/srv/x")) == LocalUri(Path("/srv/x"))
    with pytest.raises(InvalidRequestError):
        parse_source_uri(None)
