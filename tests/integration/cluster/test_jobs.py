"""The jobs in `cluster/jobs/` as operators run them: `ray job submit` (through
`JobSubmissionClient`, what the CLI uses) against a local cluster with an adapter store.
  export      reads the serving version through Ray's object store, merges, saves and checks;
              fails loudly on an unknown adapter
  push        validates a folder of adapters, writes the good ones to a store root (local, or
              moto's S3 over HTTP) and has the store sync it: they serve; bad ones are refused
  train_demo  trains the demo adapters (on the tiny model here) and pushes them the same way"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from peft import PeftModel

from benchmarks.moto_s3 import moto_s3_server
from tests.support.adapters import fresh_tiny_model, make_peft_adapter
from tests.support.ray_cluster import local_ray
from tests.support.ray_jobs import free_port
from tests.support.ray_jobs import run_job as run_ray_job

pytestmark = pytest.mark.integration

REPLICA = {"base_model": "tiny-random-llama", "compile": "off", "num_slots": 2, "max_rank": 16,
           "max_num_seqs": 2, "max_seq_len": 128}
PROBE_IDS = torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local cluster with its dashboard, an adapter store on a folder of two adapters, and the
    serve config the job reads (the same `args.replica` the replicas read)."""
    import ray

    from adapters_store.store import get_or_create_store
    from lora_core.settings import EngineConfig, StoreConfig

    root = tmp_path_factory.mktemp("export-job")
    source = root / "source"
    make_peft_adapter(source / "acme" / "pirate", seed=1)
    make_peft_adapter(source / "shared" / "json", seed=2)
    # Only the jobs' own syncs register adapters: a timed poll would race push's sync for its report.
    store = {"name": "export-job-store", "root": str(root / "store"), "sources": [{"uri": str(source)}],
             "sync_interval_s": 3600}
    config = root / "serve_config.yaml"
    config.write_text(yaml.safe_dump({"applications": [{"name": "t", "args": {"replica": {**REPLICA, "store": store}}}]}))
    port = free_port()
    with moto_s3_server() as s3, local_ray(http_port=None, dashboard_port=port):  # S3 first: Ray's workers inherit its credentials
        actor = get_or_create_store(StoreConfig.model_validate(store), EngineConfig(**REPLICA))
        ray.get(actor.sync_now.remote())
        yield {"address": f"http://127.0.0.1:{port}", "config": config, "source": source, "root": root, "store": actor,
               "s3": s3}


def run_job(cluster, *arguments: str, job: str = "export") -> tuple[str, str]:
    """`python -m cluster.jobs.<job> --config <the cluster's serve config> ...`; (status, logs)."""
    return run_ray_job(cluster["address"], f"cluster.jobs.{job}", "--config", str(cluster["config"]), *arguments)


@torch.no_grad()
def logits_of(model) -> torch.Tensor:
    model.eval()
    return model(input_ids=PROBE_IDS).logits.float()


def test_an_exported_adapter_reloads_with_the_served_adapters_logits(cluster):
    from transformers import AutoModelForCausalLM

    out = cluster["root"] / "pirate-merged"
    status, logs = run_job(cluster, "--adapter", "acme/pirate", "--out", str(out), "--max-shard-size", "200KB")
    assert status == "SUCCEEDED", logs
    summary = json.loads(logs.strip().splitlines()[-1])
    assert summary["adapter"] == "acme/pirate" and summary["max_abs_logit_diff"] <= 1e-4
    assert "export:" in logs  # the progress bar, in the job's logs
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json"} <= files
    assert len([f for f in files if f.endswith(".safetensors")]) > 1  # sharded
    exported = logits_of(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32))
    served = logits_of(PeftModel.from_pretrained(fresh_tiny_model(), str(cluster["source"] / "acme" / "pirate")))
    torch.testing.assert_close(exported, served, atol=1e-4, rtol=0)


def test_a_recipe_is_merged_from_the_stores_versions_and_exported(cluster):
    recipe = cluster["root"] / "blend.json"
    recipe.write_text(json.dumps({"name": "acme/blend", "combination_type": "cat",
                                  "adapters": [{"id": "acme/pirate", "weight": 0.5}, {"id": "shared/json", "weight": 0.5}]}))
    out = cluster["root"] / "blend-merged"
    status, logs = run_job(cluster, "--recipe", str(recipe), "--out", str(out))
    assert status == "SUCCEEDED", logs
    assert json.loads(logs.strip().splitlines()[-1])["adapter"] == "acme/blend"
    assert (out / "config.json").is_file()


def test_an_unknown_adapter_fails_the_job_loudly(cluster):
    status, logs = run_job(cluster, "--adapter", "acme/nobody", "--out", str(cluster["root"] / "nobody"))
    assert status == "FAILED"
    assert "acme/nobody" in logs and "not" in logs
    assert not (cluster["root"] / "nobody").exists()


def served_ids(cluster) -> set[str]:
    import ray

    return {r["adapter_id"] for r in ray.get(cluster["store"].list_adapters.remote()) if r["serving"] is not None}


def test_push_validates_writes_to_a_watched_root_and_the_store_serves_them(cluster):
    outside = cluster["root"] / "to-push"
    make_peft_adapter(outside / "acme" / "pushed", seed=5)
    make_peft_adapter(outside / "acme" / "too-big", seed=6, r=32)  # over max_rank 16: refused, not pushed
    status, logs = run_job(cluster, "--from", str(outside), "--to", str(cluster["source"]), job="push")
    assert status == "FAILED", logs  # exit 1: something was refused
    summary = json.loads(logs.strip().splitlines()[-1])
    assert set(summary["pushed"]) == {"acme/pushed"} and "rank" in summary["refused"]["acme/too-big"]
    assert summary["sync"]["registered"] == ["acme/pushed"]
    assert not (cluster["source"] / "acme" / "too-big").exists()
    assert "acme/pushed" in served_ids(cluster)


def test_push_to_s3_adds_the_root_as_a_source(cluster):
    import uuid

    outside = cluster["root"] / "to-s3"
    make_peft_adapter(outside / "globex" / "on-s3", seed=7)
    s3 = cluster["s3"]
    bucket = f"push-{uuid.uuid4().hex[:8]}"
    s3.client.create_bucket(Bucket=bucket)
    status, logs = run_job(cluster, "--from", str(outside), "--to", f"s3://{bucket}/adapters",
                           "--endpoint-url", s3.endpoint, job="push")
    assert status == "SUCCEEDED", logs
    keys = {o["Key"] for o in s3.client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert keys == {f"adapters/globex/on-s3/{name}" for name in ("adapter_config.json", "adapter_model.safetensors")}
    assert json.loads(logs.strip().splitlines()[-1])["sync"]["registered"] == ["globex/on-s3"]
    assert "globex/on-s3" in served_ids(cluster)


def test_train_demo_trains_and_pushes_the_demo_adapters(cluster):
    target = cluster["root"] / "demo-root"
    status, logs = run_job(cluster, "--base-model", "tiny-random-llama", "--steps", "1", "--to", str(target),
                           job="train_demo")
    assert status == "SUCCEEDED", logs
    assert "step 1/1" in logs  # training progress, in the job's logs
    summary = json.loads(logs.strip().splitlines()[-1])
    assert set(summary["pushed"]) == {"acme/pirate", "globex/support", "shared/json"}
    assert {"acme/pirate", "globex/support", "shared/json"} <= served_ids(cluster) | set(summary["sync"]["registered"])
