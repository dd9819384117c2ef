"""Where adapters come from: a local folder, S3, or a Hugging Face Hub repo, behind one Protocol.

    AdapterSource        list_adapters() -> {adapter id: RemoteAdapter}, version_of(adapter),
                         fetch(adapter, dest_dir), fetch_many(adapters, dest_root, max_workers)
    LocalSource          <root>/<tenant>/<name>/; version = sha256 of the files
    S3Source             s3://bucket/<prefix>/<tenant>/<name>/; version = the files' ETags
    HubSource            hf://org/repo[/subfolder]@revision; version = the commit sha
    source_for_uri(uri, **options)   the source for a URI, chosen by scheme from SOURCE_TYPES

A source that cannot be reached (or answers 5xx) raises SourceUnavailableError (503, retry later);
one that answers "no" (no such bucket, repo or revision, access denied) SourceRefusedError (400,
fix the source: retrying cannot help); a folder without safetensors weights is an
InvalidAdapterError (`missing_file` / `pickle_file`) at fetch time.
"""

from __future__ import annotations

import inspect
from typing import Any

from adapters_store.sources.base import AdapterSource, FetchOutcome, RemoteAdapter, RemoteFile, RetryPolicy
from adapters_store.sources.hub import HubSource
from adapters_store.sources.local import FileHashCache, LocalSource
from adapters_store.sources.s3 import S3Source
from lora_core.adapter_ids import SourceUri, parse_source_uri
from lora_core.errors import InvalidRequestError

# Scheme -> source class; each class builds itself from its parsed URI with `from_uri`.
SOURCE_TYPES: dict[str, Any] = {
    "file": LocalSource,
    "s3": S3Source,
    "hf": HubSource,
}


def source_options(scheme: str) -> tuple[str, ...]:
    """The keyword options the source for `scheme` accepts (everything but what the URI says)."""
    params = inspect.signature(SOURCE_TYPES[scheme]).parameters.values()
    return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def source_for_uri(uri: str | SourceUri, **options: Any) -> AdapterSource:
    """The source for `uri`; options a source does not take are refused with the ones it does."""
    parsed = parse_source_uri(uri)
    allowed = source_options(parsed.scheme)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise InvalidRequestError(
            f"options {unknown} do not apply to {parsed.scheme}:// sources; accepted: {list(allowed)}")
    return SOURCE_TYPES[parsed.scheme].from_uri(parsed, **options)


__all__ = [
    "AdapterSource",
    "FetchOutcome",
    "FileHashCache",
    "HubSource",
    "LocalSource",
    "RemoteAdapter",
    "RemoteFile",
    "RetryPolicy",
    "S3Source",
    "SOURCE_TYPES",
    "source_for_uri",
    "source_options",
]
