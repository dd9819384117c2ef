"""The CUDA path: compiled decode in bf16, fp32 equivalence with PEFT, no recompiles.

Skipped where there is no GPU (CI); run on a lent GPU machine with `pytest -m gpu`.
"""

import random

import pytest
import torch
import torch._dynamo
from peft import PeftModel

from benchmarks.common import graphs_compiled
from lora_core.checkpoint import read_checkpoint
from tests.support.adapters import fresh_tiny_model
from tests.support.requests import request

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_fp32_on_cuda_matches_eager_peft(engine_factory, adapter_factory):
    folders = [adapter_factory(f"a{i}", seed=i, r=[4, 16][i % 2]) for i in range(3)]
    engine = engine_factory(device="cuda", dtype="float32")
    for index, folder in enumerate(folders):
        engine.register_adapter(f"t/a{index}", folder)
    ids = torch.tensor([engine.encode("a mixed batch on the gpu")] * 4)
    rows = ["t/a0", None, "t/a2", "t/a1"]
    logits = engine.forward_logits(ids, rows)
    for row, adapter in enumerate(rows):
        model = fresh_tiny_model().cuda()
        if adapter is not None:
            model = PeftModel.from_pretrained(model, folders[int(adapter[-1])])
        with torch.no_grad():
            expected = model(input_ids=ids[row : row + 1].cuda()).logits[0].float().cpu()
        torch.testing.assert_close(logits[row], expected, rtol=0, atol=1e-4)


def test_compiled_bf16_decode_serves_swaps_and_mixes_without_recompiling(engine_factory, adapter_factory):
    folders = [adapter_factory(f"a{i}", seed=i, r=[2, 4, 8, 16][i % 4]) for i in range(6)]
    compiled = engine_factory(device="cuda", compile="on", num_slots=4, max_num_seqs=8)
    eager = engine_factory(device="cuda", compile="off", num_slots=4, max_num_seqs=8)
    for engine in (compiled, eager):
        for index, folder in enumerate(folders):
            engine.register_adapter(f"t/a{index}", folder)
    prepared = [compiled.slot_model.prepare(read_checkpoint(folder)) for folder in folders]
    before = graphs_compiled()
    rng = random.Random(0)
    with torch._dynamo.config.patch(error_on_recompile=True):

        def swap_and_mix():
            runner = compiled.runner
            for _ in range(1000):
                compiled.slot_model.write_slot(rng.randint(1, 4), rng.choice(prepared))
                rows = rng.randint(1, compiled.kv_cache.lanes)
                batch = runner.batch(rows, 1, pad_id=0)
                for row in range(rows):
                    batch.set_row(row, [rng.randint(0, 200)], rng.randint(0, 100), rng.randint(0, 4))
                assert torch.isfinite(runner.run(0, batch)).all()

        compiled.scheduler.call(swap_and_mix)
        for round_index in range(6):
            adapters = [rng.choice([None] + [f"t/a{i}" for i in range(6)]) for _ in range(rng.randint(1, 8))]
            texts = []
            for engine in (compiled, eager):
                handles = [engine.submit(request(f"round {round_index}", a, max_tokens=8)) for a in adapters]
                texts.append([handle.result() for handle in handles])
            assert [c.completion_tokens for c in texts[0]] and all(c.completion_tokens for c in texts[0])
    assert graphs_compiled() == before
