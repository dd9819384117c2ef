"""Fair admission across tenants: the pure order, and the engine giving a quiet tenant the next
free row while another tenant's flood waits."""

from __future__ import annotations

import dataclasses
import threading

from deployments.engine.fair_share import fair_order
from tests.support.requests import request


def tenant(item: str) -> str:
    return item.split(":")[0]


def test_one_per_tenant_per_round_fifo_within_a_tenant():
    waiting = ["flood:1", "flood:2", "flood:3", "quiet:1", "flood:4", "other:1", "quiet:2"]
    assert fair_order(waiting, tenant, {}, {}) == ["flood:1", "quiet:1", "other:1", "flood:2", "quiet:2", "flood:3", "flood:4"]


def test_the_tenants_with_fewer_running_rows_go_first():
    waiting = ["flood:1", "flood:2", "quiet:1"]
    assert fair_order(waiting, tenant, {"flood": 3}, {}) == ["quiet:1", "flood:1", "flood:2"]
    assert fair_order([], tenant, {"flood": 1}, {}) == []
    assert fair_order(["a:1", "b:1"], tenant, {"a": 1, "b": 1}, {}) == ["a:1", "b:1"]  # ties: arrival


def test_with_one_free_row_per_step_the_least_recently_admitted_tenant_goes_first():
    waiting = ["flood:2", "flood:3", "quiet:1"]
    assert fair_order(waiting, tenant, {}, {"flood": 7}) == ["quiet:1", "flood:2", "flood:3"]
    assert fair_order(waiting, tenant, {}, {"flood": 7, "quiet": 8}) == ["flood:2", "quiet:1", "flood:3"]


def test_a_quiet_tenants_request_is_admitted_before_a_flood_sent_earlier(engine_factory):
    """One row. A tenant queues five requests, then another sends one: FIFO would run it last;
    fair admission runs it second."""
    engine = engine_factory(max_num_seqs=1)
    finished: list[str] = []
    lock = threading.Lock()

    def send(name: str, who: str, max_tokens: int) -> threading.Thread:
        handle = engine.submit(dataclasses.replace(request(f"q {name}", max_tokens=max_tokens, ignore_eos=True),
                                                   tenant=who))

        def wait() -> None:
            handle.result()
            with lock:
                finished.append(name)

        thread = threading.Thread(target=wait)
        thread.start()
        return thread

    threads = [send(f"flood{i}", "flood", 48) for i in range(5)] + [send("quiet", "quiet", 4)]
    for thread in threads:
        thread.join(60)
    assert sorted(finished) == sorted(["quiet", *(f"flood{i}" for i in range(5))])
    assert finished.index("quiet") <= 2, finished
