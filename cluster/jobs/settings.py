"""What every job in `cluster/jobs/` reads from serve_config.yaml: the replicas' engine settings
and the adapter store's, the way the replicas read them, without importing Ray Serve."""

from __future__ import annotations

from pathlib import Path

import yaml

from deployments.deploy_config import ReplicaSettings, ReplicaUserConfig
from lora_core.errors import InvalidRequestError
from lora_core.paths import REPO_ROOT
from lora_core.settings import EngineConfig, StoreConfig

__all__ = ["DEFAULT_CONFIG", "load_settings"]

DEFAULT_CONFIG = REPO_ROOT / "serve_config.yaml"


def load_settings(config_path: Path) -> tuple[EngineConfig, StoreConfig]:
    """The first application's `args.replica` as the replicas read it, with its LoraReplica
    `user_config` override when the file has one: engine settings and store. InvalidRequestError
    for a missing file or one with no application; pydantic's ValidationError for settings the
    replicas would refuse."""
    path = Path(config_path)
    if not path.is_file():
        raise InvalidRequestError(f"no Serve config at {path}; pass one with --config PATH")
    document = yaml.safe_load(path.read_text()) or {}
    applications = document.get("applications") or []
    if not applications:
        raise InvalidRequestError(f"{path} has no applications")
    replica = ReplicaSettings.model_validate((applications[0].get("args") or {}).get("replica") or {})
    for deployment in applications[0].get("deployments") or []:
        if deployment.get("name") == "LoraReplica" and deployment.get("user_config") is not None:
            replica = ReplicaUserConfig.model_validate(deployment["user_config"]).applied_to(replica)
    return replica.engine_config(), replica.store or StoreConfig()
