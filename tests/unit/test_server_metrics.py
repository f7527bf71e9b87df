"""gfdit.server.metrics: preemptions, the chunk-degree histogram and per-class SLO attainment, fed
from scheduler records of a simulated run (no server needed)."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import generate_latest

from gfdit.policy import make_policy
from gfdit.request import Request
from gfdit.scheduler import Scheduler
from gfdit.server.metrics import ServerMetrics
from gfdit.sim import simulate
from gfdit.tasks import TaskKind


def test_preemptions_chunk_degrees_and_slo_attainment_per_class():
    engine = SimpleNamespace(
        num_queued=lambda: 0, num_running=lambda: 0, world=SimpleNamespace(size=4),
        graph_pool_stats=lambda: {"graphs": 0, "bytes": 0}, ranks_alive=lambda: 3, num_reruns=2,
    )  # fmt: skip
    m = ServerMetrics(engine, lambda: (True, ""))
    reqs = [
        Request(f"r{i}", "flux-dev", width=s, height=s, num_inference_steps=6, arrival_s=0.05 * i,
                deadline_s=0.05 * i + d, slo_class=c, preemptible=c == "L")
        for i, (s, c, d) in enumerate([(2048, "L", 3.0), (512, "S", 100.0), (1024, "M", 100.0), (512, "S", 0.01)])
    ]  # fmt: skip
    sched = Scheduler(4, make_policy("step-preempt"))
    res = simulate(sched, reqs)
    for r in reqs:
        m.record_end("image", "completed", sched.record(r.request_id), None)
    text = generate_latest(m.registry).decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values["gfdit_preemptions_total"] == sched.num_preemptions
    chunks = [e for e in res.trace if e.task.kind is TaskKind.DENOISE]
    assert values["gfdit_chunk_degree_count"] == len(chunks)
    assert values["gfdit_chunk_degree_sum"] == sum(len(e.ranks) for e in chunks)
    assert values['gfdit_chunk_degree_bucket{le="1.0"}'] == sum(len(e.ranks) == 1 for e in chunks)
    met = {c: [o.met_deadline for rid, o in res.outcomes.items() if sched.record(rid).request.slo_class == c]
           for c in "SML"}  # fmt: skip
    for c in "SML":
        assert values[f'gfdit_slo_attainment{{slo_class="{c}"}}'] == sum(met[c]) / len(met[c])
    assert values['gfdit_slo_attainment{slo_class="S"}'] == 0.5  # one S met, one could not
    # Rank survival: read from the engine at scrape time.
    assert values["gfdit_ranks_alive"] == 3
    assert values["gfdit_requests_rerun_total"] == 2
