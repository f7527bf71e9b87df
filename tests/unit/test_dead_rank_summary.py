"""bench/dead_rank.py's figures from a replay's outcomes (the script runs on GPU machines; its
arithmetic is checked here)."""

from __future__ import annotations

import pytest

from tests.bench_scripts import load_bench_script


def _module():
    return load_bench_script("dead_rank")


def _row(rid, sent, latency, status="completed"):
    return {"request_id": rid, "sent_s": sent, "latency_s": latency, "status": status, "error": None}


def test_summary_counts_the_requests_in_flight_at_the_kill():
    start, kill = 1000.0, 1010.0
    rows = [
        _row("a", 1.0, 2.0),  # done at 3 s: before the kill
        _row("b", 8.0, 3.0),  # in flight (8 -> 11): completes 1 s after the kill
        _row("c", 9.5, 4.0),  # in flight (9.5 -> 13.5)
        _row("d", 12.0, 1.0),  # sent after the kill, done at 13
        _row("e", 9.0, None, status="error"),  # in flight, never completed
        _row("f", 11.0, None, status="rejected"),
    ]
    s = _module().summarize(rows, start, kill, degraded_at=kill + 0.25)
    assert (s["requests"], s["accepted"], s["completed"]) == (6, 5, 4)
    assert (s["in_flight_at_kill"], s["in_flight_completed"]) == (3, 2)
    assert s["kill_to_degraded_s"] == pytest.approx(0.25)
    assert s["kill_to_first_completion_s"] == pytest.approx(1.0)
    assert s["kill_to_last_in_flight_s"] == pytest.approx(3.5)
    assert s["mean_latency_sent_before_s"] == pytest.approx(3.0)  # a, b, c
    assert s["mean_latency_sent_after_s"] == pytest.approx(1.0)
    assert [f["id"] for f in s["failed"]] == ["e", "f"]
