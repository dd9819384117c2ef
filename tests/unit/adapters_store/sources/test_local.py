"""LocalSource: adapters in a folder, a root of many or one adapter's own folder."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import time
from pathlib import Path

import pytest

from adapters_store.sources import FileHashCache, LocalSource
from lora_core.errors import AdapterNotFoundError, InvalidAdapterError, InvalidRequestError, SourceUnavailableError
from tests.support.adapter_files import FILES, adapter_files, read_folder, write_adapter


@pytest.fixture
def local_root(tmp_path):
    root = tmp_path / "src"
    write_adapter(root / "acme" / "bot", seed=1)
    write_adapter(root / "shared" / "sql", r=8, seed=2)
    (root / "acme" / "empty").mkdir()  # no files yet: not an adapter
    write_adapter(root / "Bad Tenant" / "x")
    write_adapter(root / "acme" / "UPPER")
    write_adapter(root / ".staging" / "x")
    return root

def test_local_lists_valid_adapters_and_reports_skipped_ones(local_root):
    source = LocalSource(local_root)
    adapters = source.list_adapters()
    assert sorted(adapters) == ["acme/bot", "shared/sql"]
    bot = adapters["acme/bot"]
    assert bot.version.startswith("sha256:")
    assert [f.name for f in bot.files] == list(FILES)
    assert bot.size_bytes == sum(len(b) for b in adapter_files(seed=1).values())
    assert bot.files[1].etag == hashlib.sha256(adapter_files(seed=1)["adapter_model.safetensors"]).hexdigest()
    assert sorted(Path(p).name for p in source.skipped) == ["UPPER", "x"]
    assert any("uppercase" in reason for reason in source.skipped.values())
    assert source.version_of(bot) == bot.version
    assert pickle.loads(pickle.dumps(bot)) == bot  # records cross Ray actor boundaries

def test_local_version_follows_content_not_mtime(local_root):
    source = LocalSource(local_root)
    first = source.list_adapters()["acme/bot"]
    folder = local_root / "acme" / "bot"
    write_adapter(folder, seed=1)  # same bytes again, new mtime
    assert source.list_adapters()["acme/bot"].version == first.version
    write_adapter(folder, seed=99)  # same sizes, new weights
    changed = source.list_adapters()["acme/bot"]
    assert changed.version != first.version
    assert source.version_of(first) == changed.version
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 3}))
    assert source.list_adapters()["acme/bot"].version not in (first.version, changed.version)

def _age(root: Path) -> None:
    """Files written an hour ago: past the racy window, so their hashes are cached."""
    old = time.time() - 3600
    for path in root.rglob("*"):
        os.utime(path, (old, old))


def test_local_hash_cache_skips_rehashing_unchanged_files(local_root):
    _age(local_root)
    cache = FileHashCache(max_entries=8)
    source = LocalSource(local_root, hash_cache=cache)
    first = source.list_adapters()
    assert (cache.misses, cache.hits) == (4, 0)
    assert source.list_adapters() == first
    assert (cache.misses, cache.hits) == (4, 4)
    small = FileHashCache(max_entries=2)
    assert LocalSource(local_root, hash_cache=small).list_adapters() == first
    assert len(small) == 2  # bounded


def test_a_hash_cache_smaller_than_the_root_still_hits_and_forgets_removed_files(local_root):
    """A listing reads the files in the same order every time: an LRU smaller than the root would
    evict each file just before it is read again (no hits ever)."""
    _age(local_root)
    cache = FileHashCache(max_entries=2)
    source = LocalSource(local_root, hash_cache=cache)
    first = source.list_adapters()
    assert source.list_adapters() == first
    assert (cache.misses, cache.hits) == (4 + 2, 2)
    kept = sorted(cache._entries)
    shutil.rmtree(Path(kept[0]).parent)
    source.list_adapters()
    assert all(Path(path).parent.exists() for path in cache._entries)


def test_local_hash_cache_rehashes_recently_written_files(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"a" * 10)
    cache = FileHashCache()
    first, _ = cache.sha256(path)
    stat = path.stat()
    path.write_bytes(b"b" * 10)  # same size; maybe the same mtime tick
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert cache.sha256(path)[0] != first

def test_local_fetch_copies_both_files(local_root, tmp_path):
    source = LocalSource(local_root)
    bot = source.list_adapters()["acme/bot"]
    dest = source.fetch(bot, tmp_path / "dest" / "acme" / "bot")
    assert read_folder(dest) == adapter_files(seed=1)

def test_local_fetch_refuses_a_version_that_changed_after_listing(local_root, tmp_path):
    source = LocalSource(local_root)
    bot = source.list_adapters()["acme/bot"]
    write_adapter(local_root / "acme" / "bot", seed=5)
    with pytest.raises(SourceUnavailableError, match="changed since it was listed"):
        source.fetch(bot, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()

def test_local_missing_weights_and_pickles_are_refused_at_fetch(local_root, tmp_path):
    (local_root / "acme" / "nocfg").mkdir()
    (local_root / "acme" / "nocfg" / "adapter_model.safetensors").write_bytes(
        adapter_files()["adapter_model.safetensors"])
    (local_root / "acme" / "pickled").mkdir()
    (local_root / "acme" / "pickled" / "adapter_config.json").write_text("{}")
    (local_root / "acme" / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    source = LocalSource(local_root)
    adapters = source.list_adapters()
    with pytest.raises(InvalidAdapterError) as info:
        source.fetch(adapters["acme/pickled"], tmp_path / "d1")
    assert info.value.reason == "pickle_file"
    with pytest.raises(InvalidAdapterError) as info:
        source.fetch(adapters["acme/nocfg"], tmp_path / "d2")
    assert info.value.reason == "missing_file"
    outcome = source.fetch_many(adapters.values(), tmp_path / "many")
    assert sorted(outcome.fetched) == ["acme/bot", "shared/sql"]
    assert {k: v.reason for k, v in outcome.failed.items()} == {"acme/nocfg": "missing_file",
                                                                "acme/pickled": "pickle_file"}
    assert read_folder(tmp_path / "many" / "shared" / "sql") == adapter_files(r=8, seed=2)

def test_local_removed_adapter_and_missing_root(local_root, tmp_path):
    source = LocalSource(local_root)
    bot = source.list_adapters()["acme/bot"]
    for name in FILES:
        (local_root / "acme" / "bot" / name).unlink()
    with pytest.raises(AdapterNotFoundError):
        source.version_of(bot)
    with pytest.raises(SourceUnavailableError, match="does not exist"):
        LocalSource(tmp_path / "nowhere").list_adapters()

def test_local_symlink_out_of_the_root_is_skipped(local_root, tmp_path):
    outside = tmp_path / "outside"
    write_adapter(outside)
    (local_root / "acme" / "escape").symlink_to(outside, target_is_directory=True)
    source = LocalSource(local_root)
    assert "acme/escape" not in source.list_adapters()
    assert any("outside" in reason for reason in source.skipped.values())

def test_local_single_adapter_lists_fetches_and_follows_changes(tmp_path):
    folder = tmp_path / "bot"
    write_adapter(folder, seed=1)
    write_adapter(folder / "acme" / "nested", seed=2)  # below the folder: not part of it
    source = LocalSource(folder, adapter_id="acme/bot")
    assert "acme/bot" in repr(source)
    adapters = source.list_adapters()
    assert list(adapters) == ["acme/bot"]
    bot = adapters["acme/bot"]
    assert bot.location == folder.as_uri()
    assert [f.name for f in bot.files] == list(FILES)
    assert source.version_of(bot) == bot.version
    assert read_folder(source.fetch(bot, tmp_path / "out" / "acme" / "bot")) == adapter_files(seed=1)
    write_adapter(folder, seed=3)
    assert source.version_of(bot) != bot.version
    assert source.list_adapters()["acme/bot"].version == source.version_of(bot)
    with pytest.raises(SourceUnavailableError, match="changed since it was listed"):
        source.fetch(bot, tmp_path / "stale")
    outcome = source.fetch_many(source.list_adapters().values(), tmp_path / "many")
    assert read_folder(tmp_path / "many" / "acme" / "bot") == adapter_files(seed=3) and not outcome.failed
    # an adapter listed by a root source over a subfolder is not this source's
    nested = LocalSource(folder).list_adapters()["acme/nested"]
    with pytest.raises(InvalidRequestError, match="not in this source"):
        source.fetch(nested, tmp_path / "other")

def test_local_single_adapter_empty_missing_and_removed(tmp_path):
    folder = tmp_path / "bot"
    folder.mkdir()
    source = LocalSource(folder, adapter_id="shared/bot")
    assert source.list_adapters() == {}  # no adapter file yet
    write_adapter(folder)
    bot = source.list_adapters()["shared/bot"]
    for name in FILES:
        (folder / name).unlink()
    assert source.list_adapters() == {}
    with pytest.raises(AdapterNotFoundError):
        source.version_of(bot)
    with pytest.raises(SourceUnavailableError, match="does not exist"):
        LocalSource(tmp_path / "nowhere", adapter_id="acme/bot").list_adapters()

def test_local_single_adapter_file_linking_outside_is_skipped(tmp_path):
    outside = tmp_path / "outside"
    write_adapter(outside)
    folder = tmp_path / "bot"
    folder.mkdir()
    for name in FILES:
        (folder / name).symlink_to(outside / name)
    source = LocalSource(folder, adapter_id="acme/bot")
    assert source.list_adapters() == {}
    assert list(source.skipped) == [str(folder)] and "outside" in source.skipped[str(folder)]

def test_fetch_logs_each_file_with_its_size(local_root, tmp_path, caplog):
    source = LocalSource(local_root, show_progress=True)  # stderr is not a TTY here: log lines only
    bot = source.list_adapters()["acme/bot"]
    with caplog.at_level(logging.INFO, logger="adapters_store.sources"):
        source.fetch(bot, tmp_path / "dest")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith(f"fetched acme/bot/adapter_config.json ({bot.files[0].size_bytes} B) in ")
    assert lines[1].startswith("fetched acme/bot/adapter_model.safetensors (1.5 KB) in ")
