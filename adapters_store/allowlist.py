"""Where the admin API may fetch adapters from: only under allowed roots, with the options the
config gives those roots.

A registration or a new source over HTTP names a URI and, at most, the harmless options of its
kind (`ApiSourceOptions`). It is accepted only when the URI lies under an allowed root: the
store's `allowed_roots`, its configured `sources`, its own root and `merged_uri`. Endpoints,
regions, cache folders and credentials come from that root's configured options, never from the
call, so an admin key cannot point the store's credentials at another host or write files
anywhere on its node. Local paths are compared after resolving symlinks and `..`. Pure module.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lora_core.adapter_ids import HubUri, LocalUri, S3Uri, SourceUri, parse_source_uri
from lora_core.errors import ForbiddenError, InvalidRequestBodyError, InvalidRequestError
from lora_core.settings import SourceInput, SourceOptions, StoreConfig

__all__ = ["ApiSourceOptions", "allowed_roots", "checked_source"]


class _NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class S3ApiOptions(_NoOptions):
    connect_timeout_s: float | None = Field(None, gt=0, le=120)
    read_timeout_s: float | None = Field(None, gt=0, le=600)


ApiSourceOptions: dict[str, type[BaseModel]] = {"file": _NoOptions, "s3": S3ApiOptions, "hf": _NoOptions}
"""URI scheme -> the options an API call may set for it; anything else is the config's."""


def allowed_roots(config: StoreConfig) -> list[SourceInput]:
    """Every root a registration may lie under, each with the options the config gives it."""
    roots = [*config.allowed_roots, *config.sources, SourceInput(uri=str(config.resolved_root()))]
    if config.merged_uri is not None:
        roots.append(SourceInput(uri=config.merged_uri, options=config.merged_options))
    return roots


def checked_source(uri: str, options: dict[str, Any], config: StoreConfig) -> tuple[str, SourceOptions]:
    """(uri, the options to fetch it with) for a URI under an allowed root; 422 for options an
    API call may not set or of the wrong type, 403 for a URI outside every allowed root."""
    target = parse_source_uri(uri)
    try:
        api_options = ApiSourceOptions[target.scheme].model_validate(options).model_dump(exclude_none=True)
    except ValidationError as error:
        raise InvalidRequestBodyError(
            f"options: {error.errors()[0]['msg']} ({target.scheme}:// sources take "
            f"{sorted(ApiSourceOptions[target.scheme].model_fields) or 'no options'} over the API; endpoints, "
            "regions, cache folders and credentials come from the store's config)", []) from None
    for root in allowed_roots(config):
        if _contains(root.uri, target):
            return uri, {**root.options, **api_options}
    raise ForbiddenError(f"{uri} is not under an allowed root: add it to the store's allowed_roots in the config")


def _contains(root_uri: str, target: SourceUri) -> bool:
    if root_uri.startswith("hf://"):  # a Hub root may be an org alone (hf://acme-org)
        root_path = root_uri[len("hf://"):].split("@", 1)[0].strip("/")
        return isinstance(target, HubUri) and _under(f"{target.repo_id}/{target.subfolder}".strip("/"), root_path)
    try:
        root = parse_source_uri(root_uri)
    except InvalidRequestError:
        return False
    if isinstance(root, S3Uri):
        return isinstance(target, S3Uri) and target.bucket == root.bucket and _under(target.prefix, root.prefix)
    if isinstance(root, LocalUri):
        return isinstance(target, LocalUri) and _under(os.path.realpath(target.path), os.path.realpath(root.path))
    return False


def _under(path: str, root: str) -> bool:
    path, root = path.strip("/"), root.strip("/")
    return not root or path == root or path.startswith(root + "/")
