"""Per-request combinations: the derived adapter's math (exact = PEFT's `cat`, else the best
rank-`max_rank` approximation), its logits on the engine against PEFT's `add_weighted_adapter`,
and its life on a replica: cached by recipe, rebuilt when a part changes, refused when a part is
unknown or does not fit."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from deployments.contracts import Combination
from deployments.engine.combinations import combine_checkpoints, truncated_product
from lora_core.checkpoint import read_checkpoint
from lora_core.errors import AdapterNotFoundError, InvalidAdapterError
from tests.support.adapters import fresh_tiny_model, make_peft_adapter
from tests.support.requests import request

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
INPUT_IDS = torch.randint(3, 259, (2, 10), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("combination-parts")
    return {
        "acme/a": make_peft_adapter(root / "a", seed=1, r=4),
        "shared/b": make_peft_adapter(root / "b", seed=2, r=4, target_modules=QKVO, lora_alpha=4),
        "acme/c": make_peft_adapter(root / "c", seed=3, r=8, target_modules=QKVO, use_rslora=True),
    }


def delta(checkpoint, name: str) -> torch.Tensor:
    weights = checkpoint.modules[name]
    return weights.scaling * weights.lora_b.float() @ weights.lora_a.float()


def test_exact_combination_is_the_weighted_sum_of_deltas_on_the_union_of_modules(parts):
    a, b = read_checkpoint(parts["acme/a"]), read_checkpoint(parts["shared/b"])
    combined = combine_checkpoints([(a, 0.7), (b, -0.3)], max_rank=16, version="v")
    assert combined.kind == "exact"
    assert set(combined.checkpoint.modules) == set(a.modules) | set(b.modules)
    for name, weights in combined.checkpoint.modules.items():
        expected = sum(w * delta(c, name) for c, w in ((a, 0.7), (b, -0.3)) if name in c.modules)
        assert weights.rank == sum(c.modules[name].rank for c in (a, b) if name in c.modules)
        torch.testing.assert_close(delta(combined.checkpoint, name), expected, atol=1e-6, rtol=1e-5)


def test_a_summed_rank_over_max_rank_is_the_best_approximation_of_that_rank(parts):
    a, c = read_checkpoint(parts["acme/a"]), read_checkpoint(parts["acme/c"])
    combined = combine_checkpoints([(a, 1.0), (c, 1.0)], max_rank=6, version="v")
    assert combined.kind == "svd"
    name = next(n for n in a.modules if n in c.modules)  # rank 4 + 8 = 12 > 6
    full = delta(a, name) + delta(c, name)
    singular = torch.linalg.svdvals(full)
    got = delta(combined.checkpoint, name)
    assert combined.checkpoint.modules[name].rank == 6
    # Eckart-Young: the error of the best rank-6 approximation is the norm of the dropped singular values
    torch.testing.assert_close(torch.linalg.norm(full - got), torch.linalg.norm(singular[6:]), atol=1e-5, rtol=1e-4)
    only_c = next(n for n in c.modules if n not in a.modules)  # rank 8 alone: over 6, reduced too
    assert combined.checkpoint.modules[only_c].rank == 6


def test_truncated_product_at_full_rank_is_the_product():
    a, b = torch.randn(5, 12), torch.randn(9, 5)
    a2, b2 = truncated_product(a, b, 5)
    torch.testing.assert_close(b2 @ a2, b @ a, atol=1e-5, rtol=1e-4)


def peft_cat_logits(parts, ids_and_weights) -> torch.Tensor:
    names = [f"input_{i}" for i in range(len(ids_and_weights))]
    model = PeftModel.from_pretrained(fresh_tiny_model(), str(parts[ids_and_weights[0][0]]), adapter_name=names[0])
    for name, (adapter_id, _) in zip(names[1:], ids_and_weights[1:]):
        model.load_adapter(str(parts[adapter_id]), adapter_name=name)
    model.add_weighted_adapter(names, [w for _, w in ids_and_weights], "cat", combination_type="cat")
    model.set_adapter("cat")
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits.float()


def test_a_half_and_half_combination_equals_peft_cat_to_1e4(parts, engine_factory):
    engine = engine_factory(max_rank=16)
    for adapter_id, folder in parts.items():
        engine.register_adapter(adapter_id, folder)
    key = engine.residency.define_combination(Combination.of({"acme/a": 0.5, "shared/b": 0.5}))
    logits = engine.forward_logits(INPUT_IDS, [key, key])
    expected = peft_cat_logits(parts, [("acme/a", 0.5), ("shared/b", 0.5)])
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    assert engine.residency.cached(key).value.combination == "exact"
    base = engine.forward_logits(INPUT_IDS, [None, None])
    assert (logits - base).abs().max() > 1e-3  # the combination changes something


def test_combination_requests_say_how_they_were_built_and_share_a_batch_with_others(parts, engine_factory):
    engine = engine_factory(max_rank=8, max_num_seqs=4)
    for adapter_id, folder in parts.items():
        engine.register_adapter(adapter_id, folder)
    exact = Combination.of({"acme/a": 1.0, "shared/b": 1.0})  # 4 + 4 fits 8
    reduced = Combination.of({"acme/a": 1.0, "acme/c": 1.0})  # 4 + 8 does not
    for combination in (exact, reduced):  # built before, so all four rows are ready together
        engine.residency.host_entry(engine.residency.define_combination(combination))
    handles = [engine.submit(r) for r in (
        request_for(exact), request_for(reduced), request_for(None, "acme/a"), request_for(None, None))]
    results = [handle.result() for handle in handles]
    assert [r.combination for r in results] == ["exact", "svd", None, None]
    assert engine.scheduler.peak_rows == 4
    again = engine.generate("Hello", combination=exact, max_tokens=4, temperature=0)
    assert again.text == results[0].text
    assert engine.residency.host_cache.snapshot().entries == 3 + 2  # the parts, and each combination once


def request_for(combination, adapter_id=None):
    return request("Hello", adapter_id, combination=combination, max_tokens=4, temperature=0, ignore_eos=True)


def test_a_new_version_of_a_part_rebuilds_the_combination(parts, engine_factory, tmp_path):
    engine = engine_factory(max_rank=16)
    folder = make_peft_adapter(tmp_path / "a", seed=1, r=4)
    engine.register_adapter("acme/a", folder)
    engine.register_adapter("shared/b", parts["shared/b"])
    key = engine.residency.define_combination(Combination.of({"acme/a": 0.5, "shared/b": 0.5}))
    before = engine.forward_logits(INPUT_IDS, [key, key])
    engine.register_adapter("acme/a", make_peft_adapter(tmp_path / "a2", seed=9, r=4))
    assert engine.residency.cached(key) is None
    after = engine.forward_logits(INPUT_IDS, [key, key])
    assert (after - before).abs().max() > 1e-3


def test_a_deleted_part_fails_the_combination_with_404(parts, engine_factory):
    engine = engine_factory(max_rank=16)
    engine.register_adapter("acme/a", parts["acme/a"])
    engine.register_adapter("shared/b", parts["shared/b"])
    combination = Combination.of({"acme/a": 0.5, "shared/b": 0.5})
    engine.generate("Hello", combination=combination, max_tokens=2)
    engine.delete_adapter("shared/b")
    with pytest.raises(AdapterNotFoundError, match="shared/b"):
        engine.generate("Hello", combination=combination, max_tokens=2)


def test_a_part_over_max_rank_is_refused_not_reduced(parts, engine_factory):
    engine = engine_factory(resolver=lambda adapter_id: (read_checkpoint(parts[adapter_id]), "v1"), max_rank=4)
    with pytest.raises(InvalidAdapterError, match="max_rank"):
        engine.generate("Hello", combination=Combination.of({"acme/a": 1.0, "acme/c": 1.0}), max_tokens=2)


def test_store_changes_rebuild_a_combination_only_when_a_part_it_was_built_from_changed(parts, engine_factory, tmp_path):
    """A resync that lists the same versions keeps it; a new version of a part (incremental or in
    a resync) and a deleted part drop it; the store never hears of the derived adapter."""
    served = {"acme/a": (parts["acme/a"], "a1"), "shared/b": (parts["shared/b"], "b1")}

    def resolve(adapter_id):
        if adapter_id not in served:
            raise AdapterNotFoundError(f"adapter {adapter_id!r} not found")
        folder, version = served[adapter_id]
        return read_checkpoint(folder), version

    engine = engine_factory(resolver=resolve, max_rank=16)
    residency = engine.residency
    key = residency.define_combination(Combination.of({"acme/a": 0.5, "shared/b": 0.5}))
    engine.forward_logits(INPUT_IDS, [key, None])
    assert residency.placement(key).origin == "combination"
    assert key not in residency.follow_store({"acme/a": "a1", "shared/b": "b1"}, complete=True, fetch=resolve)
    first_version = residency.cached(key).version
    assert first_version is not None  # nothing changed: kept

    served["acme/a"] = (make_peft_adapter(tmp_path / "a2", seed=9, r=4), "a2")
    residency.follow_store({"acme/a": "a2"}, complete=False, fetch=resolve)
    assert residency.cached(key) is None
    residency.host_entry(key)
    assert residency.cached(key) is not None and residency.cached(key).version != first_version

    residency.follow_store({"acme/a": "a2"}, complete=True, fetch=resolve)  # shared/b no longer served
    assert residency.cached(key) is None
    del served["shared/b"]
    with pytest.raises(AdapterNotFoundError):
        engine.forward_logits(INPUT_IDS, [key, None])
