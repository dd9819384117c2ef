"""The Grafana dashboard charts only metrics the code exports, under Ray's exported names."""

from __future__ import annotations

import json
import re

from lora_core.paths import REPO_ROOT

DASHBOARD = REPO_ROOT / "cluster" / "grafana-dashboard.json"
DEFINED = re.compile(r'"(lora_serve_[a-z_]+)"')
USED = re.compile(r"ray_(lora_serve_[a-z_]+?)(?:_total|_bucket|_count|_sum)?\b")


def defined_metrics() -> set[str]:
    sources = [REPO_ROOT / "deployments" / "metrics.py", REPO_ROOT / "adapters_store" / "store.py"]
    return {name for path in sources for name in DEFINED.findall(path.read_text())}


def test_every_panel_queries_a_defined_metric_and_every_metric_is_charted():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {name for expr in exprs for name in USED.findall(expr)}
    defined = defined_metrics()
    assert used and used <= defined, used - defined
    assert defined <= used, f"not charted: {defined - used}"
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
