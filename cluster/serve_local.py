"""`make serve`: run serve_config.yaml on an embedded local Ray until Ctrl-C or SIGTERM.

    python -m cluster.serve_local [--config serve_config.yaml] [--ray-temp-dir DIR] [--dashboard-port 8265]

Starts Ray in this process (its dashboard on 127.0.0.1:8265, so `ray job submit --address
http://127.0.0.1:8265` runs jobs on it and `serve deploy serve_config.yaml` updates it; worker
logs not echoed here), starts Serve's HTTP proxy with the config's `http_options`, hands the
config to Serve's controller exactly as `serve deploy` does (each application built by its
`import_path` builder from its `args`, `deployments:` overrides applied), waits until it runs,
prints the URL and a curl line, and blocks. Ctrl-C or SIGTERM shuts Serve down and then Ray, so
no raylet or GCS process outlives it.

The YAML is read with Ray's own `ServeDeploySchema`, so a file that works here also works with
`serve deploy`.

Ray's session folder defaults to Ray's own (/tmp/ray): a folder under a deep checkout path can
push Ray's unix socket paths past the 107-byte limit.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "serve_config.yaml"

logger = logging.getLogger("lora_serve.serve_local")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cluster.serve_local", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="a Serve config file (default: %(default)s)")
    parser.add_argument("--ray-temp-dir", default=None, help="Ray's session folder (default: Ray's own, /tmp/ray)")
    parser.add_argument("--dashboard-port", type=int, default=8265,
                        help="Ray's dashboard and job API on 127.0.0.1 (default: %(default)s; 0: none)")
    return parser.parse_args(argv)


def load_config(path: Path):
    """serve_config.yaml as Ray's ServeDeploySchema (validated the way `serve deploy` does)."""
    from ray.serve.schema import ServeDeploySchema

    if not path.is_file():
        raise SystemExit(f"no Serve config at {path}; pass one with --config PATH")
    return ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))


def _deploy(config) -> None:
    """What `serve deploy` does: the controller builds and runs every application (the demo's
    first build trains its adapters, about 2 minutes); SystemExit with Serve's message if one fails."""
    from ray import serve
    from ray.serve.context import _get_global_client

    _get_global_client().deploy_apps(config)
    names = {application.name for application in config.applications}
    while True:
        statuses = {name: serve.status().applications.get(name) for name in names}
        failed = {name: s.message for name, s in statuses.items() if s is not None and s.status == "DEPLOY_FAILED"}
        if failed:
            raise SystemExit("deploy failed: " + "; ".join(f"{name}: {message}" for name, message in failed.items()))
        if all(s is not None and s.status == "RUNNING" for s in statuses.values()):
            return
        time.sleep(1)


def _process_defaults() -> None:
    """Settings for this process and the Ray workers it starts (they inherit its environment)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(REPO_ROOT / ".cache" / "inductor"))


def _raise_keyboard_interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _install_stop_handlers() -> None:
    """Ctrl-C and SIGTERM both raise KeyboardInterrupt, so both end in `main`'s cleanup.

    Installed again after `ray.init` because `ray.init` replaces them: its core worker installs a
    native SIGTERM handler that logs "*** SIGTERM received" and kills the process on the spot,
    with no `serve.shutdown()` / `ray.shutdown()` (the Ray agents are left running). SIGINT is set
    explicitly too: a shell that starts this in the background hands it SIGINT ignored.
    """
    signal.signal(signal.SIGINT, _raise_keyboard_interrupt)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)


def _curl_line(base_url: str, model: str, api_key: str | None) -> str:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 32,
        "temperature": 0,
    }
    auth = f" -H 'Authorization: Bearer {api_key}'" if api_key else ""
    return f"curl -s {base_url}/v1/chat/completions{auth} -H 'Content-Type: application/json' -d '{json.dumps(body)}'"


def _example(args: dict) -> tuple[str, str | None]:
    """(model, API key) for the printed curl line: a demo adapter with its tenant's demo key when
    the demo is on, else the base model."""
    from deployments.app import AppArgs
    from deployments.tenants import DEMO_KEYS, KeyRing, uses_demo_keys

    settings = AppArgs.model_validate(args)
    if uses_demo_keys(KeyRing(settings.tenants)):
        return ("acme/pirate" if settings.demo_adapters else settings.base_model_name()), DEMO_KEYS["acme"]
    return settings.base_model_name(), None


def main(argv: list[str] | None = None) -> int:
    options = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(options.config)
    _process_defaults()
    _install_stop_handlers()

    import ray
    from ray import serve

    started = time.perf_counter()
    init_options = {"include_dashboard": False, "log_to_driver": False}
    if options.dashboard_port:
        init_options.update(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=options.dashboard_port)
    if options.ray_temp_dir:
        init_options["_temp_dir"] = str(Path(options.ray_temp_dir).resolve())
    try:
        ray.init(**init_options)
        _install_stop_handlers()  # ray.init replaced them
        http = config.http_options
        serve.start(http_options={"host": http.host, "port": http.port})
        base_url = f"http://{http.host}:{http.port}"
        _deploy(config)
        for application in config.applications:
            prefix = (application.route_prefix or "").rstrip("/")
            model, api_key = _example(application.args or {})
            print(f"\n{application.name} is ready in {time.perf_counter() - started:.0f} s at {base_url}{prefix}/v1", flush=True)
            print(f"  try:  {_curl_line(base_url + prefix, model, api_key)}", flush=True)
        print("Ctrl-C to stop.", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nshutting down...", flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
        print("stopped.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
