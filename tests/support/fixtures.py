"""Fixtures every tier shares (loaded by tests/conftest.py as a pytest plugin). Each one undoes
what it made and checks at teardown that its threads are gone."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from adapters_store.sources import source_for_uri
from adapters_store.syncer import AdapterSyncer
from lora_core.geometry import SlotGeometry, slot_geometry
from lora_core.settings import EngineConfig, SourceInput, StoreConfig
from tests.support.adapters import make_peft_adapter
from tests.support.leaks import no_new_threads

TINY_ENGINE = {"base_model": "tiny-random-llama", "compile": "off", "num_slots": 4, "max_num_seqs": 4, "max_seq_len": 128}


@pytest.fixture
def adapter_factory(tmp_path):
    """make(name, **lora_options) -> folder of a real PEFT adapter for the tiny model."""

    def make(name: str = "adapter", seed: int = 0, **options):
        return make_peft_adapter(tmp_path / name, seed=seed, **options)

    return make


@pytest.fixture
def engine_factory():
    """make(resolver=None, on_rejected=None, **config) -> an Engine on a fresh tiny model; every engine is closed at
    teardown and its loop and loader threads must be gone."""
    from deployments.engine import Engine

    engines = []

    def make(resolver=None, on_rejected=None, **config):
        engine = Engine(EngineConfig(**{**TINY_ENGINE, **config}), resolver=resolver, on_rejected=on_rejected)
        engines.append(engine)
        return engine

    with no_new_threads():
        yield make
        for engine in engines:
            engine.close()


# ---- the adapter store's logic ----------------------------------------------------------------


@pytest.fixture(scope="module")
def geometry() -> SlotGeometry:
    """The tiny model's slot geometry at max_rank 8, as the store computes it (from files)."""
    return slot_geometry(EngineConfig(base_model="tiny-random-llama", max_rank=8))


@pytest.fixture(scope="module")
def adapter_template(tmp_path_factory):
    """Two real PEFT adapters for the tiny model, made once and copied per test."""
    root = tmp_path_factory.mktemp("templates")
    return {seed: make_peft_adapter(root / f"seed{seed}", seed=seed) for seed in (0, 1)}


@pytest.fixture
def place(adapter_template):
    """place(folder, seed) -> a copy of a template adapter at `folder` (replacing what was there)."""

    def place_adapter(folder: Path, seed: int = 0) -> Path:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(adapter_template[seed], folder)
        return folder

    return place_adapter


class Clock:
    """An injected monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_syncer(tmp_path, geometry, sources=(), clock=None, source_factory=source_for_uri, **config) -> AdapterSyncer:
    settings = StoreConfig(root=str(tmp_path / "store"), sources=[SourceInput(**s) for s in sources], **config)
    return AdapterSyncer(settings, geometry, monotonic=clock or Clock(), source_factory=source_factory)
