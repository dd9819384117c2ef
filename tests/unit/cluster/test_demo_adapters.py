"""The demo-adapter trainer on the tiny model: layout, server validation, caching, retraining."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from adapters_store.sources.local import LocalSource
from cluster.demo_adapters import DEMO_STYLES, RECIPE_FILE, TrainingRecipe, ensure_demo_adapters, main
from lora_core.checkpoint import read_checkpoint, validate_checkpoint

TINY = "tiny-random-llama"
STEPS = 6
IDS = [style.adapter_id for style in DEMO_STYLES]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """All demo adapters, trained once for the module on the tiny model."""
    return ensure_demo_adapters(tmp_path_factory.mktemp("demo"), TINY, steps=STEPS)


def _fingerprint(folder: Path) -> tuple[int, int, bytes]:
    weights = folder / "adapter_model.safetensors"
    stat = weights.stat()
    return stat.st_ino, stat.st_mtime_ns, weights.read_bytes()


@pytest.fixture
def copy_of(trained, tmp_path):
    """A private copy of the trained tree, for tests that retrain or break it."""
    root = next(iter(trained.values())).parents[1]
    out = tmp_path / "demo"
    shutil.copytree(root, out)
    return out


def _no_training(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the base model was loaded: something was retrained")

    monkeypatch.setattr("deployments.engine.base_model.load_base_model", refuse)


def test_layout_tenants_and_ids(trained):
    assert sorted(trained) == sorted(IDS)
    assert {adapter_id.split("/")[0] for adapter_id in trained} == {"acme", "globex", "shared"}
    for adapter_id, folder in trained.items():
        assert folder.parts[-2:] == tuple(adapter_id.split("/"))
        visible = {p.name for p in folder.iterdir()}
        assert visible == {"adapter_config.json", "adapter_model.safetensors", RECIPE_FILE}
        assert folder.stat().st_mode & 0o777 == 0o755, "a server running as another user must read it"
        assert (folder / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o644
        assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "a temp folder was left behind"
    root = next(iter(trained.values())).parents[1]
    assert sorted(LocalSource(root).list_adapters()) == sorted(IDS)


def test_checkpoints_pass_the_servers_validation(trained):
    from lora_core.geometry import slot_geometry
    from lora_core.settings import EngineConfig

    geometry = slot_geometry(EngineConfig(base_model=TINY, compile="off", max_rank=16))
    for folder in trained.values():
        checkpoint = read_checkpoint(folder)
        validate_checkpoint(checkpoint, geometry)
        assert checkpoint.max_rank == 8
        assert checkpoint.config.base_model_name_or_path == TINY
        assert {name.rsplit(".", 1)[-1] for name in checkpoint.modules} == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_adapter_changes_the_models_logits(trained):
    from peft import PeftModel

    from deployments.engine.base_model import BaseModelSpec, load_base_model

    base = load_base_model(BaseModelSpec(name=TINY))
    prompt = base.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                add_generation_prompt=True, tokenize=True, return_dict=False)
    input_ids = torch.tensor([list(prompt)])
    with torch.no_grad():
        base_logits = base.model(input_ids).logits
        model = PeftModel.from_pretrained(base.model, trained["acme/pirate"])
        adapter_logits = model(input_ids).logits
    assert (adapter_logits - base_logits).abs().max().item() > 1e-2


def test_second_call_is_a_cache_hit(trained, monkeypatch):
    before = {adapter_id: _fingerprint(folder) for adapter_id, folder in trained.items()}
    _no_training(monkeypatch)
    again = ensure_demo_adapters(next(iter(trained.values())).parents[1], TINY, steps=STEPS)
    assert again == trained
    assert {adapter_id: _fingerprint(folder) for adapter_id, folder in again.items()} == before


def test_force_retrains_to_the_same_weights(copy_of):
    style = DEMO_STYLES[0]
    folder = copy_of / style.adapter_id
    inode, _, weights = _fingerprint(folder)
    ensure_demo_adapters(copy_of, TINY, steps=STEPS, force=True, styles=[style])
    new_inode, _, new_weights = _fingerprint(folder)
    assert new_inode != inode, "the folder was not replaced"
    assert new_weights == weights, "training is seeded, so a retrain gives the same adapter"


def test_a_changed_recipe_retrains_only_what_changed(copy_of, monkeypatch):
    pirate, *others = DEMO_STYLES
    untouched = {s.adapter_id: _fingerprint(copy_of / s.adapter_id) for s in others}
    old = _fingerprint(copy_of / pirate.adapter_id)
    ensure_demo_adapters(copy_of, TINY, steps=STEPS + 1, styles=[pirate])
    assert _fingerprint(copy_of / pirate.adapter_id)[2] != old[2]
    recipe = json.loads((copy_of / pirate.adapter_id / RECIPE_FILE).read_text())
    assert recipe["recipe_sha256"] == TrainingRecipe(base_model=TINY, steps=STEPS + 1).sha256(pirate)
    _no_training(monkeypatch)
    ensure_demo_adapters(copy_of, TINY, steps=STEPS, styles=others)
    assert {s.adapter_id: _fingerprint(copy_of / s.adapter_id) for s in others} == untouched


def test_a_broken_cache_entry_is_retrained(copy_of):
    folder = copy_of / DEMO_STYLES[1].adapter_id
    (folder / "adapter_model.safetensors").unlink()
    (copy_of / DEMO_STYLES[2].adapter_id / RECIPE_FILE).write_text("{not json")
    ensure_demo_adapters(copy_of, TINY, steps=STEPS, styles=DEMO_STYLES[1:])
    for style in DEMO_STYLES[1:]:
        read_checkpoint(copy_of / style.adapter_id)


def test_command_line_prints_base_and_adapter_answers(copy_of, capsys):
    assert main(["--out", str(copy_of), "--base-model", TINY, "--steps", str(STEPS)]) == 0
    printed = capsys.readouterr().out
    for name in (TINY, *IDS):
        assert f"== {name}" in printed


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="steps"):
        TrainingRecipe(base_model=TINY, steps=0)
    with pytest.raises(SystemExit):
        main(["--steps", "0"])

