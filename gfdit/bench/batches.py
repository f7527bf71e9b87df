"""Batch sizes of the DENOISE chunks a benchmark run made the server run (issue 16).

Source: the server's Prometheus histogram `gfdit_chunk_batch_size` (gfdit.server.metrics), one
sample per request's completed DENOISE chunk: 1 when the chunk ran alone, B when it ran in a batch
of B requests (so a batch of 3 adds three samples of 3). `gfdit bench run` scrapes GET /metrics
just before its first request and again after its last result, and keeps the difference
(`delta`): the chunks of the requests that ended between the two scrapes. The HTTP responses do
not carry per-request batch sizes, so this is the one source the client has; it is per run, not
per request class, and it counts every request that ended meanwhile, so the run should be the
server's only traffic. A request is recorded in the histogram before its response is sent, so
every completed request of the run is inside the window; a request the client gave up on
(timeout) but the server finished later is not.

A snapshot or a delta is a dict `{"buckets": [[le, cumulative count], ...], "count": n,
"sum": s}`, `le` a number or "+Inf" (JSON has no infinity), in increasing order as Prometheus
exposes them. `stats` turns a delta into what the report shows.
"""

from __future__ import annotations

import math

__all__ = ["kMetricName", "parse_histogram", "delta", "stats"]

kMetricName = "gfdit_chunk_batch_size"
kInf = "+Inf"


def parse_histogram(text: str, name: str = kMetricName) -> dict | None:
    """The snapshot of histogram `name` in Prometheus exposition `text`; None when the text has no
    such histogram (a server from before batch sizes were exported). ValueError: malformed text."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        if family.type != "histogram":
            raise ValueError(f"{name} is a {family.type}, not a histogram")
        buckets, count, total = [], None, None
        for s in family.samples:
            if s.name == f"{name}_bucket":
                le = s.labels["le"]
                buckets.append([kInf if math.isinf(float(le)) else float(le), s.value])
            elif s.name == f"{name}_count":
                count = s.value
            elif s.name == f"{name}_sum":
                total = s.value
        if not buckets or count is None or total is None:
            raise ValueError(f"{name}: buckets, _count or _sum missing")
        buckets.sort(key=lambda b: math.inf if b[0] == kInf else b[0])
        return {"buckets": buckets, "count": count, "sum": total}
    return None


def delta(before: dict, after: dict) -> dict:
    """after - before, bucket by bucket. ValueError when the buckets differ or a count went down
    (the server restarted between the scrapes): no honest difference exists then."""
    les_before = [b[0] for b in before["buckets"]]
    les_after = [b[0] for b in after["buckets"]]
    if les_before != les_after:
        raise ValueError(f"the histogram's buckets changed between scrapes: {les_before} -> {les_after}")
    buckets = [[le, a - b] for (le, b), (_, a) in zip(before["buckets"], after["buckets"], strict=True)]
    out = {"buckets": buckets, "count": after["count"] - before["count"], "sum": after["sum"] - before["sum"]}
    if out["count"] < 0 or any(c < 0 for _, c in buckets):
        raise ValueError("the histogram's counts went down between scrapes (did the server restart?)")
    return out


def _label(low: float, high: float | str) -> str:
    """The batch sizes of the bucket (low, high]: sizes are integers >= 1."""
    first = int(low) + 1
    if high == kInf:
        return f">{int(low)}"
    return str(first) if int(high) == first else f"{first}-{int(high)}"


def stats(hist: dict | None) -> dict | None:
    """What the report shows of a run's delta (None stays None: not recorded):
    chunks: samples (request-chunks); mean: exact (sum / count); max: the upper bound of the highest
    non-empty bucket (None when it is the +Inf bucket), max_exact: whether that bucket holds one size
    only (1, 2, 3, 4 with the server's buckets); batched_share: the fraction of request-chunks that
    ran in a batch of 2 or more (needs an le=1 bucket); histogram: {sizes: request-chunks} of the
    non-empty buckets, smallest first ("1", "2", ..., "5-6", ">32")."""
    if hist is None:
        return None
    count = int(round(hist["count"]))
    out = {
        "chunks": count,
        "mean": None,
        "max": None,
        "max_exact": None,
        "batched_share": None,
        "histogram": {},
    }
    if count == 0:
        return out
    out["mean"] = hist["sum"] / count
    low, previous = 0.0, 0.0
    for le, cumulative in hist["buckets"]:
        n = int(round(cumulative - previous))
        if n > 0:
            out["histogram"][_label(low, le)] = n
            out["max"] = None if le == kInf else int(le)
            out["max_exact"] = le != kInf and int(le) == int(low) + 1
        if le == 1.0:
            out["batched_share"] = (count - cumulative) / count
        previous = cumulative
        if le != kInf:
            low = le
    return out
