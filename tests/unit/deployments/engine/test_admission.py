"""Unit tests for `deployments.engine.admission`: the eviction choice alone, with plain inputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from deployments.engine.admission import (
    ADMISSION_POLICIES,
    DEFAULT_ADMISSION,
    Candidate,
    Eviction,
    FrequencySketch,
    LruAdmission,
    TinyLfuAdmission,
    adapter_of,
    make_admission,
)

REPO_ROOT = Path(__file__).resolve().parents[4]


def test_module_imports_neither_torch_nor_ray():
    code = (
        "import sys, deployments.engine.admission; "
        "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("key,adapter_id", [("a@v1", "a"), ("acme/b@sha256:ff", "acme/b"), ("plain", "plain"),
                                            ("probe:a#1@v1", "probe:a#1")])
def test_frequency_is_per_adapter_id_the_part_before_the_version(key, adapter_id):
    assert adapter_of(key) == adapter_id


# ---- the sketch ---------------------------------------------------------------------------


def test_sketch_counts_then_halves_every_sample_size_records():
    sketch = FrequencySketch(sample_size=10)
    for adapter_id in ["a"] * 6 + ["b"] * 3:
        sketch.record(adapter_id)
    assert (sketch.estimate("a"), sketch.estimate("b"), sketch.estimate("c"), sketch.resets) == (6, 3, 0, 0)
    sketch.record("c")  # the 10th record: every count halves, and c's single request is forgotten
    assert (sketch.estimate("a"), sketch.estimate("b"), sketch.estimate("c"), sketch.resets) == (3, 1, 0, 1)
    assert len(sketch) == 2


def test_sketch_stays_bounded_under_a_stream_of_distinct_ids():
    sketch = FrequencySketch(sample_size=50)
    for i in range(10_000):
        sketch.record("hot" if i % 2 else f"once{i}")
        assert len(sketch) <= 2 * sketch.sample_size
    assert sketch.estimate("hot") > 10  # the recurring id is still told apart


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, None])
def test_sketch_refuses_a_bad_sample_size(bad):
    with pytest.raises(ValueError, match="sample_size"):
        FrequencySketch(bad)


# ---- the choice ---------------------------------------------------------------------------


def _policy(counts: dict[str, int]) -> TinyLfuAdmission:
    policy = TinyLfuAdmission(4, window_slots=1, sample_size=10_000)
    for adapter_id, count in counts.items():
        for _ in range(count):
            policy.record(adapter_id)
    return policy


def _residents(*specs: str) -> list[Candidate]:
    """'w:key' in the window, 'm:key' in main; a trailing '!' = not evictable. Least recent first."""
    out = []
    for spec in specs:
        segment, _, key = spec.partition(":")
        out.append(Candidate(key.rstrip("!"), in_window=segment == "w", evictable=not key.endswith("!")))
    return out


CHOICES = [
    # (counts, residents least recent first, expected eviction)
    ({"c": 1, "m1": 3, "m2": 2}, ("m:m1", "m:m2", "w:c"), Eviction("c")),  # the one-off loses
    ({"c": 5, "m1": 3, "m2": 2}, ("m:m1", "m:m2", "w:c"), Eviction("m2", promoted="c")),  # beats the weakest
    ({"c": 2, "m1": 3, "m2": 2}, ("m:m1", "m:m2", "w:c"), Eviction("c")),  # a tie keeps main
    ({"c": 1, "m1": 2, "m2": 2}, ("m:m2", "m:m1", "w:c!"), Eviction("m2")),  # window held: weakest, least recent
    ({"c": 1, "m1": 1, "m2": 9}, ("m:m1!", "m:m2", "w:c!"), Eviction("m2")),  # only m2 can go
    ({"c": 9, "m1": 1}, ("m:m1!", "w:c"), Eviction("c")),  # main all held: the window goes
    ({"c": 1, "m1": 1}, ("m:m1!", "w:c!"), None),  # nothing evictable
    ({"c": 1, "d": 7, "m1": 3}, ("w:c", "w:d", "m:m1"), Eviction("c")),  # the window's least recent competes
    ({"a": 4, "m1": 3}, ("m:m1", "w:a@v2"), Eviction("m1", promoted="a@v2")),  # counted per adapter id
]


@pytest.mark.parametrize("counts,residents,expected", CHOICES)
def test_tinylfu_choice(counts, residents, expected):
    policy = _policy(counts)
    assert policy.choose(_residents(*residents)) == expected
    assert policy.choose(_residents(*residents)) == expected  # choosing changes nothing


def test_lru_evicts_the_least_recent_evictable_resident_and_counts_nothing():
    policy = LruAdmission()
    policy.record("a")
    assert policy.window_slots == 0 and policy.frequency("a") == 0
    assert policy.choose(_residents("m:a!", "m:b", "w:c")) == Eviction("b")
    assert policy.choose(_residents("m:a!")) is None


@pytest.mark.parametrize("num_slots,window_slots", [(1, 1), (2, 1), (8, 1), (16, 2), (32, 3), (100, 10)])
def test_window_is_a_tenth_of_the_slots_and_at_least_one(num_slots, window_slots):
    policy = TinyLfuAdmission(num_slots)
    assert policy.window_slots == window_slots
    assert policy.sketch.sample_size == 10 * num_slots


@pytest.mark.parametrize("bad", [0, 5, True, 1.0])
def test_window_must_fit_the_pool(bad):
    with pytest.raises(ValueError, match="window_slots"):
        TinyLfuAdmission(4, window_slots=bad)


def test_policies_are_chosen_by_name():
    assert ADMISSION_POLICIES == ("lru", "tinylfu") and DEFAULT_ADMISSION == "tinylfu"
    assert isinstance(make_admission("lru", 4), LruAdmission)
    assert isinstance(make_admission("tinylfu", 4), TinyLfuAdmission)
    with pytest.raises(ValueError, match="unknown admission 'lfu'; choose one of"):
        make_admission("lfu", 4)
