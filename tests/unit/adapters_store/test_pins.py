"""Pins by rendezvous hashing: N replicas each, stable while the replicas are, and a dead
replica's pins move to one other replica each, never shuffling the rest."""

from __future__ import annotations

from adapters_store.pins import assign_pins

REPLICAS = [f"r{i}" for i in range(5)]
PINS = {f"acme/a{i}": 1 + i % 3 for i in range(30)}


def holders(assignment, adapter_id):
    return {replica for replica, adapters in assignment.items() if adapter_id in adapters}


def test_each_adapter_is_pinned_on_as_many_replicas_as_asked_and_at_most_all():
    assignment = assign_pins({**PINS, "acme/everywhere": 9, "acme/off": 0}, REPLICAS)
    for adapter_id, wanted in PINS.items():
        assert len(holders(assignment, adapter_id)) == wanted
    assert holders(assignment, "acme/everywhere") == set(REPLICAS)
    assert not holders(assignment, "acme/off")
    assert assignment == assign_pins(PINS | {"acme/everywhere": 9}, reversed(REPLICAS))  # order-independent


def test_a_dead_replica_hands_each_of_its_pins_to_one_other_and_nothing_else_moves():
    before = assign_pins(PINS, REPLICAS)
    after = assign_pins(PINS, [r for r in REPLICAS if r != "r2"])
    for adapter_id, wanted in PINS.items():
        old, new = holders(before, adapter_id), holders(after, adapter_id)
        assert len(new) == wanted
        assert old - {"r2"} <= new and len(new - old) == (1 if "r2" in old else 0)
    assert assign_pins(PINS, []) == {}
