"""Named merges on a weightless skeleton equal PEFT's `add_weighted_adapter` on the real model
(tiny Llama, fp32), type by type; bad specs are refused before anything is computed."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from adapters_store.merge_spec import MergeSpec, merged_rank
from adapters_store.merging import merge_adapters
from lora_core.checkpoint import read_checkpoint, validate_checkpoint
from lora_core.errors import InvalidRequestError
from lora_core.geometry import slot_geometry
from lora_core.settings import EngineConfig
from tests.support.adapters import fresh_tiny_model, make_peft_adapter

GEOMETRY = slot_geometry(EngineConfig(base_model="tiny-random-llama", max_rank=16))
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Three tiny adapters: two of rank 4 on different modules, one of rank 8."""
    root = tmp_path_factory.mktemp("merge-inputs")
    return {
        "acme/a": make_peft_adapter(root / "a", seed=1, r=4),
        "acme/b": make_peft_adapter(root / "b", seed=2, r=4, target_modules=ALL_MODULES, lora_alpha=4),
        "shared/c": make_peft_adapter(root / "c", seed=3, r=8, target_modules=ALL_MODULES),
        "acme/causal": make_peft_adapter(root / "causal", seed=4, r=4, task_type="CAUSAL_LM"),  # as PEFT's trainers save
    }


def spec(*ids_and_weights, **options) -> MergeSpec:
    adapters = [{"id": adapter_id, "weight": weight} for adapter_id, weight in ids_and_weights]
    return MergeSpec(name="acme/blend", adapters=adapters, **options)


def peft_reference(merge: MergeSpec, inputs, tmp_path) -> dict[str, torch.Tensor]:
    """The same merge the way PEFT's docs do it: on the real base model."""
    from peft import PeftModel

    names = [f"input_{index}" for index in range(len(merge.adapters))]
    folders = [inputs[i.id] for i in merge.adapters]
    model = PeftModel.from_pretrained(fresh_tiny_model(), str(folders[0]), adapter_name=names[0])
    for name, folder in zip(names[1:], folders[1:]):
        model.load_adapter(str(folder), adapter_name=name)
    options = {key: value for key, value in (("density", merge.density), ("svd_rank", merge.svd_rank)) if value}
    if merge.combination_type in ("ties", "dare_ties"):
        options["majority_sign_method"] = merge.majority_sign_method
    with torch.random.fork_rng():
        torch.manual_seed(merge.seed)
        model.add_weighted_adapter(names, [i.weight for i in merge.adapters], "merged",
                                   combination_type=merge.combination_type, **options)
    model.save_pretrained(str(tmp_path / "reference"), selected_adapters=["merged"], save_embedding_layers=False)
    return load_file(tmp_path / "reference" / "merged" / "adapter_model.safetensors")


def run_merge(merge: MergeSpec, inputs, tmp_path):
    folders = [inputs[i.id] for i in merge.adapters]
    ranks = [read_checkpoint(folder).max_rank for folder in folders]
    return merge_adapters(merge, folders, ranks, GEOMETRY, tmp_path / "out")


CASES = [
    pytest.param(spec(("acme/a", 0.5), ("acme/b", 0.5), combination_type="cat"), 8, id="cat"),
    pytest.param(spec(("acme/a", 0.7), ("shared/c", -0.3), combination_type="cat"), 12, id="cat-ranks-4-8-subtracting"),
    pytest.param(spec(("acme/a", 0.6), ("acme/b", 0.4), combination_type="linear"), 4, id="linear"),
    pytest.param(spec(("acme/a", 1.0), ("shared/c", 1.0), combination_type="svd"), 8, id="svd"),
    pytest.param(spec(("acme/a", 1.0), ("shared/c", 1.0), combination_type="svd", svd_rank=6), 6, id="svd-rank-6"),
    pytest.param(spec(("acme/a", 0.5), ("acme/b", 0.5), combination_type="ties", density=0.5), 4, id="ties"),
    pytest.param(spec(("acme/a", 0.5), ("acme/b", 0.5), combination_type="ties", density=0.3,
                      majority_sign_method="frequency"), 4, id="ties-frequency"),
    pytest.param(spec(("acme/a", 0.5), ("acme/b", 0.5), combination_type="dare_linear", density=0.5, seed=7), 4, id="dare_linear"),
    pytest.param(spec(("acme/a", 0.5), ("acme/b", 0.5), combination_type="dare_ties", density=0.7, seed=7), 4, id="dare_ties"),
    pytest.param(spec(("acme/a", 0.5), ("acme/b", 0.5), combination_type="magnitude_prune", density=0.5), 4, id="magnitude_prune"),
    pytest.param(spec(("shared/c", 0.5)), 8, id="one-adapter"),
    pytest.param(spec(("acme/causal", 0.5), ("acme/a", 0.5), combination_type="cat"), 8, id="causal-lm-task-type"),
]


@pytest.mark.parametrize("merge, rank", CASES)
def test_a_merge_equals_peft_on_the_real_model(merge, rank, inputs, tmp_path):
    result = run_merge(merge, inputs, tmp_path)
    assert result.rank == rank
    merged = load_file(result.folder / "adapter_model.safetensors")
    reference = peft_reference(merge, inputs, tmp_path)
    assert set(merged) == set(reference)
    for key, expected in reference.items():
        torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-6, msg=key)
    assert any(tensor.abs().sum() > 0 for tensor in merged.values())
    checkpoint = read_checkpoint(result.folder)  # a PEFT folder the store validates like any other
    validate_checkpoint(checkpoint, GEOMETRY)
    assert checkpoint.max_rank == rank


def test_dare_is_reproducible_by_seed_only(inputs, tmp_path):
    first = run_merge(spec(("acme/a", 0.5), ("acme/b", 0.5), combination_type="dare_linear", density=0.5, seed=1),
                      inputs, tmp_path / "1")
    again = run_merge(spec(("acme/a", 0.5), ("acme/b", 0.5), combination_type="dare_linear", density=0.5, seed=1),
                      inputs, tmp_path / "2")
    other = run_merge(spec(("acme/a", 0.5), ("acme/b", 0.5), combination_type="dare_linear", density=0.5, seed=2),
                      inputs, tmp_path / "3")
    tensors = [load_file(r.folder / "adapter_model.safetensors") for r in (first, again, other)]
    assert all(torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0])
    assert not all(torch.equal(tensors[0][k], tensors[2][k]) for k in tensors[0])


def test_a_result_over_max_rank_is_refused_before_merging(inputs, tmp_path):
    small = slot_geometry(EngineConfig(base_model="tiny-random-llama", max_rank=8))
    merge = spec(("acme/a", 0.5), ("shared/c", 0.5), combination_type="cat")
    folders = [inputs["acme/a"], inputs["shared/c"]]
    with pytest.raises(InvalidRequestError, match="rank would be 12, over this server's max_rank 8"):
        merge_adapters(merge, folders, [4, 8], small, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["linear", "ties", "dare_ties", "magnitude_prune"])
def test_same_rank_types_refuse_mixed_ranks(kind):
    density = {"density": 0.5} if kind != "linear" else {}
    with pytest.raises(InvalidRequestError, match=r"ranks \[4, 8\]"):
        merged_rank(spec(("acme/a", 0.5), ("shared/c", 0.5), combination_type=kind, **density), [4, 8])


BAD_SPECS = [
    pytest.param({"combination_type": "average"}, id="unknown combination type"),
    pytest.param({"combination_type": "ties", "density": 0}, id="density 0"),
    pytest.param({"combination_type": "ties", "density": 1.5}, id="density over 1"),
    pytest.param({"combination_type": "ties"}, id="ties without density"),
    pytest.param({"combination_type": "cat", "density": 0.5}, id="density for cat"),
    pytest.param({"combination_type": "linear", "svd_rank": 4}, id="svd_rank for linear"),
    pytest.param({"adapters": [{"id": "acme/a", "weight": float("inf")}]}, id="infinite weight"),
    pytest.param({"adapters": [{"id": "acme/a", "weight": float("nan")}]}, id="nan weight"),
    pytest.param({"adapters": [{"id": "acme/a", "weight": 0}]}, id="zero weight"),
    pytest.param({"combination_type": "ties", "density": 0.5,
                  "adapters": [{"id": "acme/a", "weight": 0.5}, {"id": "acme/b", "weight": -0.5}]}, id="negative weight for ties"),
    pytest.param({"adapters": [{"id": "acme/a"}, {"id": "acme/a"}]}, id="an input twice"),
    pytest.param({"adapters": [{"id": "acme/blend"}]}, id="its own input"),
    pytest.param({"adapters": [{"id": "no-tenant"}]}, id="bad input id"),
    pytest.param({"name": "../etc"}, id="bad name"),
    pytest.param({"adapters": []}, id="no inputs"),
    pytest.param({"unknown": 1}, id="unknown field"),
]


@pytest.mark.parametrize("changes", BAD_SPECS)
def test_bad_specs_are_refused_with_the_field(changes):
    body = {"name": "acme/blend", "adapters": [{"id": "acme/a", "weight": 0.5}, {"id": "acme/b", "weight": 0.5}]}
    with pytest.raises(ValidationError):
        MergeSpec.model_validate({**body, **changes})


def test_a_good_spec_round_trips_as_a_recipe():
    merge = spec(("acme/a", 0.7), ("shared/json", 0.3), combination_type="dare_ties", density=0.5, seed=3)
    assert MergeSpec.model_validate_json(merge.model_dump_json()) == merge
