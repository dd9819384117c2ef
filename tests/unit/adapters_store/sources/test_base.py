"""What every adapter source shares: the Protocol, the registry of schemes, the retry policy."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save, save_file

from adapters_store.sources import AdapterSource, HubSource, LocalSource, RetryPolicy, S3Source, source_for_uri
from lora_core.errors import InvalidAdapterIdError, InvalidRequestError


def test_safetensors_helper_matches_save_file(tmp_path):
    """The bytes helper writes what safetensors.torch.save_file would (so tests use real files)."""
    tensors = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 3)}
    save_file(tensors, tmp_path / "a.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == save(tensors)

def test_public_surface_is_pinned():
    import adapters_store.sources as sources

    assert sorted(sources.__all__) == sorted([
        "AdapterSource", "FetchOutcome", "FileHashCache", "HubSource", "LocalSource", "RemoteAdapter",
        "RemoteFile", "RetryPolicy", "S3Source", "SOURCE_TYPES", "source_for_uri", "source_options"])
    assert sorted(sources.SOURCE_TYPES) == ["file", "hf", "s3"]

def test_sources_satisfy_the_protocol(tmp_path):
    assert isinstance(LocalSource(tmp_path), AdapterSource)
    assert isinstance(HubSource("org/repo", endpoint="http://127.0.0.1:1"), AdapterSource)
    assert isinstance(S3Source("bucket-x", endpoint_url="http://127.0.0.1:1"), AdapterSource)

def test_source_for_uri_picks_by_scheme_and_checks_options(tmp_path):
    assert isinstance(source_for_uri(str(tmp_path)), LocalSource)
    assert isinstance(source_for_uri(tmp_path.as_uri()), LocalSource)
    s3 = source_for_uri("s3://bucket-x/prod", endpoint_url="http://127.0.0.1:1")
    assert isinstance(s3, S3Source) and (s3.bucket, s3.prefix) == ("bucket-x", "prod")
    hub = source_for_uri("hf://org/repo/adapters@v2", token="hf_x")
    assert isinstance(hub, HubSource) and (hub.revision, hub.subfolder) == ("v2", "adapters")
    assert "hf_x" not in repr(hub)
    with pytest.raises(InvalidRequestError, match="endpoint_url"):
        source_for_uri(str(tmp_path), endpoint_url="http://x")
    with pytest.raises(InvalidRequestError, match="unsupported scheme"):
        source_for_uri("gs://bucket/x")

def test_retry_policy_retries_transient_errors_with_growing_delays():
    sleeps: list[float] = []
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("down")
        return "ok"

    policy = RetryPolicy(max_attempts=4, base_delay_s=1.0, max_delay_s=10.0, total_timeout_s=60.0)
    assert policy.call(flaky, lambda e: isinstance(e, ConnectionError), "op", sleep=sleeps.append) == "ok"
    assert len(calls) == 3 and len(sleeps) == 2
    assert 0.5 <= sleeps[0] <= 1.0 and 1.0 <= sleeps[1] <= 2.0

def test_retry_policy_gives_up_on_permanent_errors_attempts_and_time():
    sleeps: list[float] = []
    with pytest.raises(ValueError):
        RetryPolicy().call(lambda: (_ for _ in ()).throw(ValueError("bad")), lambda e: False, "op", sleep=sleeps.append)
    assert sleeps == []

    def down():
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        RetryPolicy(max_attempts=3, base_delay_s=0.0).call(down, lambda e: True, "op", sleep=sleeps.append)
    assert len(sleeps) == 2
    now = [0.0]
    sleeps.clear()
    policy = RetryPolicy(max_attempts=100, base_delay_s=1.0, max_delay_s=1.0, total_timeout_s=5.0)

    def advance(s):
        sleeps.append(s)
        now[0] += s

    with pytest.raises(ConnectionError):
        policy.call(down, lambda e: True, "op", sleep=advance, clock=lambda: now[0])
    assert sum(sleeps) <= 5.0 and len(sleeps) < 12

@pytest.mark.parametrize("bad", ["acme", "Acme/bot", "acme/../bot", "acme/bot/x", "", "/acme/bot"])
def test_single_adapter_ids_are_validated(tmp_path, bad):
    with pytest.raises(InvalidAdapterIdError):
        LocalSource(tmp_path, adapter_id=bad)
    with pytest.raises(InvalidAdapterIdError):
        S3Source("bucket-x", "a", adapter_id=bad, endpoint_url="http://127.0.0.1:1")
    with pytest.raises(InvalidAdapterIdError):
        source_for_uri(tmp_path.as_uri(), adapter_id=bad)

def test_source_for_uri_takes_adapter_id_for_every_scheme(tmp_path):
    local = source_for_uri(tmp_path.as_uri(), adapter_id="acme/bot")
    assert isinstance(local, LocalSource) and local.adapter_id == "acme/bot"
    s3 = source_for_uri("s3://bucket-x/one/bot", adapter_id="acme/bot", endpoint_url="http://127.0.0.1:1")
    assert isinstance(s3, S3Source) and (s3.prefix, s3.adapter_id) == ("one/bot", "acme/bot")
    hub = source_for_uri("hf://org/repo", adapter_id="acme/bot")
    assert isinstance(hub, HubSource) and hub.root_adapter_id == "acme/bot"
    assert source_for_uri(str(tmp_path)).adapter_id is None  # default: a root of many adapters
