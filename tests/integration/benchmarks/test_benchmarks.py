"""The benchmarks run end to end on the tiny model and print one complete JSON line last (the
store benchmarks on a real local Ray with moto's S3 server).

Compile is off here (a tiny-model graph costs ~30 s on 2 cores); the figures are not checked
against the goals, only for being present and sane.
"""

import json
import math

import pytest

from benchmarks import cold_load, engine_load, kv_layout, mixed_batch, propagation, swap

COMMON_KEYS = ("device", "model", "quick", "torch", "threads", "dtype", "wall_s")


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
                "swap_vs_floor", "peft_vs_swap", "check_p50_ms", "validated_swap_vs_floor"):
        assert positive(line[key]), key
    assert line["check_failures"] == 0 and line["goal_every_intact_swap_passes_its_check"] is True
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


def test_engine_load_benchmark_prints_every_key(capsys):
    returned = engine_load.main(["--model", "tiny", "--quick", "--threads", "1", "--adapters", "3", "--requests", "6",
                                 "--max-num-seqs", "4", "--output-len", "5"])
    line = last_json_line(capsys)
    assert line == json.loads(json.dumps(returned))
    for key in COMMON_KEYS:
        assert key in line
    for burst in ("lora", "base"):
        assert line[burst]["requests"] == 6 and line[burst]["output_tokens"] == 30, burst  # ignore_eos: all 5 each
        assert positive(line[burst]["output_tok_s"]), burst
    assert positive(line["tokens_per_s_lora_vs_base"])
    assert line["max_num_seqs"] == 4 and line["kv_lanes"] == 4 and line["peak_rows"] == 4  # 6 requests, 4 at a time
    assert line["compiled"] is False and line["recompiles"] == 0  # compile: auto is off on CPU


def test_kv_layout_benchmark_prints_every_key(capsys):
    returned = kv_layout.main(["--quick", "--threads", "1"])
    line = last_json_line(capsys)
    assert line == json.loads(json.dumps(returned))
    assert [(step["rows"], step["context"]) for step in line["steps"]] == list(kv_layout.SHAPES)
    for step in line["steps"]:
        assert positive(step["lanes_ms"]) and positive(step["paged_ms"]), step
    assert isinstance(line["lanes_faster_everywhere"], bool)


@pytest.mark.parametrize("module", [swap, mixed_batch])
def test_benchmarks_refuse_an_unknown_model(module):
    with pytest.raises(SystemExit):
        module.main(["--model", "gpt-17"])


@pytest.mark.integration
def test_propagation_benchmark_prints_every_key(capsys):
    returned = propagation.main(["--model", "tiny", "--quick", "--updates", "2", "--sync-interval", "0.5", "--clients", "2"])
    line = last_json_line(capsys)
    assert line == json.loads(json.dumps(returned))
    for key in COMMON_KEYS:
        assert key in line
    assert line["updates"] == 2 and line["warm_replicas"] == 2
    assert line["failed_requests"] == 0 and line["requests_served"] > 0
    assert positive(line["propagation_p50_s"]) and line["propagation_p50_s"] <= line["propagation_max_s"]
    assert line["sync_interval_s"] == 0.5 and line["goal_max_s"] == 1.0
    assert {"detect_s", "fetch_s", "store_s", "publish_s", "apply_s", "replicas_s"} <= set(line["breakdown"])


@pytest.mark.integration
def test_cold_load_benchmark_prints_every_key(capsys):
    returned = cold_load.main(["--model", "tiny", "--quick", "--adapters", "2", "--profile-reps", "1"])
    line = last_json_line(capsys)
    assert line == json.loads(json.dumps(returned))
    for key in COMMON_KEYS:
        assert key in line
    assert line["adapters"] == 2 and line["rounds"] == 1
    for key in ("s3_to_slot_p50_ms", "s3_register_p50_ms", "s3_warm_load_p50_ms", "object_store_to_slot_p50_ms",
                "object_store_to_slot_p90_ms", "object_store_to_slot_wall_p50_ms"):
        assert positive(line[key]), key
    assert line["s3_to_slot_p50_ms"] >= line["s3_register_p50_ms"]
    assert {"locate_rpc_ms", "object_store_get_ms", "checkpoint_from_payload_ms", "validate_ms", "prepare_ms",
            "write_slot_ms"} <= set(line["profile"])


@pytest.mark.parametrize("module", [propagation, cold_load])
@pytest.mark.parametrize("model", ["gpt-17", "llama-1b"])
def test_store_benchmarks_refuse_a_model_they_cannot_serve(module, model):
    with pytest.raises(SystemExit):
        module.main(["--model", model])


@pytest.mark.integration
def test_routing_benchmark_prints_every_key(capsys):
    """Simulation + both end-to-end phases over real HTTP on the tiny model (~2 min)."""
    from benchmarks import common, routing

    returned = routing.main(["--quick", "--model", "tiny", "--requests", "40", "--adapters", "12"])
    line = last_json_line(capsys)
    assert line == json.loads(json.dumps(returned))
    for key in COMMON_KEYS:
        assert key in line
    assert line["model"] == "tiny" and line["quick"] is True
    for policy in ("affinity", "ray_default", "random", "oracle"):
        assert 0 <= line[f"sim_hit_rate_{policy}"] <= 1 and 0 <= line[f"sim50_hit_rate_{policy}"] <= 1
    assert line["e2e_requests"] == 40 and line["e2e_transport"] == "http"
    assert positive(line["e2e_capacity_rps"]) and positive(line["e2e_rate_rps"])
    for phase in ("affinity", "ray_default"):
        assert line[f"e2e_failed_{phase}"] == 0, line["e2e_phases"][phase]["failure_examples"]
        assert 0 <= line[f"e2e_hit_rate_{phase}"] <= 1
        assert positive(line[f"e2e_p50_ms_{phase}"]) and line[f"e2e_p50_ms_{phase}"] <= line[f"e2e_p99_ms_{phase}"]
        assert positive(line[f"e2e_tokens_per_s_{phase}"])
        # each router is fed the replicas' warm slots (Ray's: through @serve.multiplexed)
        assert line[f"e2e_router_view_matches_engine_{phase}"] >= 0.5
        assert sum(line["e2e_phases"][phase]["rows_per_replica"].values()) == 36  # every measured request ran once
    assert not common.ray_processes_left()
