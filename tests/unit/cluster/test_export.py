"""The export job on the tiny model, without Ray: a merged folder that reloads with the adapter's
logits (sharded or not), recipes merged from fetched inputs, the store's payload path, S3 keys,
and loud failures: a corrupted save, a folder that is no servable adapter, bad arguments."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from cluster.jobs import export
from cluster.jobs.export import LOGIT_ATOL, ExportCheckError, load_settings, main, write_payload_folder
from lora_core.checkpoint import read_checkpoint
from lora_core.paths import REPO_ROOT
from lora_core.payload import payload_from_checkpoint
from tests.support.adapters import fresh_tiny_model, make_peft_adapter

REPLICA = {"base_model": "tiny-random-llama", "compile": "off", "num_slots": 2, "max_rank": 16,
           "max_num_seqs": 2, "max_seq_len": 128}
PROBE_IDS = torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {"acme/a": make_peft_adapter(root / "a", seed=1), "shared/b": make_peft_adapter(root / "b", seed=2)}


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "serve_config.yaml"
    replica = {**REPLICA, "store": {"sync_interval_s": 1}}
    path.write_text(yaml.safe_dump({"applications": [{"name": "t", "args": {"replica": replica}}]}))
    return path


def summary(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@torch.no_grad()
def logits_of(model) -> torch.Tensor:
    model.eval()
    return model(input_ids=PROBE_IDS).logits.float()


def peft_logits(folder: Path) -> torch.Tensor:
    return logits_of(PeftModel.from_pretrained(fresh_tiny_model(), str(folder)))


def exported_logits(folder: Path) -> torch.Tensor:
    return logits_of(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_an_adapter_folder_exports_as_sharded_transformers_weights_with_its_logits(adapters, config, tmp_path, capsys):
    out = tmp_path / "merged"
    argv = ["--adapter-folder", str(adapters["acme/a"]), "--out", str(out), "--config", str(config),
            "--max-shard-size", "100KB"]
    assert main(argv) == 0
    result = summary(capsys)
    files = sorted(p.name for p in out.iterdir())
    assert result["out"] == str(out) and result["files"] == files
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "model.safetensors.index.json"} <= set(files)
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and not [f for f in files if f.endswith((".bin", ".pt"))]
    assert all((out / f).stat().st_mode & 0o777 == 0o644 for f in files)
    assert 0 <= result["max_abs_logit_diff"] <= LOGIT_ATOL and result["seconds"] > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a partial folder was left behind"

    exported = exported_logits(out)
    assert max_diff(exported, peft_logits(adapters["acme/a"])) <= LOGIT_ATOL
    assert max_diff(exported, logits_of(fresh_tiny_model())) > 1e-2, "the adapter changed nothing"


def test_a_recipe_merges_fetched_inputs_as_peft_would_then_exports(adapters, config, tmp_path, capsys):
    recipe = tmp_path / "mix.json"
    recipe.write_text(json.dumps({"name": "acme/mix", "combination_type": "cat",
                                  "adapters": [{"id": "acme/a", "weight": 0.5}, {"id": "shared/b", "weight": 0.5}]}))
    fetched = []

    def fetch(adapter_id: str) -> Path:
        fetched.append(adapter_id)
        return adapters[adapter_id]

    out = tmp_path / "mix"
    assert main(["--recipe", str(recipe), "--out", str(out), "--config", str(config)], fetch=fetch) == 0
    assert fetched == ["acme/a", "shared/b"] and summary(capsys)["adapter"] == "acme/mix"

    peft_model = PeftModel.from_pretrained(fresh_tiny_model(), str(adapters["acme/a"]), adapter_name="a")
    peft_model.load_adapter(str(adapters["shared/b"]), adapter_name="b")
    peft_model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "mix", combination_type="cat")
    peft_model.set_adapter("mix")
    assert max_diff(exported_logits(out), logits_of(peft_model)) <= LOGIT_ATOL


def test_a_store_payload_becomes_a_peft_folder_that_exports(adapters, config, tmp_path, capsys):
    """What `store_fetcher` does with the payload `locate` hands back, minus Ray."""
    source = adapters["acme/a"]
    config_dict = json.loads((source / "adapter_config.json").read_text())
    original = read_checkpoint(source)
    payload = payload_from_checkpoint("acme/a", "v1", config_dict, original)
    folder = write_payload_folder(payload, tmp_path / "fetched" / "acme" / "a")
    again = read_checkpoint(folder)
    assert sorted(again.modules) == sorted(original.modules)
    for name, weights in original.modules.items():
        assert torch.equal(again.modules[name].lora_a, weights.lora_a)
        assert torch.equal(again.modules[name].lora_b, weights.lora_b)

    out = tmp_path / "merged"
    assert main(["--adapter", "acme/a", "--out", str(out), "--config", str(config)], fetch={"acme/a": folder}.get) == 0
    assert summary(capsys)["adapter"] == "acme/a"
    assert max_diff(exported_logits(out), peft_logits(source)) <= LOGIT_ATOL


class FakeS3:
    """boto3's `upload_file`, recorded."""

    def __init__(self) -> None:
        self.endpoints: list[str | None] = []
        self.uploads: dict[tuple[str, str], bytes] = {}

    def factory(self, endpoint_url: str | None) -> "FakeS3":
        self.endpoints.append(endpoint_url)
        return self

    def upload_file(self, Filename: str, Bucket: str, Key: str, Callback=None) -> None:
        data = Path(Filename).read_bytes()
        self.uploads[(Bucket, Key)] = data
        if Callback is not None:
            Callback(len(data))


def test_an_s3_out_uploads_every_checked_file_under_the_prefix(adapters, config, capsys):
    s3 = FakeS3()
    argv = ["--adapter-folder", str(adapters["acme/a"]), "--out", "s3://models-bucket/exports/pirate",
            "--config", str(config), "--s3-endpoint-url", "http://127.0.0.1:9"]
    assert main(argv, s3_client_factory=s3.factory) == 0
    result = summary(capsys)
    assert s3.endpoints == ["http://127.0.0.1:9"]
    assert sorted(s3.uploads) == [("models-bucket", f"exports/pirate/{name}") for name in result["files"]]
    assert "model.safetensors" in result["files"] and result["out"] == "s3://models-bucket/exports/pirate"


def _corrupting_save(original):
    def save(model, tokenizer, out_dir: Path, max_shard_size: str) -> None:
        original(model, tokenizer, out_dir, max_shard_size)
        path = sorted(out_dir.glob("*.safetensors"))[0]
        tensors = load_file(path)
        key = next(k for k in sorted(tensors) if "q_proj" in k)
        tensors[key] = tensors[key] + 0.05 * torch.randn_like(tensors[key])
        save_file(tensors, path, metadata={"format": "pt"})

    return save


@pytest.mark.parametrize("to", ["local", "s3"])
def test_a_corrupted_save_fails_the_check_loudly_and_publishes_nothing(to, adapters, config, tmp_path, monkeypatch,
                                                                       capsys):
    monkeypatch.setattr(export, "save_merged", _corrupting_save(export.save_merged))
    previous = tmp_path / "merged"
    previous.mkdir()
    (previous / "config.json").write_text("{}")  # an earlier export, which a failed one must leave alone
    s3 = FakeS3()
    out = str(previous) if to == "local" else "s3://models-bucket/exports/pirate"
    argv = ["--adapter-folder", str(adapters["acme/a"]), "--out", out, "--config", str(config)]
    assert main(argv, s3_client_factory=s3.factory) == 3
    captured = capsys.readouterr()
    assert "max_abs_logit_diff" not in captured.out and not captured.out.strip()
    assert "EXPORT CHECK FAILED" in captured.err and "differ from the served adapter's by up to" in captured.err
    assert sorted(p.name for p in previous.iterdir()) == ["config.json"], "the earlier export was touched"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert s3.uploads == {}


def test_the_check_error_is_typed_names_the_difference_and_pickles(adapters, config, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "save_merged", _corrupting_save(export.save_merged))
    options = export.ExportOptions(out=str(tmp_path / "merged"), adapter_folder=adapters["acme/a"], config=config)
    with pytest.raises(ExportCheckError) as caught:
        export.run(options)
    error = caught.value
    assert error.max_abs_logit_diff > LOGIT_ATOL and f"{error.max_abs_logit_diff:.3g}" in str(error)
    again = pickle.loads(pickle.dumps(error))
    assert (str(again), again.max_abs_logit_diff) == (str(error), error.max_abs_logit_diff)


def _not_peft(folder: Path) -> Path:
    folder.mkdir()
    (folder / "README.md").write_text("not an adapter")
    return folder


def _pickled(folder: Path) -> Path:
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04N.")
    return folder


REFUSED = {  # case -> (make the folder, what the error must say)
    "not-a-peft-folder": (_not_peft, "has no adapter_model.safetensors"),
    "missing": (lambda folder: folder, "has no adapter_model.safetensors"),
    "pickle-weights": (_pickled, "a pickle file"),
    "rank-over-max-rank": (lambda folder: make_peft_adapter(folder, seed=3, r=32), "larger than the server's max_rank"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_is_not_a_servable_adapter_is_refused_before_any_work(case, config, tmp_path, monkeypatch, capsys):
    make, says = REFUSED[case]
    folder = make(tmp_path / "input")
    monkeypatch.setattr(export, "export_folder", lambda *a, **k: pytest.fail("the base model was loaded"))
    out = tmp_path / "merged"
    assert main(["--adapter-folder", str(folder), "--out", str(out), "--config", str(config)]) == 1
    captured = capsys.readouterr()
    assert "InvalidAdapterError" in captured.err and says in captured.err and not captured.out.strip()
    assert not out.exists()


def test_an_out_folder_of_other_things_is_never_replaced(adapters, config, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    argv = ["--adapter-folder", str(adapters["acme/a"]), "--out", str(tmp_path), "--config", str(config)]
    assert main(argv) == 1
    assert "is not an earlier export" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("recipe", ["{not json", '{"name": "acme/x", "adapters": []}', None])
def test_a_bad_recipe_is_refused_before_the_store_is_asked(recipe, config, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export, "store_fetcher", lambda *a: lambda adapter_id: pytest.fail("the store was asked"))
    path = tmp_path / "recipe.json"
    if recipe is not None:
        path.write_text(recipe)
    assert main(["--recipe", str(path), "--out", str(tmp_path / "merged"), "--config", str(config)]) == 1
    assert "export failed" in capsys.readouterr().err


@pytest.mark.parametrize("sources", [[], ["--adapter", "acme/a", "--adapter-folder", "x"],
                                     ["--recipe", "r.json", "--adapter", "acme/a"]])
def test_exactly_one_source_is_required(sources, capsys):
    with pytest.raises(SystemExit) as caught:
        main([*sources, "--out", "/tmp/never"])
    assert caught.value.code == 2


def test_settings_are_read_as_the_replicas_read_them():
    """The repo's serve_config.yaml gives what `ReplicaSettings` gives."""
    from deployments.deploy_config import ReplicaSettings

    path = REPO_ROOT / "serve_config.yaml"
    replica = ReplicaSettings.model_validate(yaml.safe_load(path.read_text())["applications"][0]["args"]["replica"])
    engine_config, store_config = load_settings(path)
    assert engine_config == replica.engine_config() and store_config == replica.store


def test_the_job_imports_ray_only_to_talk_to_the_store():
    code = ("import sys, pathlib, cluster.jobs.export as e; from lora_core.settings import StoreConfig; "
            "e.store_fetcher(StoreConfig(), pathlib.Path('.')); print('ray' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
