"""`build_app`'s args: the demo switch runs the trainer CLI in a process of its own."""

from __future__ import annotations

from adapters_store.sources.local import LocalSource
from cluster.demo_adapters import DEMO_STYLES

TINY = "tiny-random-llama"


def test_the_demo_switch_runs_the_trainer_as_its_own_process_and_watches_its_folder(tmp_path, monkeypatch):
    """`demo_adapters: true` in the app's args: the CLI trains (here on the tiny model) in a
    process of its own, and its folder becomes one of the store's sources."""
    import deployments.app as app

    monkeypatch.setattr(app, "default_demo_adapters_dir", lambda: tmp_path / "demo")
    settings = app.AppArgs.model_validate({"demo_adapters": True, "tenants": {"auth": "none"}, "replica": {"base_model": TINY}})
    with_demo = settings.with_demo_adapters()
    assert [s.uri for s in with_demo.replica.store.sources] == [str(tmp_path / "demo")]
    assert sorted(LocalSource(tmp_path / "demo").list_adapters()) == sorted(style.adapter_id for style in DEMO_STYLES)
    assert with_demo.with_demo_adapters().replica.store.sources == with_demo.replica.store.sources  # added once
