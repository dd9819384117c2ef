"""Atomic writes and locks across processes (lora_core.files)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_core.files import publish_folder
from tests.support.adapter_files import read_folder, write_adapter


def test_publish_folder_is_all_or_nothing(tmp_path):
    dest = tmp_path / "acme" / "bot"
    write_adapter(dest, seed=1)
    before = read_folder(dest)

    def half_written(tmp: Path) -> None:
        (tmp / "adapter_config.json").write_text("{}")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        publish_folder(dest, half_written)
    assert read_folder(dest) == before
    assert sorted(p.name for p in dest.parent.iterdir()) == ["bot"]  # no temp or old folders left

    publish_folder(dest, lambda tmp: (tmp / "adapter_config.json").write_text('{"new": 1}'))
    assert read_folder(dest) == {"adapter_config.json": b'{"new": 1}'}
    assert sorted(p.name for p in dest.parent.iterdir()) == ["bot"]
