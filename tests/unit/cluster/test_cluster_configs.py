"""The files in cluster/ that run lora-serve on a cluster, read the way their tools read them, with no
Ray, cloud or Kubernetes running: each YAML parses; Serve's `ServeDeploySchema` and the app's
`AppArgs` accept every serve config (serve_config.yaml, cluster/serve_config.gpu.yaml, the
RayService's serveConfigV2); the RayService serves exactly serve_config.yaml's applications; the
GPU config asks for GPUs, bf16 and compiled decode, and fits the launcher's GPU workers; the
launcher YAML passes Ray's launcher schema and the checks `ray up` runs before it calls AWS."""

from __future__ import annotations

import copy
import importlib
import json
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from pydantic import ValidationError
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from deployments.app import AppArgs
from lora_core.paths import REPO_ROOT

SERVE_CONFIG = REPO_ROOT / "serve_config.yaml"
GPU_SERVE_CONFIG = REPO_ROOT / "cluster" / "serve_config.gpu.yaml"
LAUNCHER = REPO_ROOT / "cluster" / "ray-cluster.yaml"
RAYSERVICE = REPO_ROOT / "cluster" / "kuberay-rayservice.yaml"
RAY_LAUNCHER_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"


def load(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path} is not a YAML mapping"
    return data


def rayservice_serve_config() -> dict:
    """The RayService's serveConfigV2: a YAML document inside a string, as KubeRay reads it."""
    text = load(RAYSERVICE)["spec"]["serveConfigV2"]
    assert isinstance(text, str), "serveConfigV2 must be a string (a `|` block) holding the Serve config"
    return yaml.safe_load(text)


def gpu_worker_types(launcher: dict) -> dict[str, dict]:
    return {name: node for name, node in launcher["available_node_types"].items()
            if node.get("resources", {}).get("GPU", 0) >= 1}


SERVE_CONFIGS = {
    "serve_config.yaml": lambda: load(SERVE_CONFIG),
    "serve_config.gpu.yaml": lambda: load(GPU_SERVE_CONFIG),
    "RayService serveConfigV2": rayservice_serve_config,
}


@pytest.mark.parametrize("path", [SERVE_CONFIG, GPU_SERVE_CONFIG, LAUNCHER, RAYSERVICE], ids=lambda p: p.name)
def test_each_yaml_parses_as_a_mapping(path):
    assert load(path)


@pytest.mark.parametrize("name", SERVE_CONFIGS)
def test_serves_own_schema_accepts_each_serve_config(name):
    config = SERVE_CONFIGS[name]()
    schema = ServeDeploySchema.model_validate(config)  # what `serve deploy` and KubeRay's PUT run
    assert [app.name for app in schema.applications] == ["lora-serve"]


@pytest.mark.parametrize("name", SERVE_CONFIGS)
def test_the_apps_args_model_accepts_each_serve_configs_args(name):
    """`build_app(args)` starts with `AppArgs.model_validate(args)`; run that alone (no app, no Ray)."""
    for app in SERVE_CONFIGS[name]()["applications"]:
        module, _, attribute = app["import_path"].partition(":")
        assert getattr(importlib.import_module(module), attribute).__name__ == "build_app"
        AppArgs.model_validate(app["args"])


def test_the_validators_bite():
    """The schemas and models used here refuse what they should, so their passing means something."""
    config = load(SERVE_CONFIG)
    config["applications"].append(copy.deepcopy(config["applications"][0]))
    with pytest.raises(ValidationError, match="multiple configs"):
        ServeDeploySchema.model_validate(config)
    args = load(GPU_SERVE_CONFIG)["applications"][0]["args"]
    with pytest.raises(ValidationError, match="replica_num_gpu"):
        AppArgs.model_validate({**args, "replica_num_gpu": 1})
    with pytest.raises(ValidationError, match="dtype"):
        AppArgs.model_validate({**args, "replica": {**args["replica"], "dtype": "bf16"}})
    launcher = load(LAUNCHER)
    launcher["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "1"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(launcher, json.loads(RAY_LAUNCHER_SCHEMA.read_text()))
    launcher = load(LAUNCHER)
    launcher["head_node_type"] = "gpu-head"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(launcher))


def test_the_rayservice_serves_serve_config_yamls_applications():
    served, reference = rayservice_serve_config(), load(SERVE_CONFIG)
    assert served["applications"] == reference["applications"], (
        "cluster/kuberay-rayservice.yaml's serveConfigV2 differs from serve_config.yaml: paste "
        "serve_config.yaml's `applications:` into serveConfigV2 again")
    assert served["proxy_location"] == reference["proxy_location"]
    # Not serve_config.yaml's 127.0.0.1: the pod's Service must reach the proxy. Unset means
    # Serve's default for a config file, 0.0.0.0 (ServeDeploySchema fills it in).
    assert served["http_options"] == {"port": reference["http_options"]["port"]}
    assert ServeDeploySchema.model_validate(served).http_options.host == "0.0.0.0"


def test_the_rayservice_has_a_head_group_and_a_gpu_worker_group_on_the_pinned_ray():
    manifest = load(RAYSERVICE)
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]
    assert head["template"]["spec"]["containers"][0]["image"]
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert ports["serve"] == rayservice_serve_config()["http_options"]["port"]
    gpu_groups = [group for group in cluster["workerGroupSpecs"]
                  if int(group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1]
    assert gpu_groups, "no worker group with an nvidia.com/gpu limit"
    for group in gpu_groups:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert "rayStartParams" in group


def test_the_gpu_config_is_serve_config_yaml_on_gpus():
    gpu, reference = load(GPU_SERVE_CONFIG), load(SERVE_CONFIG)
    assert set(gpu) == set(reference)
    [app], [reference_app] = gpu["applications"], reference["applications"]
    assert {k: v for k, v in app.items() if k != "args"} == {k: v for k, v in reference_app.items() if k != "args"}
    assert set(app["args"]) <= set(AppArgs.model_fields)
    settings = AppArgs.model_validate(app["args"])
    replica = settings.replica
    assert settings.replica_num_gpus >= 1
    assert (replica.device, replica.dtype, replica.compile) == ("cuda", "bfloat16", "on")
    reference_replica = AppArgs.model_validate(reference_app["args"]).replica
    assert replica.num_slots > reference_replica.num_slots
    assert replica.max_num_seqs > reference_replica.max_num_seqs
    assert replica.kv_cache_bytes > reference_replica.kv_cache_bytes
    assert not settings.demo_adapters, "a GPU cluster trains no demo adapters at deploy time"
    tenants = app["args"]["tenants"]
    assert not tenants.get("admin_keys") and not any(t.get("keys") for t in tenants.get("tenants", {}).values()), \
        "no plaintext (demo) keys in a cluster config: use key_sha256 or keys_env"
    assert settings.tenants.auth == "keys" and settings.tenants.keys_env
    assert gpu["http_options"]["host"] != "127.0.0.1", "the proxy must accept connections from other machines"


def test_the_launcher_passes_rays_schema_and_the_checks_ray_up_runs():
    launcher = load(LAUNCHER)
    jsonschema.validate(launcher, json.loads(RAY_LAUNCHER_SCHEMA.read_text()))
    # `ray up` merges the provider's defaults (prepare_config) and validates the result before it
    # calls AWS: head_node_type among the types, sum of min_workers <= max_workers.
    validate_config(prepare_config(copy.deepcopy(launcher)))


def test_the_launcher_has_a_cpu_head_and_gpu_workers_that_fit_the_gpu_config():
    launcher = load(LAUNCHER)
    assert launcher["provider"]["type"] == "aws"
    head = launcher["available_node_types"][launcher["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    workers = gpu_worker_types(launcher)
    assert workers, "no worker type with a GPU"
    args = AppArgs.model_validate(load(GPU_SERVE_CONFIG)["applications"][0]["args"])
    for worker in workers.values():
        assert worker["resources"]["GPU"] >= args.replica_num_gpus
        assert worker["resources"]["CPU"] >= args.replica_num_cpus
    gpus_at_most = sum(w["max_workers"] * w["resources"]["GPU"] for w in workers.values())
    assert args.num_replicas * args.replica_num_gpus <= gpus_at_most, "the cluster cannot start enough GPU nodes"
    docker = launcher["docker"]
    for image in (docker["image"], docker["head_image"]):
        assert f":{ray.__version__}-" in image, f"{image} is not the pinned Ray {ray.__version__}"
    assert any("torch==2.13.0" in command for command in launcher["setup_commands"])
    assert any("pip install" in command and "~/lora-serve" in command for command in launcher["setup_commands"])
    assert launcher["file_mounts"]["~/lora-serve"] == "."
