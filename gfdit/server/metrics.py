"""Prometheus metrics of one server (one CollectorRegistry per app, so tests can run several).

Gauges read the engine when scraped; the rest is recorded once per request, when it ends, from its
Result and from the scheduler's record of its tasks (RequestRecord.history: ranks, start and end on
the engine clock).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

from gfdit.runtime.handle import Status
from gfdit.tasks import TaskKind

__all__ = ["ServerMetrics", "kLatencyBuckets", "kStepBuckets"]

# Seconds. Requests span ~50 ms (tiny presets on CPU) to ~15 min (Wan 14B 720p on one GPU: 50 steps
# of 12.7 s); steps span ~1 ms (tiny) to ~13 s (DESIGN.md section 2).
kLatencyBuckets = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, float("inf"))
kDegreeBuckets = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, float("inf"))  # SP degrees (le buckets)
kStepBuckets = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, float("inf"))
kBatchBuckets = (1, 2, 3, 4, 6, 8, 12, 16, 32, float("inf"))  # requests per batched chunk (le buckets)


class ServerMetrics:
    """The metrics of one server; `registry` is what GET /metrics exposes."""

    def __init__(self, engine, health) -> None:
        """engine: the Engine (rank 0). health: callable returning (ok, reason) for the gauge."""
        self.registry = r = CollectorRegistry()
        self.queue_depth = Gauge(
            "gfdit_queue_depth", "Accepted requests waiting for their first task", registry=r
        )
        self.queue_depth.set_function(engine.num_queued)
        self.running = Gauge("gfdit_running_requests", "Requests with a task in flight", registry=r)
        self.running.set_function(engine.num_running)
        self.healthy = Gauge(
            "gfdit_healthy",
            "1 while the server admits work (every rank up, or degraded: some lost, the others serving)",
            registry=r,
        )
        self.healthy.set_function(lambda: 1.0 if health()[0] else 0.0)
        self.world_size = Gauge("gfdit_world_size", "Ranks of the engine", registry=r)
        self.world_size.set(engine.world.size)
        self.ranks_alive = Gauge(
            "gfdit_ranks_alive", "Ranks up (neither lost nor hung), rank 0 included", registry=r
        )
        self.ranks_alive.set_function(engine.ranks_alive)
        r.register(_RerunCounter(engine))  # gfdit_requests_rerun_total
        self.requests = Counter(
            "gfdit_requests",
            "Engine requests that ended, by kind and outcome",
            ["kind", "outcome"],
            registry=r,
        )
        self.rejected = Counter(
            "gfdit_rejected",
            "Requests refused at admission (queue full, unavailable)",
            ["reason"],
            registry=r,
        )
        self.http_errors = Counter(
            "gfdit_http_errors", "HTTP error responses, by status", ["status"], registry=r
        )
        self.latency = Histogram(
            "gfdit_request_latency_seconds",
            "Acceptance to result of completed requests",
            ["kind"],
            buckets=kLatencyBuckets,
            registry=r,
        )
        self.queue_wait = Histogram(
            "gfdit_queue_wait_seconds",
            "Acceptance to first task of completed requests",
            ["kind"],
            buckets=kLatencyBuckets,
            registry=r,
        )
        self.step = Histogram(
            "gfdit_step_seconds",
            "Seconds per denoising step of DENOISE tasks (reshard included), by SP degree",
            ["degree"],
            buckets=kStepBuckets,
            registry=r,
        )
        self.reshards = Counter("gfdit_reshards", "Tasks that first moved state between ranks", registry=r)
        self.reshard_seconds = Counter("gfdit_reshard_seconds", "Time tasks spent moving state", registry=r)
        self.reshard_bytes = Counter("gfdit_reshard_bytes", "Bytes moved by reshards", registry=r)
        self.slo_met = Counter("gfdit_slo_met", "Requests with a deadline that completed in time", registry=r)
        self.slo_missed = Counter(
            "gfdit_slo_missed", "Requests with a deadline that completed late or failed", registry=r
        )
        # Rank 0's pool of CUDA-graph-replayed steps (Note [Step graphs]); 0 without CUDA graphs.
        self.graph_pool_graphs = Gauge(
            "gfdit_graph_pool_graphs", "Captured denoising-step CUDA graphs held by rank 0", registry=r
        )
        self.graph_pool_graphs.set_function(lambda: engine.graph_pool_stats()["graphs"])
        self.graph_pool_bytes = Gauge(
            "gfdit_graph_pool_bytes",
            "Device memory of rank 0's step graphs (pools and static inputs)",
            registry=r,
        )
        self.graph_pool_bytes.set_function(lambda: engine.graph_pool_stats()["bytes"])
        self.busy = Counter(
            "gfdit_rank_busy_seconds", "Seconds each rank spent running tasks", ["rank"], registry=r
        )
        self.preemptions = Counter(
            "gfdit_preemptions",
            "Times a request's ranks went to another request at a chunk boundary (it waited or moved)",
            registry=r,
        )
        self.chunk_degree = Histogram(
            "gfdit_chunk_degree",
            "SP degree of each completed DENOISE chunk",
            buckets=kDegreeBuckets,
            registry=r,
        )
        self.chunk_batch_size = Histogram(
            "gfdit_chunk_batch_size",
            "Requests in the batch of each completed DENOISE chunk, one sample per request's chunk (1: alone)",
            buckets=kBatchBuckets,
            registry=r,
        )
        self.slo_attainment = Gauge(
            "gfdit_slo_attainment",
            "Fraction of the ended requests with a deadline that met it, by workload class",
            ["slo_class"],
            registry=r,
        )
        self._slo_counts: dict[str, list[int]] = {}  # class -> [met, ended with a deadline]
        for rank in range(engine.world.size):
            self.busy.labels(rank=str(rank))
        for kind in ("image", "video"):
            for outcome in (Status.COMPLETED, Status.FAILED, Status.CANCELLED):
                self.requests.labels(kind=kind, outcome=outcome)

    def count_error(self, status: int) -> None:
        self.http_errors.labels(status=str(status)).inc()

    def record_end(self, kind: str, outcome: str, record, result) -> None:
        """One request ended. record: its gfdit.scheduler.RequestRecord (or None); result: its
        Result when completed, else None."""
        self.requests.labels(kind=kind, outcome=outcome).inc()
        if result is not None:
            self.latency.labels(kind=kind).observe(result.latency_s)
            self.queue_wait.labels(kind=kind).observe(result.queue_s)
            self.reshards.inc(result.num_reshards)
            self.reshard_seconds.inc(result.reshard_s)
            self.reshard_bytes.inc(result.bytes_moved)
        if record is None:
            return
        self.preemptions.inc(record.num_preemptions)
        if outcome != Status.CANCELLED and record.request.deadline_s is not None:
            (self.slo_met if record.met_deadline else self.slo_missed).inc()
            cls = record.request.slo_class or "none"
            counts = self._slo_counts.setdefault(cls, [0, 0])
            counts[0] += bool(record.met_deadline)
            counts[1] += 1
            self.slo_attainment.labels(slo_class=cls).set(counts[0] / counts[1])
        for t in record.history:
            if t.end_s is None:
                continue
            seconds = max(0.0, t.end_s - t.start_s)
            for rank in t.ranks:
                self.busy.labels(rank=str(rank)).inc(seconds)
            if t.task.kind is TaskKind.DENOISE and t.outcome == "done":
                self.step.labels(degree=str(len(t.ranks))).observe(seconds / t.task.num_steps)
                self.chunk_degree.observe(len(t.ranks))
                self.chunk_batch_size.observe(t.batch_size)


class _RerunCounter:
    """gfdit_requests_rerun_total: the engine's own count (Engine.num_reruns), read at scrape."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def collect(self):
        yield CounterMetricFamily(
            "gfdit_requests_rerun",
            "Requests re-run from their first task after a rank was lost or a peer failed",
            value=self.engine.num_reruns,
        )

    def describe(self):
        return []
