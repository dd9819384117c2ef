"""What every job in `cluster/jobs/` reads from serve_config.yaml: the replicas' engine settings
and the adapter store's, the way the replicas read them, without importing Ray Serve."""

from __future__ import annotations

from pathlib import Path

import yaml

from lora_core.errors import InvalidRequestError
from lora_core.paths import REPO_ROOT
from lora_core.settings import EngineConfig, StoreConfig

__all__ = ["DEFAULT_CONFIG", "REPLICA_ONLY_FIELDS", "load_settings"]

DEFAULT_CONFIG = REPO_ROOT / "serve_config.yaml"
REPLICA_ONLY_FIELDS = ("adapters", "store")
"""`deployments.replica.ReplicaSettings`' fields beyond EngineConfig's (a test keeps them equal);
that module imports Ray Serve, which a job that exports a local folder does not need."""


def load_settings(config_path: Path) -> tuple[EngineConfig, StoreConfig]:
    """The first application's `args.replica` as the replicas read it: engine settings and store.
    InvalidRequestError for a missing file or one with no application; pydantic's
    ValidationError for settings the replicas would refuse."""
    path = Path(config_path)
    if not path.is_file():
        raise InvalidRequestError(f"no Serve config at {path}; pass one with --config PATH")
    document = yaml.safe_load(path.read_text()) or {}
    applications = document.get("applications") or []
    if not applications:
        raise InvalidRequestError(f"{path} has no applications")
    replica = dict((applications[0].get("args") or {}).get("replica") or {})
    store = replica.get("store")
    engine = {k: v for k, v in replica.items() if k not in REPLICA_ONLY_FIELDS}
    return EngineConfig.model_validate(engine), StoreConfig.model_validate(store or {})
