"""The forward over lanes equals the plain full-sequence forward, whatever the chunks, the lanes,
the lengths sharing a batch and the slots, to 1e-4 in fp32 (tiny model)."""

from __future__ import annotations

import pytest
import torch

from deployments.engine.base_model import BaseModelSpec, load_base_model
from deployments.engine.engine import _kv_cache_for, slot_model_for
from deployments.engine.model_runner import ModelRunner, row_buckets
from lora_core.checkpoint import read_checkpoint
from lora_core.settings import EngineConfig
from tests.support.adapters import make_peft_adapter

CONFIG = EngineConfig(base_model="tiny-random-llama", compile="off", num_slots=2, max_num_seqs=4, max_seq_len=64)


@pytest.mark.parametrize(("max_rows", "expected"),
                         [(1, (2,)), (2, (2,)), (3, (2, 3)), (4, (2, 4)), (8, (2, 4, 8)), (12, (2, 4, 8, 12))])
def test_row_buckets(max_rows, expected):
    assert row_buckets(max_rows) == expected


@pytest.fixture(scope="module")
def runner_and_reference(tmp_path_factory):
    """A runner on a tiny model with an adapter in slot 1, and a plain copy with the adapter merged
    by PEFT for reference."""
    from peft import PeftModel

    folder = make_peft_adapter(tmp_path_factory.mktemp("adapter") / "a", seed=3, target_modules=["q_proj", "v_proj"])
    base = load_base_model(BaseModelSpec(name="tiny-random-llama"))
    slot_model = slot_model_for(base, CONFIG, CONFIG.num_slots)
    slot_model.write_slot(1, slot_model.prepare(read_checkpoint(folder)))
    runner = ModelRunner(base.model, slot_model.set_slot_ids, _kv_cache_for(base, CONFIG), compile_decode=False)
    plain = load_base_model(BaseModelSpec(name="tiny-random-llama")).model
    adapted = PeftModel.from_pretrained(load_base_model(BaseModelSpec(name="tiny-random-llama")).model, folder)
    return runner, {0: plain, 1: adapted}


def reference_logits(models, slot, ids):
    with torch.no_grad():
        return models[slot](input_ids=torch.tensor([ids])).logits[0]


def test_chunked_prefill_then_decode_equals_the_full_forward(runner_and_reference):
    runner, models = runner_and_reference
    ids = [5, 17, 99, 42, 7, 250, 3, 11, 64]
    for slot in (0, 1):
        expected = reference_logits(models, slot, ids)
        prefilled = 0
        for chunk in (3, 2):  # two prefill chunks
            batch = runner.batch(1, chunk, pad_id=0)
            batch.set_row(0, ids[prefilled: prefilled + chunk], prefilled, slot)
            logits = runner.run(2, batch)  # lane 2
            prefilled += chunk
            torch.testing.assert_close(logits[0], expected[prefilled - 1], rtol=0, atol=1e-4)
        for position in range(prefilled, len(ids)):  # then one token per step
            batch = runner.batch(1, 1, pad_id=0)
            batch.set_row(0, [ids[position]], position, slot)
            torch.testing.assert_close(runner.run(2, batch)[0], expected[position], rtol=0, atol=1e-4)


def test_rows_of_different_lengths_and_slots_share_a_step(runner_and_reference):
    runner, models = runner_and_reference
    prompts = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [200, 100, 50, 25]]
    slots = [1, 0, 1]
    batch = runner.batch(len(prompts), max(map(len, prompts)), pad_id=0)  # padded prefill of three rows
    for row, (ids, slot) in enumerate(zip(prompts, slots)):
        batch.set_row(row, ids, 0, slot)
    logits = runner.run(0, batch)
    for row, (ids, slot) in enumerate(zip(prompts, slots)):
        torch.testing.assert_close(logits[row], reference_logits(models, slot, ids)[-1], rtol=0, atol=1e-4)
    step = runner.batch(len(prompts), 1, pad_id=0)  # one decode step for all three, at their own positions
    nexts = [77, 78, 79]
    for row, (ids, slot) in enumerate(zip(prompts, slots)):
        step.set_row(row, [nexts[row]], len(ids), slot)
    logits = runner.run(0, step)
    for row, (ids, slot) in enumerate(zip(prompts, slots)):
        torch.testing.assert_close(logits[row], reference_logits(models, slot, ids + [nexts[row]])[-1], rtol=0, atol=1e-4)


def test_only_a_prefill_loops_over_its_rows(runner_and_reference, monkeypatch):
    """The per-row LoRA loop is for eager prefill chunks; a decode step (maybe compiled, where
    the loop would be traced once per mix of slots) uses the slot kernels."""
    runner, _ = runner_and_reference
    seen = []
    set_slot_ids = runner.set_slot_ids
    monkeypatch.setattr(runner, "set_slot_ids",
                        lambda slot_ids, tokens, loop_rows: (seen.append((tokens, loop_rows)), set_slot_ids(slot_ids, tokens, loop_rows)))
    for tokens in (4, 1):
        batch = runner.batch(2, tokens, pad_id=0)
        batch.set_row(0, [9] * tokens, 0, 1)
        runner.run(0, batch)
    assert seen == [(4, True), (1, False)]
