"""Fair admission across tenants: the order in which waiting requests get free rows.

Plain FIFO lets one tenant that sends 100 requests at once take every row until they are done.
`fair_order` deals rows out one per tenant per round (deficit round robin with equal weights and
a quantum of one request): the tenants with the fewest rows running first, then the one admitted
least recently (`last_admitted`, which the scheduler keeps across steps, since a step often has
one free row), FIFO within a tenant.
So a flooding tenant gets at most its share of the rows that free up while others wait, and a
quiet tenant's request is admitted at the next free row. Requests with no tenant (the engine used
from Python, admin calls) are one more tenant. Pure: no torch, no threads.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Hashable, Mapping, Sequence, TypeVar

__all__ = ["fair_order"]

T = TypeVar("T")


def fair_order(waiting: Sequence[T], tenant_of: Callable[[T], Hashable], running: Mapping[Hashable, int],
               last_admitted: Mapping[Hashable, int]) -> list[T]:
    queues: dict[Hashable, deque[T]] = {}
    for item in waiting:
        queues.setdefault(tenant_of(item), deque()).append(item)
    arrival = {tenant: index for index, tenant in enumerate(queues)}
    rounds = sorted(queues, key=lambda tenant: (running.get(tenant, 0), last_admitted.get(tenant, -1), arrival[tenant]))
    order: list[T] = []
    while rounds:
        for tenant in rounds:
            order.append(queues[tenant].popleft())
        rounds = [tenant for tenant in rounds if queues[tenant]]
    return order
