"""Where a checkout keeps what it makes: `<repo root>/.cache/...`, one copy shared by every run.

Defaults only: every setting that names a folder (`model_cache_dir`, the store's `root`, the demo
adapters' `--out`) wins over these. Pure module.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["REPO_ROOT", "default_demo_adapters_dir", "default_model_cache_dir", "default_store_root"]

REPO_ROOT = Path(__file__).resolve().parents[1]
_CACHE = REPO_ROOT / ".cache"


def default_model_cache_dir() -> str:
    """Converted base models (SmolLM2's GGUF as safetensors)."""
    return str(_CACHE / "models")


def default_store_root() -> str:
    """The adapter store's manifest and validated copies."""
    return str(_CACHE / "adapter-store")


def default_demo_adapters_dir() -> Path:
    """The demo adapters `make serve` trains once."""
    return _CACHE / "demo-adapters"
