"""The engine benchmarks run end to end on the tiny model and print one complete JSON line last.

Compile is off here (a tiny-model graph costs ~30 s on 2 cores); the figures are not checked
against the goals, only for being present and sane.
"""

import json
import math

import pytest

from benchmarks import mixed_batch, swap

COMMON_KEYS = ("device", "model", "quick", "torch", "threads", "dtype", "wall_s")


@pytest.fixture(autouse=True)
def restore_process_state():
    """The benchmarks set torch threads and seed the global RNGs; give the next tests theirs back."""
    import random

    import torch

    threads, python_rng = torch.get_num_threads(), random.getstate()
    with torch.random.fork_rng():
        yield
    torch.set_num_threads(threads)
    random.setstate(python_rng)


def last_json_line(capsys) -> dict:
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines, "the benchmark printed nothing on stdout"
    return json.loads(lines[-1])


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_swap_benchmark_prints_every_key(capsys):
    returned = swap.main(
        ["--model", "tiny", "--device", "cpu", "--quick", "--compile", "off", "--swaps", "40",
         "--peft-swaps", "5", "--adapters", "6", "--slots", "4", "--threads", "1"]
    )
    line = last_json_line(capsys)
    assert line == json.loads(json.dumps(returned))
    for key in COMMON_KEYS:
        assert key in line
    assert line["model"] == "tiny" and line["device"] == "cpu" and line["quick"] is True and line["threads"] == 1
    for key in ("swap_p50_ms", "swap_p99_ms", "prepare_p50_ms", "memcpy_floor_ms", "peft_hotswap_p50_ms",
                "swap_vs_floor", "peft_vs_swap"):
        assert positive(line[key]), key
    assert line["swap_p50_ms"] <= line["swap_p99_ms"]
    assert line["swaps"] == 40 and line["peft_swaps"] == 5
    assert line["forwards_during_swaps"] == 4
    assert line["recompiles"] == 0
    assert line["compiled_matches_eager"] is True
    assert line["compile"] == "off"
    assert min(line["adapter_ranks"]) == 4 and max(line["adapter_ranks"]) == 16


def test_mixed_batch_benchmark_prints_every_key(capsys):
    returned = mixed_batch.main(
        ["--model", "tiny", "--device", "cpu", "--quick", "--tokens", "4", "--reps", "1", "--threads", "1"]
    )
    line = last_json_line(capsys)
    assert line == json.loads(json.dumps(returned))
    for key in COMMON_KEYS:
        assert key in line
    for key in ("tokens_per_s_mixed", "tokens_per_s_base", "tokens_per_s_peft_mixed", "ratio_vs_base", "ratio_vs_peft"):
        assert positive(line[key]), key
    assert line["compile"] == "off"  # --quick on CPU
    assert line["recompiles"] == 0
    # eos ignored: every row of every path ran exactly --tokens steps
    assert line["generated_tokens_per_rep"] == {"mixed": [32], "base": [32], "peft_mixed": [32]}
    # fp32 greedy: the slot engine and PEFT's adapter_names path write the same text for every row
    assert line["rows_equal_to_peft"] == 8


@pytest.mark.parametrize("module", [swap, mixed_batch])
def test_benchmarks_refuse_an_unknown_model(module):
    with pytest.raises(SystemExit):
        module.main(["--model", "gpt-17"])
