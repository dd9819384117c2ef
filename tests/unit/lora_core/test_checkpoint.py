"""Checkpoint validation: every refusal is a typed `InvalidAdapterError` with a `reason` and a
message that says what is wrong, a refused adapter changes nothing in the engine, and the
per-module `scaling` follows PEFT (alpha/r, rsLoRA, rank_pattern / alpha_pattern).

The bad checkpoints are real PEFT output where PEFT can produce them (DoRA, IA3, LoKr, lora_bias,
modules_to_save, pickle files, another base model's shapes), edited by hand where it cannot.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoKrConfig, LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from lora_core.base_models import tiny_llama_config
from lora_core.checkpoint import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    SlotGeometry,
    checkpoint_from_state_dict,
    read_checkpoint,
    validate_checkpoint,
)
from lora_core.errors import AdapterNotFoundError, InvalidAdapterError
from tests.support.adapters import edit_adapter_config, fresh_tiny_model
from tests.support.requests import request

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*lora_bias=True.*"),
    pytest.mark.filterwarnings("ignore:.*LoRA tensor\\(s\\) have invalid shape.*"),
    pytest.mark.filterwarnings("ignore:.*rank_pattern keys did not match.*"),
]

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
INPUT_IDS = torch.randint(3, 250, (3, 9), generator=torch.Generator().manual_seed(7))


# ---- building bad checkpoints --------------------------------------------------------------


def _weights_path(folder: Path) -> Path:
    return Path(folder) / ADAPTER_WEIGHTS_FILE


def _edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(_weights_path(folder))
    edit(tensors)
    save_file(tensors, _weights_path(folder), metadata={"format": "pt"})


def _save_peft(folder: Path, config, model=None, **save_options) -> Path:
    """Save a real PEFT adapter of any type on the tiny model (or `model`)."""
    peft_model = get_peft_model(model if model is not None else fresh_tiny_model(), config)
    peft_model.save_pretrained(folder, save_embedding_layers=False, **save_options)
    return Path(folder)


def _other_llama(**sizes) -> LlamaForCausalLM:
    """A Llama with other dimensions than the tiny base (same module names, other shapes)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**tiny_llama_config(**sizes)))


def _rank_too_large(make, tmp):
    return make("big", r=32, lora_alpha=32)


def _rank_pattern_too_large(make, tmp):
    return make("big_pattern", r=8, rank_pattern={"v_proj": 32})


def _qkvo(make, tmp):
    return make("qkvo", r=4)


def _mlp_targets(make, tmp):
    return make("mlp", target_modules=["gate_proj", "up_proj"])


def _one_unknown_target(make, tmp):
    return make("mixed_targets", target_modules=["q_proj", "down_proj"])


def _dora(make, tmp):
    folder = make("dora", r=4, use_dora=True)
    assert any("lora_magnitude_vector" in key for key in load_file(_weights_path(folder)))
    return folder


def _dora_weights_without_flag(make, tmp):
    folder = _dora(make, tmp)
    edit_adapter_config(folder, use_dora=False)
    return folder


def _ia3(make, tmp):
    return _save_peft(tmp / "ia3", IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]))


def _lokr(make, tmp):
    return _save_peft(tmp / "lokr", LoKrConfig(r=4, target_modules=["q_proj", "v_proj"]))


def _wider_llama(make, tmp):
    model = _other_llama(hidden_size=96, intermediate_size=192, num_attention_heads=6, num_key_value_heads=2)
    folder = _save_peft(tmp / "wide", LoraConfig(r=4, target_modules=QKVO, init_lora_weights=False), model=model)
    edit_adapter_config(folder, base_model_name_or_path="tiny-random-llama")  # only the shapes differ
    return folder


def _wider_local_copy(make, tmp):
    """Named by a local folder: the name is not refused, the shapes are."""
    folder = _wider_llama(make, tmp)
    edit_adapter_config(folder, base_model_name_or_path="/home/me/models/tiny-random-llama-copy")
    return folder


def _more_kv_heads(make, tmp):
    model = _other_llama(num_key_value_heads=4)  # k_proj / v_proj: 64 -> 64 instead of 64 -> 32
    folder = _save_peft(tmp / "kv", LoraConfig(r=4, target_modules=["k_proj"], init_lora_weights=False), model=model)
    edit_adapter_config(folder, base_model_name_or_path="tiny-random-llama")
    return folder


def _resized_tensor(part: str, shape):
    def build(make, tmp):
        folder = make(f"resized_{part}", r=4)
        key = f"base_model.model.model.layers.1.self_attn.v_proj.lora_{part}.weight"
        _edit_tensors(folder, lambda t: t.__setitem__(key, torch.randn(*shape)))
        return folder

    return build


def _poison(value: float, part: str):
    def build(make, tmp):
        folder = make(f"poison_{part}", r=4)
        key = f"base_model.model.model.layers.1.self_attn.q_proj.lora_{part}.weight"

        def edit(tensors):
            tensors[key][0, 1] = value

        _edit_tensors(folder, edit)
        return folder

    return build


def _pickle_only(make, tmp):
    folder = _save_peft(tmp / "pickled", LoraConfig(r=4, target_modules=["q_proj"]), safe_serialization=False)
    assert (folder / "adapter_model.bin").is_file() and not _weights_path(folder).exists()
    return folder


def _remove(name: str):
    def build(make, tmp):
        folder = make(f"without_{name}")
        (folder / name).unlink()
        return folder

    return build


def _empty_folder(make, tmp):
    folder = tmp / "empty"
    folder.mkdir()
    return folder


def _no_folder(make, tmp):
    return tmp / "does-not-exist"


def _weights_bytes(transform):
    def build(make, tmp):
        folder = make("corrupt")
        path = _weights_path(folder)
        path.write_bytes(transform(path.read_bytes()))
        return folder

    return build


def _no_tensors(make, tmp):
    folder = make("no_tensors")
    save_file({}, _weights_path(folder))
    return folder


def _a_without_b(make, tmp):
    folder = make("a_only")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    _edit_tensors(folder, lambda t: t.pop(key))
    return folder


def _integer_weights(make, tmp):
    folder = make("ints", r=4)
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"
    _edit_tensors(folder, lambda t: t.__setitem__(key, t[key].round().to(torch.int32)))
    return folder


def _config_text(text: bytes):
    def build(make, tmp):
        folder = make("bad_json")
        (folder / ADAPTER_CONFIG_FILE).write_bytes(text)
        return folder

    return build


def _config(**changes):
    def build(make, tmp):
        folder = make("edited")
        edit_adapter_config(folder, **changes)
        return folder

    return build


def _drop_config_field(folder: Path, field: str) -> None:
    path = Path(folder) / ADAPTER_CONFIG_FILE
    config = json.loads(path.read_text())
    del config[field]
    path.write_text(json.dumps(config))


def _config_without(field: str):
    def build(make, tmp):
        folder = make("missing_field")
        _drop_config_field(folder, field)
        return folder

    return build


def _lora_bias(make, tmp):
    folder = make("lora_bias", r=4, lora_bias=True)
    assert any(key.endswith("lora_B.bias") for key in load_file(_weights_path(folder)))
    return folder


def _modules_to_save(make, tmp):
    folder = make("mts", r=4, modules_to_save=["norm"])
    assert any("layernorm" in key for key in load_file(_weights_path(folder)))
    return folder


def _modules_to_save_weights_only(make, tmp):
    folder = _modules_to_save(make, tmp)
    edit_adapter_config(folder, modules_to_save=None)
    return folder


# id, builder, expected reason, a fragment the message must contain, engine settings
REFUSALS = [
    pytest.param(_rank_too_large, "rank_too_large", "max_rank 16", {}, id="rank-32-over-max-16"),
    pytest.param(_rank_pattern_too_large, "rank_too_large", "rank 32", {}, id="rank-pattern-over-max"),
    pytest.param(_rank_too_large, "rank_too_large", "max_rank 8", {"max_rank": 8}, id="rank-over-smaller-max"),
    pytest.param(_mlp_targets, "unknown_target_module", "gate_proj", {}, id="mlp-targets"),
    pytest.param(_one_unknown_target, "unknown_target_module", "down_proj", {}, id="one-unknown-target"),
    pytest.param(_qkvo, "unknown_target_module", "prepared target modules ['q_proj']", {"target_modules": ("q_proj",)}, id="engine-prepared-q-only"),
    pytest.param(_dora, "unsupported_feature", "use_dora", {}, id="dora"),
    pytest.param(_dora_weights_without_flag, "unsupported_feature", "lora_magnitude_vector", {}, id="dora-magnitudes-flag-removed"),
    pytest.param(_ia3, "unsupported_peft_type", "IA3", {}, id="ia3"),
    pytest.param(_lokr, "unsupported_peft_type", "LOKR", {}, id="lokr"),
    pytest.param(_config(peft_type="PREFIX_TUNING"), "unsupported_peft_type", "PREFIX_TUNING", {}, id="prefix-tuning-type"),
    pytest.param(_wider_llama, "shape_mismatch", "do not fit", {}, id="wider-llama"),
    pytest.param(_more_kv_heads, "shape_mismatch", "k_proj", {}, id="more-kv-heads"),
    pytest.param(_wider_local_copy, "shape_mismatch", "do not fit", {}, id="a-local-copy-whose-shapes-do-not-fit"),
    pytest.param(_resized_tensor("B", (64, 4)), "shape_mismatch", "v_proj", {}, id="lora-b-too-many-rows"),
    pytest.param(_resized_tensor("A", (4, 63)), "shape_mismatch", "v_proj", {}, id="lora-a-wrong-in-features"),
    pytest.param(_resized_tensor("B", (32, 2)), "shape_mismatch", "v_proj", {}, id="a-and-b-ranks-disagree"),
    pytest.param(_resized_tensor("A", (4, 8, 8)), "shape_mismatch", "matrices", {}, id="lora-a-3d"),
    pytest.param(_poison(float("nan"), "B"), "non_finite", "NaN", {}, id="nan-in-b"),
    pytest.param(_poison(float("inf"), "A"), "non_finite", "lora_A", {}, id="inf-in-a"),
    pytest.param(_poison(float("-inf"), "B"), "non_finite", "lora_B", {}, id="minus-inf-in-b"),
    pytest.param(_pickle_only, "pickle_file", "adapter_model.bin", {}, id="pickle-bin-only"),
    pytest.param(_remove(ADAPTER_CONFIG_FILE), "missing_file", ADAPTER_CONFIG_FILE, {}, id="no-config"),
    pytest.param(_remove(ADAPTER_WEIGHTS_FILE), "missing_file", ADAPTER_WEIGHTS_FILE, {}, id="no-weights"),
    pytest.param(_empty_folder, "missing_file", ADAPTER_WEIGHTS_FILE, {}, id="empty-folder"),
    pytest.param(_no_folder, "missing_file", "does-not-exist", {}, id="no-such-folder"),
    pytest.param(_weights_bytes(lambda data: data[: len(data) // 2]), "corrupt_file", "safetensors", {}, id="truncated"),
    pytest.param(_weights_bytes(lambda data: os.urandom(len(data))), "corrupt_file", "safetensors", {}, id="random-bytes"),
    pytest.param(_weights_bytes(lambda data: b""), "corrupt_file", "safetensors", {}, id="empty-weights-file"),
    pytest.param(_weights_bytes(lambda data: data[:100]), "corrupt_file", "safetensors", {}, id="header-only"),
    pytest.param(_no_tensors, "corrupt_file", "no LoRA weights", {}, id="no-tensors"),
    pytest.param(_a_without_b, "corrupt_file", "not both A and B", {}, id="lora-a-without-b"),
    pytest.param(_integer_weights, "corrupt_file", "int32", {}, id="integer-weights"),
    pytest.param(_config_text(b"{not json"), "invalid_config", "not valid JSON", {}, id="invalid-json"),
    pytest.param(_config_text(b"\xff\xfe\x00garbage"), "invalid_config", "not valid JSON", {}, id="not-utf8"),
    pytest.param(_config_text(b"[1, 2, 3]"), "invalid_config", "JSON object", {}, id="json-array"),
    pytest.param(_config(r=0), "invalid_config", "r\n  Input should be greater than or equal to 1", {}, id="r-zero"),
    pytest.param(_config(r=-4), "invalid_config", "r\n  Input should be greater than or equal to 1", {}, id="r-negative"),
    pytest.param(_config(r="eight"), "invalid_config", "r\n  Input should be a valid integer", {}, id="r-not-a-number"),
    pytest.param(_config(lora_alpha=0), "invalid_config", "lora_alpha\n  Input should be greater than 0", {}, id="alpha-zero"),
    pytest.param(_config(rank_pattern=["q_proj"]), "invalid_config", "rank_pattern\n  Input should be a valid dictionary", {}, id="rank-pattern-not-a-dict"),
    pytest.param(_config_without("r"), "invalid_config", "r\n  Field required", {}, id="r-missing"),
    pytest.param(_config(r=4), "invalid_config", "r=4", {}, id="config-rank-disagrees-with-weights"),
    pytest.param(_lora_bias, "unsupported_feature", "lora_bias", {}, id="lora-bias"),
    pytest.param(_modules_to_save, "unsupported_feature", "modules_to_save", {}, id="modules-to-save"),
    pytest.param(_modules_to_save_weights_only, "unsupported_feature", "norm.weight", {}, id="modules-to-save-weights-only"),
    pytest.param(_config(bias="all"), "unsupported_feature", "bias='all'", {}, id="bias-all"),
    pytest.param(_config(fan_in_fan_out=True), "unsupported_feature", "fan_in_fan_out", {}, id="fan-in-fan-out"),
    pytest.param(
        _config(base_model_name_or_path="meta-llama/Llama-3.1-8B"), "base_model_mismatch", "Llama-3.1-8B", {}, id="other-base-model"
    ),
    pytest.param(_rank_too_large, "too_large", "over the limit of 4096", {"max_adapter_bytes": 4096}, id="too-large"),
]


@pytest.fixture
def make(adapter_factory):
    """adapter_factory with all four attention projections targeted by default."""

    def build(name, **options):
        options.setdefault("target_modules", QKVO)
        return adapter_factory(name, **options)

    return build


@pytest.mark.parametrize("build, reason, fragment, settings", REFUSALS)
def test_refusal_is_typed_with_reason_and_message(build, reason, fragment, settings, make, tmp_path, engine_factory):
    folder = build(make, tmp_path)
    engine = engine_factory(**settings)
    geometry = engine.slot_model.geometry

    # The store's path: read, then validate against the engine's geometry.
    with pytest.raises(InvalidAdapterError) as info:
        validate_checkpoint(read_checkpoint(folder, max_size_bytes=engine.config.max_adapter_bytes), geometry)
    assert info.value.reason == reason, str(info.value)
    assert fragment in str(info.value)
    assert info.value.status_code == 422
    assert info.value.to_json()["error"]["reason"] == reason

    # The engine's path: the same refusal, and nothing is registered.
    with pytest.raises(InvalidAdapterError) as info:
        engine.register_adapter("acme/bad", folder)
    assert info.value.reason == reason, str(info.value)
    assert fragment in str(info.value)
    assert engine.residency.warm_versions().get("acme/bad") is None
    assert engine.residency.placement("acme/bad") is None
    with pytest.raises(AdapterNotFoundError):
        engine.submit(request("hi", "acme/bad"))


def test_too_large_is_checked_on_the_state_dict_path_too(adapter_factory):
    folder = adapter_factory("sized", r=4)
    checkpoint = checkpoint_from_state_dict(json.loads((folder / ADAPTER_CONFIG_FILE).read_text()), load_file(_weights_path(folder)))
    shapes = {f"model.layers.{i}.self_attn.{m}": (64, 64 if m in ("q_proj", "o_proj") else 32) for i in range(2) for m in QKVO}
    validate_checkpoint(checkpoint, SlotGeometry(max_rank=16, module_shapes=shapes))  # fits
    with pytest.raises(InvalidAdapterError) as info:
        validate_checkpoint(checkpoint, SlotGeometry(max_rank=16, module_shapes=shapes, max_size_bytes=checkpoint.size_bytes - 1))
    assert info.value.reason == "too_large"
    assert str(checkpoint.size_bytes) in str(info.value)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("tiny-random-llama", id="same"),
        pytest.param("SomeOrg/Tiny-Random-Llama", id="org-prefix-and-case"),
        pytest.param("/models/TINY-RANDOM-LLAMA/", id="local-path"),
        pytest.param("/home/me/checkpoints/my-base-copy", id="a-local-copy-of-another-name"),
        pytest.param("./runs/base", id="a-relative-local-copy"),
        pytest.param(None, id="null"),
        pytest.param("", id="empty"),
        pytest.param(..., id="absent"),
    ],
)
def test_matching_or_absent_base_model_name_is_accepted(name, adapter_factory, engine_factory):
    folder = adapter_factory("named")
    if name is ...:
        _drop_config_field(folder, "base_model_name_or_path")
    else:
        edit_adapter_config(folder, base_model_name_or_path=name)
    engine = engine_factory()
    version = engine.register_adapter("acme/named", folder)
    assert version == read_checkpoint(folder).version
    engine.warm("acme/named")
    assert engine.residency.warm_versions().get("acme/named") == version
    adapted, base = engine.forward_logits(INPUT_IDS[:2], ["acme/named", None]).unbind(0)
    assert (adapted - base).abs().max() > 1e-2


# ---- a refusal leaves everything as it was -------------------------------------------------


def _slot_buffers(engine) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{part}": getattr(layer, part).clone()
        for name, layer in engine.slot_model.layers.items()
        for part in ("lora_a", "lora_b")
    }


UNTOUCHED_CASES = [
    _rank_too_large,
    _mlp_targets,
    _dora,
    _ia3,
    _wider_llama,
    _poison(float("nan"), "B"),
    _pickle_only,
    _remove(ADAPTER_CONFIG_FILE),
    _weights_bytes(lambda data: data[: len(data) // 2]),
    _config(r=0),
    _config(r=4),
    _modules_to_save,
    _config(base_model_name_or_path="meta-llama/Llama-3.1-8B"),
]


def test_refused_update_leaves_slots_versions_and_logits_untouched(make, tmp_path, engine_factory):
    # host_cache_bytes=0 keeps one prepared adapter on the host at a time, so every forward below
    # reloads "acme/good" from the folder it was registered with: a refusal that re-pointed the
    # registration at the bad folder would show up as an error there.
    engine = engine_factory(num_slots=3, host_cache_bytes=0)
    good = make("good", seed=1)
    other = make("other", seed=2, r=16, lora_alpha=8)
    version = engine.register_adapter("acme/good", good)
    engine.register_adapter("acme/other", other)
    good_slot, other_slot = engine.warm("acme/good"), engine.warm("acme/other")
    adapters = ["acme/good", "acme/other", None]
    before = engine.forward_logits(INPUT_IDS, adapters)
    buffers = _slot_buffers(engine)
    warm = set(engine.residency.pool_snapshot().warm)
    assert (before[0] - before[2]).abs().max() > 1e-2  # the adapter does something
    reloads = engine.residency.host_cache.snapshot().misses

    for index, build in enumerate(UNTOUCHED_CASES):
        bad = build(make, tmp_path / f"case{index}")
        with pytest.raises(InvalidAdapterError):
            engine.register_adapter("acme/good", bad)
        assert engine.residency.warm_versions().get("acme/good") == version
        assert engine.residency.placement("acme/good").slot == good_slot
        assert engine.residency.placement("acme/other").slot == other_slot
        assert set(engine.residency.pool_snapshot().warm) == warm
        after = engine.forward_logits(INPUT_IDS, adapters)
        assert torch.equal(after, before), f"case {index} ({build.__name__}) changed the logits"
        for name, tensor in _slot_buffers(engine).items():
            assert torch.equal(tensor, buffers[name]), f"case {index} ({build.__name__}) changed {name}"
    assert engine.residency.host_cache.snapshot().misses >= reloads + len(UNTOUCHED_CASES)  # really reloaded from disk


# ---- scaling ---------------------------------------------------------------------------------


SCALING_CASES = [
    pytest.param({"r": 8, "lora_alpha": 16}, {"layers.0.self_attn.q_proj": 2.0, "layers.1.self_attn.o_proj": 2.0}, id="alpha-over-r"),
    pytest.param({"r": 4, "lora_alpha": 3}, {"layers.0.self_attn.k_proj": 0.75}, id="fractional"),
    pytest.param(
        {"r": 16, "lora_alpha": 8, "use_rslora": True}, {"layers.0.self_attn.v_proj": 2.0, "layers.1.self_attn.q_proj": 2.0}, id="rslora"
    ),
    pytest.param(
        {"r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 4, r"layers\.1\.self_attn\.v_proj": 16}},
        {
            "layers.0.self_attn.q_proj": 4.0,
            "layers.1.self_attn.q_proj": 4.0,
            "layers.0.self_attn.v_proj": 2.0,
            "layers.1.self_attn.v_proj": 1.0,
            "layers.1.self_attn.k_proj": 2.0,
        },
        id="rank-pattern",
    ),
    pytest.param(
        {"r": 4, "lora_alpha": 8, "alpha_pattern": {"v_proj": 32, r"model\.layers\.0\.self_attn\.q_proj": 1}},
        {
            "layers.0.self_attn.q_proj": 0.25,
            "layers.1.self_attn.q_proj": 2.0,
            "layers.0.self_attn.v_proj": 8.0,
            "layers.1.self_attn.v_proj": 8.0,
        },
        id="alpha-pattern",
    ),
    pytest.param(
        # regex alternation and a pattern that must match a whole dotted suffix: "_proj" matches nothing
        {"r": 8, "lora_alpha": 8, "rank_pattern": {"(q|k)_proj": 2, "_proj": 1}, "alpha_pattern": {"1.self_attn.o_proj": 4}},
        {
            "layers.0.self_attn.q_proj": 4.0,
            "layers.1.self_attn.k_proj": 4.0,
            "layers.0.self_attn.v_proj": 1.0,
            "layers.0.self_attn.o_proj": 1.0,
            "layers.1.self_attn.o_proj": 0.5,
        },
        id="regex-suffix-semantics",
    ),
    pytest.param(
        {"r": 16, "lora_alpha": 4, "use_rslora": True, "rank_pattern": {"k_proj": 4}, "alpha_pattern": {"o_proj": 12}},
        {
            "layers.0.self_attn.k_proj": 2.0,
            "layers.0.self_attn.q_proj": 1.0,
            "layers.1.self_attn.o_proj": 3.0,
        },
        id="rslora-with-patterns",
    ),
]


@pytest.mark.parametrize("options, expected", SCALING_CASES)
def test_scaling_per_module_matches_peft(options, expected, adapter_factory):
    folder = adapter_factory("scaled", target_modules=QKVO, **options)
    checkpoint = read_checkpoint(folder)
    peft_model = PeftModel.from_pretrained(fresh_tiny_model(), folder)
    peft_layers = {
        name.removeprefix("base_model.model."): module
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    }
    assert set(checkpoint.modules) == set(peft_layers) and len(peft_layers) == 8
    for name, weights in checkpoint.modules.items():
        assert weights.rank == peft_layers[name].r["default"], name
        assert weights.scaling == pytest.approx(peft_layers[name].scaling["default"], rel=1e-12), name
    for suffix, scaling in expected.items():
        assert checkpoint.modules[f"model.{suffix}"].scaling == pytest.approx(scaling, rel=1e-12), suffix


def test_scaling_formula_without_peft():
    """The same rules on a hand-written config, no PEFT model involved."""
    tensors = {}
    for layer in range(2):
        for module, rank in (("q_proj", 2), ("v_proj", 9)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.ones(rank, 64)
            tensors[f"{prefix}.lora_B.weight"] = torch.ones(32 if module == "v_proj" else 64, rank)
    config = {"peft_type": "LORA", "r": 9, "lora_alpha": 6, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {r"layers\.1\.self_attn\.v_proj": 27}}
    modules = checkpoint_from_state_dict(config, tensors).modules
    assert modules["model.layers.0.self_attn.q_proj"].scaling == pytest.approx(3.0)
    assert modules["model.layers.0.self_attn.v_proj"].scaling == pytest.approx(6 / 9)
    assert modules["model.layers.1.self_attn.v_proj"].scaling == pytest.approx(3.0)
    rs = checkpoint_from_state_dict({**config, "use_rslora": True}, tensors).modules
    assert rs["model.layers.1.self_attn.q_proj"].scaling == pytest.approx(6 / math.sqrt(2))
    assert rs["model.layers.1.self_attn.v_proj"].scaling == pytest.approx(27 / 3)


# ---- regressions: bugs these tests found and that were fixed (float8 weights, layer_replication, aLoRA) ----


def test_float8_weights_get_a_typed_answer(adapter_factory, engine_factory):
    folder = adapter_factory("fp8", r=4)
    _edit_tensors(folder, lambda t: t.update({k: v.to(torch.float8_e4m3fn) for k, v in t.items()}))
    engine = engine_factory()
    try:
        engine.register_adapter("acme/fp8", folder)
    except InvalidAdapterError as error:
        assert error.reason in ("corrupt_file", "unsupported_feature")


def _refused_or_served_like_peft(engine, folder, field: str, input_ids: torch.Tensor = INPUT_IDS) -> None:
    try:
        engine.register_adapter("acme/variant", folder)
    except InvalidAdapterError as error:
        assert error.reason == "unsupported_feature" and field in str(error)
        return
    expected = PeftModel.from_pretrained(fresh_tiny_model(), folder)(input_ids=input_ids).logits
    actual = engine.forward_logits(input_ids, ["acme/variant"] * len(input_ids))
    assert (actual - expected).abs().max() <= 1e-4, f"{field} was accepted but served unlike PEFT"


def test_layer_replication_is_refused_or_served_like_peft(adapter_factory, engine_factory):
    folder = adapter_factory("replicated", layer_replication=[[1, 2], [0, 1]])
    with torch.no_grad():
        _refused_or_served_like_peft(engine_factory(), folder, "layer_replication")


def test_alora_is_refused_or_served_like_peft(adapter_factory, engine_factory):
    folder = adapter_factory("alora", alora_invocation_tokens=[100, 101], task_type="CAUSAL_LM")
    input_ids = INPUT_IDS.clone()
    input_ids[:, 3:5] = torch.tensor([100, 101])  # the invocation sequence, mid-prompt in every row
    with torch.no_grad():
        _refused_or_served_like_peft(engine_factory(), folder, "alora_invocation_tokens", input_ids)
