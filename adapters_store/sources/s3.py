"""S3Source: adapters under `s3://bucket/<prefix>/<tenant>/<name>/`, through boto3.

With `adapter_id=`, the URI is one adapter's folder instead: its files are `<prefix>/<file>`
(one delimited LIST of that level, nothing below it is read), listed under that id.

Credentials come from boto3's standard chain (env, profile, instance role); `endpoint_url` points it
at MinIO, moto or another S3-compatible store. A version joins the files' ETags, taken from the
listing (one paginated LIST per sync, no HEAD per adapter). A download asks for exactly the listed
ETag (`IfMatch`), so a file replaced between listing and download is refused, not mixed in.

Two layers of retry: botocore's own (`botocore_max_attempts`, standard mode) for a single call,
and `RetryPolicy` around whole operations for connection errors, throttling and 5xx. After them,
an unreachable endpoint or a 5xx is a SourceUnavailableError (retry later); a missing bucket,
refused or missing credentials or the wrong region is a SourceRefusedError (fix the config),
never retried. Raw botocore errors never leave this module.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, IncompleteReadError, NoCredentialsError
from botocore.exceptions import ConnectionError as BotoConnectionError

from adapters_store.sources.base import (
    KNOWN_FILES,
    ParallelFetch,
    Progress,
    RemoteAdapter,
    RemoteFile,
    RetryPolicy,
    call_source,
    files_to_fetch,
)
from lora_core.adapter_ids import S3Uri, parse_adapter_id, parse_s3_uri, validate_adapter_id
from lora_core.errors import (
    AdapterNotFoundError,
    InvalidAdapterIdError,
    InvalidRequestError,
    SourceError,
    SourceRefusedError,
    SourceUnavailableError,
)
from lora_core.files import publish_folder

T = TypeVar("T")
_CHUNK_BYTES = 1 << 20
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
                    "ServiceUnavailable"}
_REFUSALS = {  # answers that retrying cannot change
    "NoSuchBucket": "the bucket does not exist",
    "AccessDenied": "access denied: check the credentials and the bucket policy",
    "InvalidAccessKeyId": "the access key is not known to this endpoint",
    "SignatureDoesNotMatch": "the secret key does not match the access key",
    "PermanentRedirect": "the bucket is in another region: set the region",
}


def _is_transient(error: BaseException) -> bool:
    if isinstance(error, (BotoConnectionError, HTTPClientError, IncompleteReadError)):
        return True
    if isinstance(error, ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return error.response.get("Error", {}).get("Code") in _TRANSIENT_CODES or status >= 500
    return False


def _error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


_SESSION_LOCK = threading.Lock()
_SESSION: list[boto3.session.Session] = []


def _shared_session() -> boto3.session.Session:
    """One session per process (call under `_SESSION_LOCK`): a new session re-parses botocore's
    service models, ~100 ms and much garbage per client; clients made from it are thread-safe."""
    if not _SESSION:
        _SESSION.append(boto3.session.Session())
    return _SESSION[0]


class S3Source(ParallelFetch):
    """`adapter_id=None`: `<prefix>/<tenant>/<name>/<file>` objects, grouped into adapters.
    `adapter_id="acme/bot"`: `<prefix>/<file>` objects are that one adapter; the listing is
    `{adapter_id: ...}`, or `{}` while no adapter file is there (S3 has no empty folders)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        adapter_id: str | None = None,
        endpoint_url: str | None = None,
        region: str | None = None,
        retry: RetryPolicy = RetryPolicy(),
        botocore_max_attempts: int = 3,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 30.0,
        show_progress: bool = False,
        session: boto3.session.Session | None = None,
    ) -> None:
        uri = parse_s3_uri(f"s3://{bucket}/{prefix}")  # same checks as a URI in config
        self.bucket, self.prefix = uri.bucket, uri.prefix
        self.adapter_id = validate_adapter_id(adapter_id) if adapter_id is not None else None
        self.retry = retry
        self._progress = Progress(show_progress)
        config = Config(
            retries={"total_max_attempts": botocore_max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            max_pool_connections=32,
        )
        # boto3 clients are thread-safe (sessions are not): one client serves every fetch thread.
        with _SESSION_LOCK:
            self._client = (session or _shared_session()).client(
                "s3", endpoint_url=endpoint_url, region_name=region, config=config
            )
        self._endpoint = endpoint_url or "AWS S3"
        self.skipped: dict[str, str] = {}  # the last listing's folders that are not valid ids, with why

    @classmethod
    def from_uri(cls, uri: S3Uri, **options: Any) -> "S3Source":
        return cls(uri.bucket, uri.prefix, **options)

    def __repr__(self) -> str:
        single = f", adapter_id={self.adapter_id!r}" if self.adapter_id is not None else ""
        return f"S3Source({str(S3Uri(self.bucket, self.prefix))!r}{single}, endpoint={self._endpoint!r})"

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one S3 operation under the retry policy; what escapes becomes a typed error."""
        return call_source(self.retry, what, fn, _is_transient, self._translate)

    def _translate(self, what: str, error: Exception) -> SourceError | None:
        where = f"{what} on {self._endpoint} failed"
        if isinstance(error, ClientError):
            code = _error_code(error)
            if code in _REFUSALS:
                return SourceRefusedError(f"{where}: {_REFUSALS[code]}")
            return SourceUnavailableError(f"{where}: {code}: {error.response.get('Error', {}).get('Message', '')}")
        if isinstance(error, NoCredentialsError):
            return SourceRefusedError(f"{where}: no credentials found (set AWS_* variables, a profile or a role)")
        if isinstance(error, BotoCoreError):
            return SourceUnavailableError(f"{where}: {error}")
        return None

    def _key_prefix(self, relative: str = "") -> str:
        """`<prefix>/<relative>/`, or "" for the bucket root (an S3 key never starts with '/')."""
        joined = "/".join(p for p in (self.prefix, relative) if p)
        return f"{joined}/" if joined else ""

    def upload_adapter(self, adapter_id: str, folder: Path, names: Iterable[str] | None = None) -> str:
        """Put the files of a local adapter folder (those in `names`, default all) at
        `<prefix>/<tenant>/<name>/` (named merges, pushed adapters); returns that folder's URI."""
        relative = str(parse_adapter_id(adapter_id))
        wanted = None if names is None else set(names)
        for path in sorted(p for p in Path(folder).iterdir() if p.is_file() and (wanted is None or p.name in wanted)):
            key = self._key_prefix(relative) + path.name
            self._call(f"uploading s3://{self.bucket}/{key}",
                       lambda path=path, key=key: self._client.upload_file(str(path), self.bucket, key))
        return str(S3Uri(self.bucket, self._key_prefix(relative).rstrip("/")))

    def delete_adapter(self, adapter_id: str) -> None:
        """Remove every object under `<prefix>/<tenant>/<name>/`."""
        relative = str(parse_adapter_id(adapter_id))
        for obj in self._list(relative):
            self._call(f"deleting s3://{self.bucket}/{obj['Key']}",
                       lambda key=obj["Key"]: self._client.delete_object(Bucket=self.bucket, Key=key))

    def _list(self, relative: str = "", *, one_level: bool = False) -> list[dict[str, Any]]:
        """Every object under `<prefix>/<relative>/`; with `one_level`, only those directly in it."""
        extra = {"Delimiter": "/"} if one_level else {}

        def run() -> list[dict[str, Any]]:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key_prefix(relative), **extra)
            return [obj for page in pages for obj in page.get("Contents", [])]
        return self._call(f"listing s3://{self.bucket}/{self._key_prefix(relative)}", run)

    def _group(self, objects: list[dict[str, Any]]) -> tuple[dict[str, RemoteAdapter], dict[str, str]]:
        """Objects at `<prefix>/<tenant>/<name>/<known file>` grouped into adapters; others ignored."""
        by_id: dict[str, dict[str, RemoteFile]] = {}
        skipped: dict[str, str] = {}
        base = len(self._key_prefix())
        for obj in objects:
            parts = obj["Key"][base:].split("/")
            if len(parts) != 3 or parts[2] not in KNOWN_FILES:
                continue
            adapter_id = f"{parts[0]}/{parts[1]}"
            try:
                parse_adapter_id(adapter_id)
            except InvalidAdapterIdError as error:
                skipped[f"s3://{self.bucket}/{self._key_prefix(adapter_id)}"] = str(error)
                continue
            by_id.setdefault(adapter_id, {})[parts[2]] = RemoteFile(parts[2], obj["Size"], obj["ETag"].strip('"'))
        adapters = {}
        for adapter_id, found in by_id.items():
            files = tuple(found[name] for name in KNOWN_FILES if name in found)
            location = str(S3Uri(self.bucket, self._key_prefix(adapter_id).rstrip("/")))
            adapters[adapter_id] = RemoteAdapter(adapter_id, location, "+".join(f.etag for f in files), files)
        return adapters, skipped

    def _single(self, adapter_id: str) -> dict[str, RemoteAdapter]:
        """Single-adapter mode: the known files directly under the prefix are `adapter_id`."""
        base = len(self._key_prefix())
        found = {}
        for obj in self._list(one_level=True):
            name = obj["Key"][base:]
            if name in KNOWN_FILES:
                found[name] = RemoteFile(name, obj["Size"], obj["ETag"].strip('"'))
        if not found:
            return {}
        files = tuple(found[name] for name in KNOWN_FILES if name in found)
        location = str(S3Uri(self.bucket, self.prefix))
        return {adapter_id: RemoteAdapter(adapter_id, location, "+".join(f.etag for f in files), files)}

    def list_adapters(self) -> dict[str, RemoteAdapter]:
        if self.adapter_id is not None:
            self.skipped = {}
            return self._single(self.adapter_id)
        adapters, self.skipped = self._group(self._list())
        return adapters

    def version_of(self, adapter: RemoteAdapter) -> str:
        """One LIST of the adapter's folder: the same numbers as the full listing, for one adapter."""
        if self.adapter_id is not None:
            current = self._single(self.adapter_id).get(adapter.adapter_id)
        else:
            current = self._group(self._list(validate_adapter_id(adapter.adapter_id)))[0].get(adapter.adapter_id)
        if current is None:
            raise AdapterNotFoundError(f"adapter {adapter.adapter_id} is no longer in s3://{self.bucket}/{self.prefix}")
        return current.version

    def fetch(self, adapter: RemoteAdapter, dest_dir: Path) -> Path:
        where = parse_s3_uri(adapter.location)
        if where.bucket != self.bucket:
            raise InvalidRequestError(f"{adapter.location} is not in bucket {self.bucket}")
        wanted = files_to_fetch(adapter)

        def write(tmp: Path) -> None:
            for remote in wanted:
                key = "/".join(p for p in (where.prefix, remote.name) if p)
                self._call(f"downloading s3://{self.bucket}/{key}",
                           lambda: self._download(key, remote, tmp / remote.name, adapter.adapter_id))

        return publish_folder(dest_dir, write)

    def _download(self, key: str, remote: RemoteFile, dest: Path, adapter_id: str) -> None:
        """One GET, streamed to `dest` (inside the temp folder; a retry starts the file over)."""
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=key, IfMatch=f'"{remote.etag}"')
        except ClientError as error:
            if _error_code(error) in ("PreconditionFailed", "NoSuchKey"):
                raise SourceUnavailableError(
                    f"s3://{self.bucket}/{key} changed since it was listed; sync again to pick up the new version"
                ) from error
            raise
        body = response["Body"]
        try:
            with open(dest, "wb") as f, self._progress.file(f"{adapter_id}/{remote.name}", remote.size_bytes) as step:
                for chunk in body.iter_chunks(_CHUNK_BYTES):
                    f.write(chunk)
                    step(len(chunk))
        finally:
            body.close()
