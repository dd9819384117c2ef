"""What each process loads, proved in a fresh interpreter (import-linter sees only our own import
statements; these see everything, Ray's and the libraries' imports included)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lora_core.paths import REPO_ROOT

HEAVY = ("torch", "transformers", "peft", "safetensors", "boto3", "botocore", "huggingface_hub")
HTTP = ("fastapi", "starlette")
OUR_HTTP = ("deployments.router", "deployments.http_errors", "deployments.schemas")


def loaded_after(code: str) -> set[str]:
    """Top-level names and our own module names in sys.modules after running `code`."""
    script = (
        f"{code}\nimport json, sys\n"
        "names = {m.split('.')[0] for m in sys.modules} | {m for m in sys.modules if m.startswith('deployments')}\n"
        "print(json.dumps(sorted(names)))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def test_the_ingress_module_loads_no_torch_model_s3_or_hub_client():
    loaded = loaded_after("import deployments.router")
    assert "deployments" in loaded and "ray" in loaded and "fastapi" in loaded  # it did load the ingress
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
    assert "deployments.engine" not in loaded


def test_the_engine_and_the_store_link_load_no_http_code():
    loaded = loaded_after("import deployments.engine.engine, deployments.store_subscription")
    assert "torch" in loaded  # it did load the engine
    assert not loaded & set(HTTP + OUR_HTTP), sorted(loaded & set(HTTP + OUR_HTTP))


def test_the_replica_adds_no_http_code_to_what_ray_serve_loads():
    """`from ray import serve` imports FastAPI itself (its HTTP proxy machinery); the replica's own
    modules add none of ours, and nothing of FastAPI's beyond what Serve already loaded."""
    serve_alone = loaded_after("from ray import serve")
    replica = loaded_after("import deployments.replica")
    assert "fastapi" in serve_alone  # why the replica's process has FastAPI at all
    assert not replica & set(OUR_HTTP), sorted(replica & set(OUR_HTTP))
    assert replica & set(HTTP) == serve_alone & set(HTTP)


@pytest.mark.parametrize(
    "module",
    ["errors", "adapter_ids", "peft_files", "geometry", "changes", "settings", "base_models", "files", "paths"],
)
def test_lora_core_modules_load_no_ray_http_s3_hub_or_torch(module):
    loaded = loaded_after(f"import lora_core.{module}")
    assert not loaded & {"ray", *HTTP, *HEAVY}, sorted(loaded & {"ray", *HTTP, *HEAVY})


def test_the_stores_geometry_reads_no_weights_and_loads_no_model_library():
    code = (
        "from lora_core.geometry import slot_geometry\n"
        "from lora_core.settings import EngineConfig\n"
        "geometry = slot_geometry(EngineConfig(base_model='tiny-random-llama'))\n"
        "assert len(geometry.module_shapes) == 8, geometry"
    )
    loaded = loaded_after(code)
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
