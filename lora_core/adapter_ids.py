"""Adapter ids and source URIs: the two strings from outside that become paths, keys and URLs.

Both are refused rather than repaired: an id or URI that needs fixing is a caller's mistake, and a
"normalised" id would alias another tenant's adapter. Pure module: no I/O, no heavy imports.

Adapter ids are `<tenant>/<name>`, lowercase ASCII. Each part matches `[a-z0-9][a-z0-9._-]{0,63}`
(1-64 chars, starts with a letter or digit) and holds no `..`. Nothing is decoded or normalised
(no percent-decoding, no Unicode folding), so what is checked is what is used as a path. The
tenant `shared` is reserved for adapters that every tenant may use (`shared/<name>`); any other
adapter is visible to its own tenant only. An id is safe to join under a folder or an S3 prefix.

Source URIs (`parse_source_uri`):
    s3://bucket[/prefix]                     S3Uri: adapters under `<prefix>/<tenant>/<name>/`
    hf://org/repo[/subfolder][@revision]     HubUri: revision defaults to "main"
    file:///abs/path  or  /abs/path          LocalUri
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Union
from urllib.parse import unquote

from lora_core.errors import InvalidAdapterIdError, InvalidRequestError

SHARED_TENANT = "shared"
ID_PART_PATTERN = r"[a-z0-9][a-z0-9._-]{0,63}"
_ID_PART = re.compile(ID_PART_PATTERN)
_MAX_SHOWN_CHARS = 80


@dataclass(frozen=True)
class AdapterId:
    """A validated adapter id; build it with `parse_adapter_id`."""

    tenant: str
    name: str

    def __post_init__(self) -> None:
        text = f"{self.tenant}/{self.name}"
        for part, label in ((self.tenant, "tenant"), (self.name, "name")):
            if not isinstance(part, str) or not part.isascii() or not part:
                raise _refuse(text, f"has an empty or non-ASCII {label}")
            _check_part(text, part, label)

    def __str__(self) -> str:
        return f"{self.tenant}/{self.name}"

    @property
    def is_shared(self) -> bool:
        return self.tenant == SHARED_TENANT

    def visible_to(self, tenant: str) -> bool:
        """A tenant sees its own adapters and the shared ones."""
        return self.is_shared or self.tenant == tenant


def _shown(text: str) -> str:
    return repr(text if len(text) <= _MAX_SHOWN_CHARS else text[:_MAX_SHOWN_CHARS] + "...")


def _refuse(text: str, problem: str) -> InvalidAdapterIdError:
    return InvalidAdapterIdError(
        f"adapter id {_shown(text)} {problem}; ids are '<tenant>/<name>', each part "
        f"{ID_PART_PATTERN} (use '{SHARED_TENANT}/<name>' for an adapter every tenant may use)"
    )


def _check_part(text: str, part: str, label: str) -> None:
    if part == ".":
        raise _refuse(text, f"has a '.' segment as its {label}")
    if ".." in part:
        raise _refuse(text, f"has '..' in its {label} (path traversal is not allowed)")
    if part != part.lower():
        raise _refuse(text, f"has uppercase letters in its {label} {part!r}: ids are lowercase")
    if len(part) > 64:
        raise _refuse(text, f"has a {label} of {len(part)} characters (at most 64)")
    if not part[0].isalnum():
        raise _refuse(text, f"has a {label} {part!r} that does not start with a letter or digit")
    if not _ID_PART.fullmatch(part):
        bad = sorted({c for c in part if not re.fullmatch(r"[a-z0-9._-]", c)})
        raise _refuse(text, f"has characters {bad} in its {label} (allowed: a-z 0-9 . _ -)")


def parse_adapter_id(text: object) -> AdapterId:
    """Validate `text` as `<tenant>/<name>` or raise InvalidAdapterIdError saying what is wrong."""
    if not isinstance(text, str):
        raise InvalidAdapterIdError(f"adapter id must be a string, got {type(text).__name__}")
    if not text:
        raise _refuse(text, "is empty")
    for char in text:
        if not char.isascii():
            raise _refuse(text, f"has the non-ASCII character U+{ord(char):04X} (lookalikes are refused)")
        if ord(char) < 0x20 or ord(char) == 0x7F:
            raise _refuse(text, f"has the control character 0x{ord(char):02x}")
    if "\\" in text:
        raise _refuse(text, "has a backslash")
    if text.startswith("/"):
        raise _refuse(text, "is an absolute path")
    parts = text.split("/")
    if len(parts) == 1:
        raise _refuse(text, "has no tenant")
    if any(not part for part in parts):
        raise _refuse(text, "has an empty part (a doubled, leading or trailing '/')")
    if len(parts) > 2:
        if any(part in (".", "..") for part in parts):
            raise _refuse(text, "has a '..' or '.' segment (path traversal is not allowed)")
        raise _refuse(text, f"has {len(parts)} parts separated by '/', not 2")
    tenant, name = parts
    _check_part(text, tenant, "tenant")
    _check_part(text, name, "name")
    return AdapterId(tenant, name)


def validate_adapter_id(text: object) -> str:
    """The canonical id string, or InvalidAdapterIdError."""
    return str(parse_adapter_id(text))


def adapter_dir(root: Path, adapter_id: str) -> Path:
    """The folder for an adapter under `root`: `<root>/<tenant>/<name>`, never outside `root`."""
    parsed = parse_adapter_id(adapter_id)
    return Path(root) / parsed.tenant / parsed.name


# --- source URIs -------------------------------------------------------------------------------

_S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_KEY_SEGMENT = re.compile(r"[A-Za-z0-9!_.*'()=+-]+")
_HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_HUB_REVISION = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")


@dataclass(frozen=True)
class S3Uri:
    """`s3://bucket/prefix`; `prefix` has no leading or trailing '/' ("" for the bucket root)."""

    scheme: ClassVar[str] = "s3"
    bucket: str
    prefix: str = ""

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


@dataclass(frozen=True)
class HubUri:
    """`hf://org/repo/subfolder@revision`; `subfolder` is "" for the repo root."""

    scheme: ClassVar[str] = "hf"
    repo_id: str
    revision: str = "main"
    subfolder: str = ""

    def __str__(self) -> str:
        path = f"{self.repo_id}/{self.subfolder}" if self.subfolder else self.repo_id
        return f"hf://{path}@{self.revision}"


@dataclass(frozen=True)
class LocalUri:
    """An absolute local folder."""

    scheme: ClassVar[str] = "file"
    path: Path

    def __str__(self) -> str:
        return self.path.as_uri()


SourceUri = Union[S3Uri, HubUri, LocalUri]


def _bad_uri(uri: str, problem: str) -> InvalidRequestError:
    return InvalidRequestError(f"source URI {_shown(uri)} {problem}")


def _check_plain(uri: str, text: str) -> None:
    if any(not c.isascii() or ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise _bad_uri(uri, "has non-ASCII or control characters")
    if "\\" in text:
        raise _bad_uri(uri, "has a backslash")
    if "?" in text or "#" in text:
        raise _bad_uri(uri, "has a query or fragment ('?' or '#')")


def _check_segments(uri: str, path: str, what: str) -> str:
    """A relative '/'-separated path of plain segments, returned without outer slashes."""
    path = path.strip("/")
    if not path:
        return ""
    for segment in path.split("/"):
        if segment in ("", ".", ".."):
            raise _bad_uri(uri, f"has an empty, '.' or '..' segment in its {what}")
        if not _KEY_SEGMENT.fullmatch(segment):
            raise _bad_uri(uri, f"has the {what} segment {segment!r} with characters outside A-Z a-z 0-9 !_.*'()=+-")
    return path


def parse_s3_uri(uri: str) -> S3Uri:
    _check_plain(uri, uri)
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not _S3_BUCKET.fullmatch(bucket) or ".." in bucket:
        raise _bad_uri(uri, f"has an invalid bucket name {bucket!r} (3-63 chars of a-z 0-9 . -)")
    return S3Uri(bucket, _check_segments(uri, prefix, "prefix"))


def parse_hub_uri(uri: str) -> HubUri:
    _check_plain(uri, uri)
    path, at, revision = uri[len("hf://") :].partition("@")
    if at and not (_HUB_REVISION.fullmatch(revision) and ".." not in revision):
        raise _bad_uri(uri, f"has an invalid revision {revision!r} (a branch, tag or commit sha)")
    parts = path.split("/")
    if len(parts) < 2:
        raise _bad_uri(uri, "needs a repo as 'hf://<org>/<repo>'")
    for name in parts[:2]:
        if not _HUB_NAME.fullmatch(name) or ".." in name or "--" in name or name.endswith(".git"):
            raise _bad_uri(uri, f"has an invalid Hub repo name part {name!r}")
    subfolder = _check_segments(uri, "/".join(parts[2:]), "subfolder") if len(parts) > 2 else ""
    if len(parts) > 2 and not subfolder:
        raise _bad_uri(uri, "has an empty subfolder")
    return HubUri("/".join(parts[:2]), revision if at else "main", subfolder)


def parse_local_uri(uri: str) -> LocalUri:
    if "\x00" in uri:
        raise _bad_uri(uri, "has a NUL character")
    path = uri
    if uri.lower().startswith("file://"):
        path = unquote(uri[len("file://") :])
        if not path.startswith("/"):
            raise _bad_uri(uri, "names a host; use file:///absolute/path")
        if "\x00" in path:
            raise _bad_uri(uri, "has a NUL character")
    if not path.startswith("/"):
        raise _bad_uri(uri, "is not an absolute path; use /absolute/path or file:///absolute/path")
    return LocalUri(Path(os.path.normpath(path)))


_URI_PARSERS: dict[str, Callable[[str], SourceUri]] = {
    "s3": parse_s3_uri,
    "hf": parse_hub_uri,
    "file": parse_local_uri,
}


def parse_source_uri(uri: object) -> SourceUri:
    """Parse an adapter source URI; InvalidRequestError says what is wrong."""
    if isinstance(uri, (S3Uri, HubUri, LocalUri)):
        return uri
    if isinstance(uri, Path):
        uri = str(uri)
    if not isinstance(uri, str) or not uri:
        raise InvalidRequestError(f"source URI must be a non-empty string, got {uri!r}")
    scheme, sep, _ = uri.partition("://")
    if not sep:
        return parse_local_uri(uri)
    parser = _URI_PARSERS.get(scheme.lower())
    if parser is None:
        raise _bad_uri(uri, f"has the unsupported scheme {scheme!r}; use s3://, hf://, file:// or an absolute path")
    return parser(scheme.lower() + uri[len(scheme) :])
