import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def adapter_factory(tmp_path):
    """make(name, **lora_options) -> folder of a real PEFT adapter for the tiny model."""
    from tests.adapters import make_peft_adapter

    def make(name: str = "adapter", seed: int = 0, **options):
        return make_peft_adapter(tmp_path / name, seed=seed, **options)

    return make


@pytest.fixture
def engine_factory():
    """make(**config) -> an Engine on a fresh tiny model; every engine is closed at teardown."""
    from deployments.engine import Engine, EngineConfig

    engines = []

    def make(**config):
        settings = {"base_model": "tiny-random-llama", "compile": "off", "num_slots": 4, "max_batch_size": 4, "max_seq_len": 128}
        settings.update(config)
        engine = Engine(EngineConfig(**settings))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()
