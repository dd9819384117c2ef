"""What `serve deploy` may change in place: user_configs over the application's args."""

import pytest
from pydantic import ValidationError

from deployments.deploy_config import ReplicaSettings, ReplicaUserConfig, RouterSettings, RouterUserConfig
from deployments.tenants import TenantsConfig
from lora_core.settings import LIVE_ENGINE_FIELDS, EngineConfig, StoreConfig

STORE = StoreConfig(name="s", root="/tmp/never-used", sources=[{"uri": "/srv/a"}], sync_interval_s=5)
ARGS = ReplicaSettings(base_model="tiny-random-llama", num_slots=4, max_new_tokens=64,
                       adapters={"acme/a": "/srv/a/acme/a"}, store=STORE, routing_weights={"miss_cost": 3.0})


def test_an_empty_user_config_is_the_args():
    assert ReplicaUserConfig().applied_to(ARGS) == ARGS
    assert ReplicaUserConfig.model_validate({}).applied_to(ARGS).store == STORE  # never disconnected


def test_a_partial_user_config_changes_only_what_it_names():
    changed = ReplicaUserConfig(max_new_tokens=32, store={"sync_interval_s": 30}).applied_to(ARGS)
    assert changed.max_new_tokens == 32 and changed.store == STORE.model_copy(update={"sync_interval_s": 30})
    assert changed.adapters == ARGS.adapters and changed.num_slots == 4 and changed.routing_weights == {"miss_cost": 3.0}
    assert ReplicaUserConfig(adapters={}, routing_weights={}).applied_to(ARGS).adapters == {}


@pytest.mark.parametrize("field", ["num_slots", "max_rank", "base_model", "dtype", "compile", "max_num_seqs"])
def test_what_needs_a_new_engine_is_refused_by_name(field):
    with pytest.raises(ValidationError, match=f"{field} need a new engine: set them under args.replica"):
        ReplicaUserConfig.model_validate({field: EngineConfig.model_fields[field].default, "max_new_tokens": 8})


def test_every_live_engine_field_can_be_set_in_a_user_config():
    assert set(LIVE_ENGINE_FIELDS) <= set(ReplicaUserConfig.model_fields)
    assert not set(ReplicaUserConfig.model_fields) - set(LIVE_ENGINE_FIELDS) - set(ReplicaSettings.model_fields)


def test_the_store_is_changed_field_by_field_but_never_renamed_or_added_in_place():
    with pytest.raises(ValidationError, match="name cannot change"):
        ReplicaUserConfig(store={"name": "other"})
    with pytest.raises(ValidationError, match="unknown store settings"):
        ReplicaUserConfig(store={"sync_interval": 3})
    with pytest.raises(ValidationError, match="sync_interval_s"):  # a bad value, found against the args' store
        ReplicaUserConfig(store={"sync_interval_s": -1}).applied_to(ARGS)
    with pytest.raises(ValueError, match="has none"):
        ReplicaUserConfig(store={"sync_interval_s": 3}).applied_to(ARGS.model_copy(update={"store": None}))
    moved = ReplicaUserConfig(store={"root": "/tmp/elsewhere", "sources": []}).applied_to(ARGS).store
    assert moved.root == "/tmp/elsewhere" and moved.sources == [] and moved.name == "s"


def test_routing_weights_are_checked_against_the_policy():
    with pytest.raises(ValidationError, match="unknown routing weights"):
        ReplicaUserConfig(routing_weights={"nope": 1.0}).applied_to(ARGS)
    with pytest.raises(ValidationError):
        ReplicaUserConfig(routing_weights={"busy_fraction": 2.0}).applied_to(ARGS)


def test_the_router_takes_new_tenants_and_keeps_the_rest():
    args = RouterSettings(base_model_name="base", tenants=TenantsConfig(tenants={"acme": {"keys": ["sk-acme-1234"]}}))
    tenants = TenantsConfig(tenants={"globex": {"keys": ["sk-globex-1234"]}})
    assert RouterUserConfig().applied_to(args) == args
    changed = RouterUserConfig(tenants=tenants).applied_to(args)
    assert changed.tenants == tenants and changed.base_model_name == "base"
    with pytest.raises(ValidationError, match="base_model_name of the Router change under the application's args"):
        RouterUserConfig.model_validate({"base_model_name": "other"})
    with pytest.raises(ValidationError):
        RouterUserConfig.model_validate({"tenant": {}})


def test_config_pins_name_adapters_and_counts():
    assert StoreConfig(pins={"acme/a": 2}).pins == {"acme/a": 2}
    with pytest.raises(ValidationError):
        StoreConfig(pins={"no-tenant": 1})
    with pytest.raises(ValidationError, match=">= 1"):
        StoreConfig(pins={"acme/a": 0})
