"""`ray job submit` as tests run it: `JobSubmissionClient` (what the CLI uses) with the repository
as the job's working dir, waiting for the end; and a free port for the dashboard."""

from __future__ import annotations

import sys
import time

from benchmarks.local_cluster import free_port  # noqa: F401  (tests import it from here)
from lora_core.paths import REPO_ROOT

JOB_TIMEOUT_S = 240
WORKING_DIR_EXCLUDES = [".venv", ".cache", ".git", "tests", "out"]


def run_job(address: str, module: str, *arguments: str, timeout_s: float = JOB_TIMEOUT_S) -> tuple[str, str]:
    """Submit `python -m <module> <arguments>` and wait for it; (final status, logs)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    job_id = client.submit_job(
        entrypoint=" ".join([sys.executable, "-m", module, *arguments]),
        runtime_env={"working_dir": str(REPO_ROOT), "excludes": WORKING_DIR_EXCLUDES},
    )
    deadline = time.monotonic() + timeout_s
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, f"job {job_id} still {status} after {timeout_s:.0f} s"
        time.sleep(1)
    return str(status), client.get_job_logs(job_id)
