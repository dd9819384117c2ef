"""Every new version is checked after it lands (PEFT's "validate the swap"): a slot write that does
not match the store's fingerprint, or a probe answered wrong, is never served; the store is told
and the previous good version answers instead. A fake store stands in for the actor (a resolver
and a rejection callback): the real one is tested in tests/integration."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from lora_core.checkpoint import read_checkpoint
from lora_core.errors import SwapValidationError
from lora_core.fingerprint import fingerprint, matches, module_fingerprint
from lora_core.peft_files import PROBE_FILE
from tests.support.adapters import make_peft_adapter
from tests.support.requests import request

PROMPT = "Hello there"


class FakeStore:
    """Serves one version per adapter; a rejected serving version falls back to the previous."""

    def __init__(self, versions: dict[str, list[tuple[str, object]]]) -> None:
        self.versions = versions  # adapter id -> [(version, folder)], serving last
        self.rejections: list[tuple[str, str, str]] = []

    def resolve(self, adapter_id: str):
        version, folder = self.versions[adapter_id][-1]
        checkpoint = read_checkpoint(folder)
        return _with_store_fingerprint(checkpoint), version

    def on_rejected(self, adapter_id: str, version: str, reason: str) -> None:
        self.rejections.append((adapter_id, version, reason))
        if self.versions[adapter_id][-1][0] == version:
            self.versions[adapter_id].pop()

    def serving(self) -> dict[str, str]:
        return {adapter_id: versions[-1][0] for adapter_id, versions in self.versions.items()}


def _with_store_fingerprint(checkpoint):
    return dataclasses.replace(checkpoint, fingerprint=fingerprint(checkpoint))


def greedy(engine, adapter_id="acme/a") -> str:
    return engine.submit(request(PROMPT, adapter_id, max_tokens=6, ignore_eos=True)).result().text


@pytest.fixture
def two_versions(tmp_path):
    return make_peft_adapter(tmp_path / "v1", seed=1, r=4), make_peft_adapter(tmp_path / "v2", seed=2, r=4)


def corrupt_next_write(engine) -> dict:
    """The next slot write lands with one row of one layer off, as a bad copy would."""
    state = {"armed": True, "done": 0}
    original = engine.slot_model.write_slot

    def write_slot(slot, adapter):
        swap_ms = original(slot, adapter)
        if state["armed"]:
            state["armed"] = False
            state["done"] += 1
            layer = next(iter(engine.slot_model.layers.values()))
            with torch.no_grad():
                layer.lora_b[slot, 0] += 0.5
        return swap_ms

    engine.slot_model.write_slot = write_slot
    return state


def test_a_corrupted_slot_write_is_caught_and_the_previous_version_answers(engine_factory, two_versions):
    v1, v2 = two_versions
    store = FakeStore({"acme/a": [("v1", v1)]})
    engine = engine_factory(resolver=store.resolve, on_rejected=store.on_rejected)
    text_v1 = greedy(engine)
    logits_v1 = engine.forward_logits(torch.tensor([[5, 6, 7, 8]]), ["acme/a"])

    store.versions["acme/a"].append(("v2", v2))
    engine.residency.follow_store(store.serving(), complete=False, fetch=store.resolve)
    assert engine.residency.cached("acme/a").version == "v2"
    corruption = corrupt_next_write(engine)
    assert greedy(engine) == text_v1  # the request waited for v1 instead of running on a bad slot
    assert corruption["done"] == 1
    (adapter_id, version, reason), = store.rejections
    assert (adapter_id, version) == ("acme/a", "v2") and "slot check failed" in reason
    assert torch.equal(engine.forward_logits(torch.tensor([[5, 6, 7, 8]]), ["acme/a"]), logits_v1)
    report = engine.residency.adapter_reports()["acme/a"]
    assert report.version == "v1" and "v2 rejected" in report.validation and report.requests == 2
    assert report.last_swap_ms is not None and report.tokens == 12


def test_a_clean_new_version_is_checked_once_and_served(engine_factory, two_versions):
    v1, v2 = two_versions
    store = FakeStore({"acme/a": [("v1", v1)]})
    engine = engine_factory(resolver=store.resolve, on_rejected=store.on_rejected)
    text_v1 = greedy(engine)
    store.versions["acme/a"].append(("v2", v2))
    engine.residency.follow_store(store.serving(), complete=False, fetch=store.resolve)
    assert greedy(engine) != text_v1
    assert store.rejections == [] and engine.residency.adapter_reports()["acme/a"].validation == "ok"


def test_a_wrong_probe_keeps_the_new_version_out_and_a_right_one_lets_it_in(engine_factory, tmp_path, two_versions):
    v1, v2 = two_versions
    store = FakeStore({"acme/a": [("v1", v1)]})
    engine = engine_factory(resolver=store.resolve, on_rejected=store.on_rejected)
    text_v1 = greedy(engine)
    reference = engine_factory()  # v2's real answer, from an engine of its own
    reference.register_adapter("acme/a", v2)
    answer_v2 = greedy(reference)
    assert answer_v2 != text_v1

    (v2 / PROBE_FILE).write_text(json.dumps({"prompt": PROMPT, "expected": text_v1 + "x"}))  # cannot match
    store.versions["acme/a"].append(("v2", v2))
    engine.residency.follow_store(store.serving(), complete=False, fetch=store.resolve)
    assert greedy(engine) == text_v1 and engine.residency.cached("acme/a").version == "v1"
    assert [r[:2] for r in store.rejections] == [("acme/a", "v2")] and "probe answered" in store.rejections[0][2]

    v3 = make_peft_adapter(tmp_path / "v3", seed=2, r=4)  # v2's weights, with a probe it answers
    (v3 / PROBE_FILE).write_text(json.dumps({"prompt": PROMPT, "expected": answer_v2[:5]}))
    store.versions["acme/a"].append(("v3", v3))
    engine.residency.follow_store(store.serving(), complete=False, fetch=store.resolve)
    assert greedy(engine) == answer_v2 and len(store.rejections) == 1
    assert "probe:" not in "".join(engine.residency.placements())  # the probe's temporary copy is gone


def test_a_local_adapter_that_does_not_land_intact_is_refused(engine_factory, two_versions):
    v1, _ = two_versions
    engine = engine_factory()
    engine.register_adapter("acme/a", v1)
    text_v1 = greedy(engine)
    corrupt_next_write(engine)
    with pytest.raises(SwapValidationError):
        engine.register_adapter("acme/a", make_peft_adapter(v1.parent / "v1b", seed=3, r=4))
    assert engine.residency.placement("acme/a").version == read_checkpoint(v1).version  # the old one serves
    assert greedy(engine) == text_v1


def test_fingerprints_tell_rounding_from_corruption(tmp_path):
    checkpoint = read_checkpoint(make_peft_adapter(tmp_path / "fp", seed=4, r=4))
    expected = fingerprint(checkpoint)
    name = next(iter(expected))
    a, b = checkpoint.modules[name].lora_a, checkpoint.modules[name].lora_b * checkpoint.modules[name].scaling
    rounded = {**expected, name: module_fingerprint(a.bfloat16(), b.bfloat16())}
    assert matches(expected, rounded, 2e-2) is None
    assert matches(expected, rounded, 1e-9) is not None
    scaled_twice = {**expected, name: module_fingerprint(a, 2 * b)}
    assert "slot norms" in matches(expected, scaled_twice, 2e-2)


def test_a_corrupted_write_of_a_probes_slot_rejects_the_version_it_probes(engine_factory, tmp_path, two_versions):
    v1, v2 = two_versions
    store = FakeStore({"acme/a": [("v1", v1)]})
    engine = engine_factory(resolver=store.resolve, on_rejected=store.on_rejected)
    text_v1 = greedy(engine)
    reference = engine_factory()
    reference.register_adapter("acme/a", v2)
    (v2 / PROBE_FILE).write_text(json.dumps({"prompt": PROMPT, "expected": greedy(reference)[:5]}))  # it would pass
    store.versions["acme/a"].append(("v2", v2))
    corrupt_next_write(engine)  # the next write is the probe's temporary slot
    engine.residency.follow_store(store.serving(), complete=False, fetch=store.resolve)
    assert [r[:2] for r in store.rejections] == [("acme/a", "v2")] and "slot check failed" in store.rejections[0][2]
    assert greedy(engine) == text_v1
