"""`benchmarks.load`'s summary of what locust recorded: 503 with Retry-After is counted apart
from the 5xx errors, and the quiet tenant's p99 alone and under the flood."""

from __future__ import annotations

from benchmarks.load import summarize


def result(statuses: dict[str, int], latencies: list[float], retry_after_503: int = 0) -> dict:
    return {"status_counts": statuses, "latencies_ms": latencies, "retry_after_503": retry_after_503}


def test_the_summary_counts_5xx_apart_from_503_with_retry_after_and_compares_the_quiet_p99():
    alone = {"acme": result({"200": 4}, [10.0, 11.0, 12.0, 20.0])}
    flood = {"acme": result({"200": 4}, [15.0, 16.0, 18.0, 30.0]),
             "initech": result({"200": 2, "429": 5, "503": 3, "500": 1}, [40.0, 50.0], retry_after_503=2)}
    summary = summarize(alone, flood, rss_before=100 * 2**20, rss_after=160 * 2**20)
    assert summary["requests"] == 15 and summary["status_counts"] == {"200": 6, "429": 5, "500": 1, "503": 3}
    assert summary["errors_5xx"] == 2 and summary["retry_after_503"] == 2  # one 503 without Retry-After, one 500
    assert summary["p99_quiet_tenant_ms_alone"] == 20.0 and summary["p99_quiet_tenant_ms_with_flood"] == 30.0
    assert summary["quiet_p99_ratio"] == 1.5 and summary["rss_growth_mb"] == 60.0
    assert summary["goals_met"] == {"no_5xx": False, "quiet_p99_within_2x": True, "rss_growth_under_50_mb": False}
