"""A local Ray cluster of the test's own, with Serve, always torn down, with no process left."""

from __future__ import annotations

import contextlib
from typing import Iterator

from benchmarks.common import ray_processes_left, wait_until


@contextlib.contextmanager
def local_ray(http_port: int | None = 8000, dashboard_port: int | None = None) -> Iterator[None]:
    """`ray.init(address="local")` (a new cluster, never another process's), Serve's HTTP proxy on
    `http_port` (None: no proxy), the dashboard (what `ray job submit` talks to) on
    `dashboard_port` (None: none); on exit serve.shutdown + ray.shutdown, then every Ray process
    this test started must be gone."""
    import ray
    from ray import serve

    assert not ray_processes_left(), f"Ray processes from an earlier run are still up: {ray_processes_left()}"
    dashboard = {"include_dashboard": False} if dashboard_port is None else {
        "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port}
    ray.init(address="local", num_cpus=2, log_to_driver=False, **dashboard)
    try:
        if http_port is not None:
            serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        yield
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    try:
        wait_until(lambda: not ray_processes_left(), 15, "Ray's processes to exit", interval_s=0.5)
    except TimeoutError:
        raise AssertionError(f"Ray processes left behind: {ray_processes_left()}") from None
