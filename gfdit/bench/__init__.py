"""`gfdit bench`: serving benchmarks against a running gf-dit server.

- gfdit.bench.workload: request classes, (piecewise-)Poisson arrivals, SLO deadlines, trace files
- gfdit.bench.client: replays a trace over HTTP at its arrival times; calibration requests
- gfdit.bench.report: throughput, latency percentiles and SLO attainment, per class and per run;
  chunk batch sizes per run
- gfdit.bench.batches: the server's chunk batch-size histogram: scrape, difference over a run, statistics

The CLI is `gfdit bench gen | run | report` (gfdit.cli).
"""

from .workload import (
    Phase,
    RequestClass,
    TraceRecord,
    WorkloadSpec,
    default_classes,
    generate,
    parse_class,
    parse_phases,
    read_trace,
    write_trace,
)

__all__ = [
    "Phase",
    "RequestClass",
    "TraceRecord",
    "WorkloadSpec",
    "default_classes",
    "generate",
    "parse_class",
    "parse_phases",
    "read_trace",
    "write_trace",
]
