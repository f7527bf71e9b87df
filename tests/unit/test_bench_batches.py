"""Chunk batch sizes in `gfdit bench` (gfdit.bench.batches, the run's scrape, the report): scrapes of
a real prometheus-client histogram with the server's buckets, whose known samples the statistics,
report.json and report.md must give back exactly."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from gfdit.bench import batches
from gfdit.bench.client import scrape_batch_sizes
from gfdit.bench.report import build_report
from gfdit.server.metrics import kBatchBuckets


class ServerHistogram:
    """The server's gfdit_chunk_batch_size (same name and buckets), scraped as /metrics would be."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.hist = Histogram(
            batches.kMetricName, "batch sizes", buckets=kBatchBuckets, registry=self.registry
        )
        # Another histogram in the same exposition must not be mistaken for it.
        Histogram("gfdit_chunk_degree", "degrees", buckets=(1, 2), registry=self.registry).observe(2)

    def observe(self, sizes) -> None:
        for s in sizes:
            self.hist.observe(s)

    def text(self) -> str:
        return generate_latest(self.registry).decode()


def _run_delta(before_sizes, run_sizes) -> dict:
    h = ServerHistogram()
    h.observe(before_sizes)
    before = batches.parse_histogram(h.text())
    h.observe(run_sizes)
    return batches.delta(before, batches.parse_histogram(h.text()))


def test_stats_of_a_run_with_known_sizes():
    # Traffic before the run (sizes 7 and 2) must not count; the run's 8 request-chunks must.
    d = _run_delta([7, 2, 2], [1, 1, 1, 2, 2, 3, 5, 40])
    assert d["count"] == 8 and d["sum"] == 55
    s = batches.stats(d)
    assert s["chunks"] == 8
    assert s["mean"] == pytest.approx(55 / 8)
    assert s["batched_share"] == pytest.approx(5 / 8)
    assert s["histogram"] == {"1": 3, "2": 2, "3": 1, "5-6": 1, ">32": 1}
    assert list(s["histogram"]) == ["1", "2", "3", "5-6", ">32"]  # smallest first
    assert s["max"] is None and s["max_exact"] is False  # in the +Inf bucket: no upper bound


@pytest.mark.parametrize(
    "sizes,max_,exact,share",
    [
        ([1, 1, 1], 1, True, 0.0),
        ([1, 2, 2, 4], 4, True, 0.75),
        ([1, 6, 5], 6, False, 2 / 3),
        ([2, 2], 2, True, 1.0),
    ],
)
def test_max_and_batched_share(sizes, max_, exact, share):
    s = batches.stats(_run_delta([], sizes))
    assert (s["max"], s["max_exact"]) == (max_, exact)
    assert s["batched_share"] == pytest.approx(share)
    assert sum(s["histogram"].values()) == s["chunks"] == len(sizes)
    assert s["mean"] == pytest.approx(sum(sizes) / len(sizes))


def test_a_run_without_chunks_and_a_run_not_recorded():
    s = batches.stats(_run_delta([1, 2], []))
    assert s == {
        "chunks": 0, "mean": None, "max": None, "max_exact": None, "batched_share": None, "histogram": {},
    }  # fmt: skip
    assert batches.stats(None) is None


def test_no_histogram_and_bad_deltas():
    assert batches.parse_histogram("# nothing here\nother_metric 1.0\n") is None
    with pytest.raises(ValueError, match="not a histogram"):
        batches.parse_histogram(f"# TYPE {batches.kMetricName} gauge\n{batches.kMetricName} 3.0\n")
    h = ServerHistogram()
    h.observe([1, 2, 2])
    later = batches.parse_histogram(h.text())
    restarted = batches.parse_histogram(ServerHistogram().text())  # a fresh server: counts at 0
    with pytest.raises(ValueError, match="went down"):
        batches.delta(later, restarted)
    other = {**later, "buckets": later["buckets"][1:]}
    with pytest.raises(ValueError, match="buckets changed"):
        batches.delta(other, later)


class _MetricsHandler(BaseHTTPRequestHandler):
    body = b""
    status = 200

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path != "/metrics":
            self.send_error(404)
            return
        self.send_response(self.status)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def metrics_server():
    handler = type("Handler", (_MetricsHandler,), {})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)  # the OS picks the port
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield handler, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


def test_scrape_over_http(metrics_server):
    handler, url = metrics_server
    h = ServerHistogram()
    h.observe([1, 3])
    handler.body = h.text().encode()
    snapshot, error = scrape_batch_sizes(url)
    assert error is None and snapshot["count"] == 2 and snapshot["sum"] == 4
    handler.body = b"other_metric 1.0\n"
    assert scrape_batch_sizes(url) == (None, "the server exports no gfdit_chunk_batch_size histogram")
    handler.status = 401
    assert scrape_batch_sizes(url) == (None, "GET /metrics answered 401")


def _write_run(path, label: str, delta: dict | None, error: str | None = None) -> str:
    path.mkdir()
    meta = {"label": label, "model": "tiny-flux", "policy": label, "world_size": 2, "num_requests": 2,
            "trace": "t.jsonl", "max_send_lag_s": 0.0}  # fmt: skip
    if delta is not None or error is not None:
        meta["chunk_batch_size"], meta["chunk_batch_size_error"] = delta, error
    (path / "run.json").write_text(json.dumps(meta))
    rows = [
        {"request_id": f"r{i}", "cls": "S", "kind": "image", "arrival_s": 0.0, "sent_s": 0.1 * i,
         "status": "completed", "http_status": 200, "latency_s": 1.0, "slo_s": 2.0, "met_slo": True,
         "server_latency_s": 0.9, "reshards": 0, "error": None}
        for i in range(2)
    ]  # fmt: skip
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_report_shows_batch_sizes_per_run(tmp_path):
    batched = _run_delta([4], [1, 2, 2, 2, 2, 6])
    alone = _run_delta([2, 2], [1, 1, 1, 1])
    dirs = [
        _write_run(tmp_path / "b", "batched", batched),
        _write_run(tmp_path / "a", "alone", alone),
        _write_run(tmp_path / "old", "old", None),  # a run.json from before batch sizes
        _write_run(tmp_path / "refused", "refused", None, "GET /metrics answered 401"),
    ]
    report = build_report(dirs, str(tmp_path / "report"))
    on_disk = json.loads((tmp_path / "report" / "report.json").read_text())
    by_label = {r["label"]: r["chunk_batch_size"] for r in on_disk["runs"]}
    assert by_label == {r["label"]: r["chunk_batch_size"] for r in report["runs"]}
    b = by_label["batched"]
    assert b["chunks"] == 6 and b["mean"] == pytest.approx(15 / 6)
    assert (b["max"], b["max_exact"]) == (6, False)
    assert b["batched_share"] == pytest.approx(5 / 6)
    assert b["histogram"] == {"1": 1, "2": 4, "5-6": 1}
    a = by_label["alone"]
    assert a["chunks"] == 4 and a["mean"] == 1.0 and (a["max"], a["max_exact"]) == (1, True)
    assert a["batched_share"] == 0.0 and a["histogram"] == {"1": 4}
    assert by_label["old"] is None and by_label["refused"] is None

    md = (tmp_path / "report" / "report.md").read_text()
    section = md[md.index("## chunk batch sizes") :]
    assert "| batched | alone | old | refused |" in section
    assert "| request-chunks | 6 | 4 | - | - |" in section
    assert "| mean batch size | 2.50 | 1.00 | - | - |" in section
    assert "| max batch size | <= 6 | 1 | - | - |" in section
    assert "| batched (size >= 2) | 83.3% | 0.0% | - | - |" in section
    assert "| size 1 | 1 | 4 | - | - |" in section
    assert "| size 2 | 4 | 0 | - | - |" in section
    assert "| size 5-6 | 1 | 0 | - | - |" in section
    assert section.index("| size 2 |") < section.index("| size 5-6 |")
    assert "| size 3 |" not in section  # no run had a chunk of that size
    assert "old: no batch sizes (the run predates batch sizes)." in section
    assert "refused: no batch sizes (GET /metrics answered 401)." in section
