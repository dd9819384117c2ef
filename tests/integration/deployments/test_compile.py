"""One compiled decode graph per batch bucket serves every slot, every mix and every swap.

Compiling costs ~30 s per graph on a 2-core CPU, so this module builds one compiled engine and
runs every check on it.
"""

import random

import pytest
import torch
import torch._dynamo

from deployments.engine.generation import compiled_graph_count
from lora_core.checkpoint import read_checkpoint
from tests.support.requests import request

pytestmark = pytest.mark.slow
SLOTS = 4


@pytest.fixture(scope="module")
def adapter_folders(tmp_path_factory):
    from tests.support.adapters import make_peft_adapter

    root = tmp_path_factory.mktemp("compile-adapters")
    targets = [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"], ["o_proj"]]
    return [
        make_peft_adapter(root / f"a{i}", seed=i, r=[4, 8, 16, 2][i % 4], lora_alpha=8 + i, target_modules=targets[i % 3])
        for i in range(6)
    ]


@pytest.fixture(scope="module")
def engines(adapter_folders):
    from deployments.engine import Engine
    from lora_core.settings import EngineConfig

    settings = {"base_model": "tiny-random-llama", "num_slots": SLOTS, "max_batch_size": 4, "max_seq_len": 64, "max_rank": 16}
    compiled = Engine(EngineConfig(compile="on", **settings))
    eager = Engine(EngineConfig(compile="off", **settings))
    for engine in (compiled, eager):
        for index, folder in enumerate(adapter_folders):
            engine.register_adapter(f"t/a{index}", folder)
    yield compiled, eager
    compiled.close()
    eager.close()


@pytest.fixture
def no_recompiles():
    """Any recompile raises (the issue's proof); the graph count must not move either."""
    before = compiled_graph_count()
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert torch._dynamo.config.error_on_recompile
        yield
    assert compiled_graph_count() == before


def test_warm_up_compiled_one_graph_per_bucket(engines):
    compiled, _ = engines
    assert compiled.generator.compiled
    assert compiled_graph_count() >= len(compiled.generator.buckets)


def test_thousand_swaps_and_thousand_mixes_without_recompiling(engines, adapter_folders, no_recompiles):
    compiled, _ = engines
    generator, slot_model = compiled.generator, compiled.slot_model
    prepared = [slot_model.prepare(read_checkpoint(folder)) for folder in adapter_folders]
    rng = random.Random(0)

    def swap_and_mix():
        calls = 0
        for _ in range(1000):
            slot_model.write_slot(rng.randint(1, SLOTS), rng.choice(prepared))
            for batch in generator.buckets:
                cache = generator._cache(batch)
                tokens = torch.randint(0, 200, (batch, 1))
                positions = torch.zeros((batch, 1), dtype=torch.long)
                mask = torch.zeros((batch, 1, 1, generator.max_seq_len), dtype=torch.bool)
                mask[..., 0] = True
                slot_ids = torch.tensor([rng.randint(0, SLOTS) for _ in range(batch)])
                logits = generator._decode(tokens, positions, mask, slot_ids, cache)
                assert torch.isfinite(logits).all()
                calls += 1
        return calls

    assert compiled.scheduler.call(swap_and_mix) == 1000 * len(generator.buckets)


def test_generation_through_the_compiled_graph_matches_eager(engines, no_recompiles):
    compiled, eager = engines
    rng = random.Random(1)
    for round_index in range(8):
        adapters = [rng.choice([None] + [f"t/a{i}" for i in range(6)]) for _ in range(rng.randint(1, 4))]
        prompts = [f"prompt {round_index} {'x' * rng.randint(0, 9)}" for _ in adapters]
        results = []
        for engine in (compiled, eager):
            handles = [engine.submit(request(p, a, max_tokens=6)) for p, a in zip(prompts, adapters)]
            results.append([handle.result().text for handle in handles])
        assert results[0] == results[1], adapters
    assert compiled.stats()["slots"]["evictions"] > 0
