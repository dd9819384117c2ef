"""The serving benchmark end to end on the tiny model without the vLLM peer: our server started
with `cluster.serve_local` from a generated serve config, random PEFT adapters in a watched store
root, all three workloads over HTTP with the built-in client, one complete JSON line last, and no
process left behind (~1-2 min on 2 cores)."""

import json
import math

import pytest

from benchmarks import common, serving

COMMON_KEYS = ("device", "model", "quick", "torch", "threads", "dtype", "wall_s", "cpu_count",
               "load_avg_1m_start", "load_avg_1m_end")
WORKLOAD_KEYS = ("client", "requests", "completed", "failed", "output_tok_s", "ttft_p50_ms", "ttft_p99_ms",
                 "tpot_p50_ms", "tpot_p99_ms", "latency_p50_ms", "latency_p99_ms", "output_tokens_mean",
                 "load_avg_1m")
MIXED_KEYS = ("short_p50_ms_alone", "short_p99_ms_alone", "short_p50_ms_loaded", "short_p99_ms_loaded",
              "short_p99_ratio", "background_requests", "background_failed")
TOP_KEYS = ("engine_model", "servers", "adapters", "replicas", "replica_cpus", "tput_vs_vllm_lora",
            "tput_vs_vllm_base", "tput_base_vs_vllm_base", "ttft_p50_vs_vllm_base_1rps", "short_p99_loaded_vs_alone",
            "goal_a_tput", "goal_b_ttft", "goal_b_ttft_p99_le_2s", "goal_c_short_not_blocked", "goal_zero_failed",
            "failed_total", "processes_left")


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.integration
def test_serving_benchmark_prints_every_key(capsys):
    returned = serving.main(
        ["--no-peer", "--model", "tiny", "--quick", "--client", "builtin", "--adapters", "3", "--requests-a", "12",
         "--requests-b", "4", "--rate", "4", "--probes", "4", "--background", "2", "--output-len", "8"]
    )
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    line = json.loads(lines[-1])
    assert line == json.loads(json.dumps(returned))
    for key in COMMON_KEYS + TOP_KEYS:
        assert key in line, key
    assert line["model"] == "tiny" and line["engine_model"] == "tiny-random-llama" and line["quick"] is True
    assert line["adapters"] == 3 and line["client_ab"] == "builtin" and line["vllm"] is None
    servers = line["servers"]
    assert set(servers) == set(serving.SERVERS)
    assert servers["vllm_lora"] is None and servers["vllm_base"] is None  # --no-peer
    for server in ("lora_serve", "lora_serve_base"):
        for workload in ("a", "b", "c"):
            result = servers[server][workload]
            for key in WORKLOAD_KEYS:
                assert key in result, (server, workload, key)
            assert result["failed"] == 0, (server, workload, result["error_example"])
            assert positive(result["output_tok_s"]), (server, workload)
            assert positive(result["ttft_p50_ms"]) and result["ttft_p50_ms"] <= result["ttft_p99_ms"]
            assert result["completed"] == result["requests"]
        assert servers[server]["a"]["requests"] == 12 and servers[server]["b"]["requests"] == 4
        for key in MIXED_KEYS:
            assert key in servers[server]["c"], (server, key)
        assert positive(servers[server]["c"]["short_p99_ms_loaded"])
        assert servers[server]["c"]["background_requests"] >= 2
    # without the peer the ratios against vLLM are unknown; the goals that need only our server are set
    assert line["tput_vs_vllm_lora"] is None and line["goal_a_tput"] is None and line["goal_b_ttft"] is None
    assert isinstance(line["goal_c_short_not_blocked"], bool) and isinstance(line["goal_b_ttft_p99_le_2s"], bool)
    assert line["failed_total"] == 0 and line["goal_zero_failed"] is True
    engine = line["engine"]  # the engine alone, in process, on one replica's share of workload a (12 // 2)
    assert engine["lora"]["requests"] == 6 and engine["lora"]["output_tokens"] == 6 * 8
    assert positive(engine["base"]["output_tok_s"])
    assert line["tokens_per_s_lora_vs_base"] == engine["tokens_per_s_lora_vs_base"] and positive(line["tokens_per_s_lora_vs_base"])
    assert line["recompiles"] == 0
    assert line["processes_left"] == []
    assert not common.ray_processes_left()


def test_serving_benchmark_refuses_bad_options():
    for argv in (["--model", "llama-1b", "--no-peer"], ["--workloads", "a,z"], ["--servers", "tgi"],
                 ["--replicas", "8", "--no-peer"]):
        with pytest.raises(SystemExit):
            serving.main(argv)
