"""A multi-node Ray cluster on this one machine (`ray.cluster_utils.Cluster`: a head and worker
raylets, each its own node with its own object store), with Serve's HTTP proxy: what the
autoscaling test and `benchmarks.autoscale` spread replicas over. Always torn down, no process left."""

from __future__ import annotations

import contextlib
import socket
from typing import Iterator

from benchmarks.common import ray_processes_left, wait_until

__all__ = ["free_port", "multi_node_ray", "replica_nodes"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def multi_node_ray(num_nodes: int = 3, cpus_per_node: float = 1, http_port: int = 8000,
                   dashboard_port: int = 8265) -> Iterator[object]:
    """`num_nodes` nodes of `cpus_per_node` CPUs (a LoraReplica of 1 CPU fits one per node), the
    driver connected, Serve's proxy on the head, the dashboard (Ray's state API: which node holds
    which actor) on `dashboard_port`; yields the `Cluster`."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    assert not ray_processes_left(), f"Ray processes from an earlier run are still up: {ray_processes_left()}"
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": cpus_per_node, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": dashboard_port})
    try:
        for _ in range(num_nodes - 1):
            cluster.add_node(num_cpus=cpus_per_node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        yield cluster
    finally:
        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
    try:
        wait_until(lambda: not ray_processes_left(), 20, "Ray's processes to exit", interval_s=0.5)
    except TimeoutError:
        raise AssertionError(f"Ray processes left behind: {ray_processes_left()}") from None


def replica_nodes(app_name: str, deployment: str = "LoraReplica") -> dict[str, str]:
    """Actor id -> node id of each live replica of `deployment`."""
    from ray.util.state import list_actors

    return {a.actor_id: a.node_id for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
            if a.class_name == f"ServeReplica:{app_name}:{deployment}"}
