"""Requests, trajectories, the cost model, the scheduler's events, and whole runs in the simulator."""

from __future__ import annotations

import math
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from gfdit.cost import (
    MEASURED_STEP_S,
    AnalyticCostModel,
    get_profile,
    state_dim_size,
    valid_sp_degrees,
)
from gfdit.layout import Layout, order_ranks_for_reuse
from gfdit.policy import Assignment, Policy, make_policy
from gfdit.request import Request, RequestState
from gfdit.scheduler import Scheduler
from gfdit.sim import RequestClass, SimulationStalled, make_workload, simulate
from gfdit.tasks import Task, TaskKind, TaskTimings, Trajectory, make_trajectory

D = TaskKind.DENOISE

MIXED = [
    RequestClass("img512", "flux-dev", 512, 512, num_inference_steps=12, weight=3),
    RequestClass("img1024", "flux-dev", 1024, 1024, num_inference_steps=12, weight=3),
    RequestClass("img2048", "flux-dev", 2048, 2048, num_inference_steps=12, weight=1),
    RequestClass("vid480", "wan2.1-1.3b", 832, 480, num_frames=81, num_inference_steps=10, weight=2),
    RequestClass("vid720", "wan2.1-1.3b", 1280, 720, num_frames=33, num_inference_steps=10, weight=1),
]
POLICIES = [
    "static",
    "static:sp=2",
    "static:sp=4",
    "static:sp=2,max_batch=4",
    "fcfs-elastic",
    "edf-best-fit",
    "srtf",
    "srtf:chunk=4,max_sp=2",
]


class _Fixed(Policy):
    """Returns the same assignments every time."""

    name = "fixed"

    def __init__(self, out: list[Assignment]) -> None:
        self.out = out

    def schedule(self, view):
        return list(self.out)


# Requests and trajectories.


def test_package_import_is_light():
    code = "import sys, gfdit; assert 'torch' not in sys.modules; print(len(gfdit.__all__))"
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert int(out.stdout) >= 20


def test_request_validation():
    Request("a", "flux-dev")
    for kwargs, field in [
        ({"request_id": ""}, "request_id"),
        ({"width": 0}, "width"),
        ({"height": 1.5}, "height"),
        ({"num_frames": 0}, "num_frames"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"deadline_s": math.inf}, "deadline_s"),
        ({"guidance_scale": math.nan}, "guidance_scale"),
    ]:
        with pytest.raises(ValueError, match=field):
            Request(**{"request_id": "a", "model": "flux-dev", **kwargs})
    assert Request("v", "wan2.1-1.3b", width=832, height=480, num_frames=81).num_pixels == 832 * 480 * 81
    assert RequestState.DONE.is_terminal and not RequestState.WAITING.is_terminal


def test_make_trajectory_chunks_and_ends():
    tasks = make_trajectory(Request("a", "flux-dev", num_inference_steps=5), chunk_steps=2)
    assert tasks == [
        Task("a", TaskKind.ENCODE),
        Task("a", D, 0, 2),
        Task("a", D, 2, 4),
        Task("a", D, 4, 5),
        Task("a", TaskKind.DECODE),
    ]
    assert [len(make_trajectory(Request("a", "flux-dev", num_inference_steps=n))) for n in (1, 28)] == [3, 16]


def test_trajectory_rechunks_after_a_different_chunk():
    t = Trajectory("a", 7, chunk_steps=2)
    t.advance(Task("a", TaskKind.ENCODE))
    t.advance(Task("a", D, 0, 3))  # a policy ran 3 steps at once
    assert t.head() == Task("a", D, 3, 5) and t.remaining_steps == 4
    with pytest.raises(ValueError, match="does not continue"):
        t.advance(Task("a", D, 4, 6))
    with pytest.raises(ValueError, match="not the next task"):
        t.advance(Task("a", TaskKind.DECODE))
    t.advance(Task("a", D, 3, 7))
    assert t.head() == Task("a", TaskKind.DECODE)
    t.advance(Task("a", TaskKind.DECODE))
    assert t.finished and t.head() is None
    with pytest.raises(ValueError, match="finished"):
        t.advance(Task("a", TaskKind.DECODE))
    with pytest.raises(ValueError, match="start < end"):
        Task("a", D, 2, 2)
    with pytest.raises(ValueError, match="no step range"):
        Task("a", TaskKind.ENCODE, 0, 1)


# Cost model.


def test_analytic_cost_model_reproduces_measurements_and_scales():
    cost = AnalyticCostModel()
    for model, points in MEASURED_STEP_S.items():
        for (w, h, f), seconds in points.items():
            assert cost.step_time(model, w, h, f, 1) == pytest.approx(seconds, rel=1e-9)
    # Large requests gain from SP; the gain per rank shrinks for small ones.
    big = [cost.step_time("wan2.1-14b", 1280, 720, 81, d) for d in (1, 2, 4, 8)]
    assert big[0] > big[1] > big[2] > big[3] and big[0] / big[3] > 6
    small = [cost.step_time("flux-dev", 512, 512, None, d) for d in (1, 2, 4, 8)]
    assert small[0] / small[3] < 1.5 and small[3] > 0.95 * small[2]  # fixed cost and communication
    assert cost.reshard_time(0) == 0 and cost.reshard_time(10**9) > cost.reshard_time(10**6) > 0
    with pytest.raises(ValueError, match="unknown model preset 'nope'; known: flux-dev, .*tiny-flux"):
        cost.step_time("nope", 512, 512, None, 1)


def test_geometry_tokens_and_valid_degrees():
    wan480 = Request("a", "wan2.1-1.3b", width=832, height=480, num_frames=81)
    assert state_dim_size(wan480) == 21 * 30 * 52
    assert valid_sp_degrees(wan480, 8) == (1, 2, 3, 4, 6)  # 12 heads
    assert valid_sp_degrees(Request("b", "flux-dev", width=1024, height=1024), 8) == (1, 2, 4, 8)
    assert get_profile("wan2.1-14b").num_heads == 40


def test_cost_model_learns_from_observations():
    cost = AnalyticCostModel(ema=0.5)
    base = cost.step_time("flux-dev", 1024, 1024, None, 2)
    cost.observe(D, "flux-dev", 1024, 1024, None, 2, seconds=4 * base * 3, num_steps=3)  # per step 3x
    assert cost.step_time("flux-dev", 1024, 1024, None, 2) == pytest.approx(4 * base)
    cost.observe(D, "flux-dev", 1024, 1024, None, 2, seconds=2 * base, num_steps=1)
    assert cost.step_time("flux-dev", 1024, 1024, None, 2) == pytest.approx(3 * base)  # EMA, weight 0.5
    # An unseen shape falls back to the analytic estimate times the learned per-model factor.
    factor = cost.factor(D, "flux-dev")
    assert factor == pytest.approx(3.0)
    analytic = cost.analytic_step_time("flux-dev", 2048, 2048, None, 4)
    assert cost.step_time("flux-dev", 2048, 2048, None, 4) == pytest.approx(3.0 * analytic)
    assert cost.step_time("wan2.1-1.3b", 832, 480, 81, 1) == pytest.approx(0.653)  # other models untouched
    with pytest.raises(ValueError, match="finite"):
        cost.observe(D, "flux-dev", 1024, 1024, None, 2, seconds=-1.0)


# Scheduler events.


def dispatch(sched: Scheduler, rid: str, ranks, now: float, num_steps=None) -> Assignment:
    view = sched.view(now)
    (rt,) = [rt for rt in view.runnable if rt.request_id == rid]
    saved = sched.policy
    sched.policy = _Fixed([Assignment(rt.task, tuple(ranks), num_steps)])
    try:
        (a,) = sched.schedule(now)
    finally:
        sched.policy = saved
    return a


def test_layout_follows_the_trajectory_and_reshards_are_planned():
    sched = Scheduler(4, make_policy("srtf"), chunk_steps=2)
    rec = sched.submit(Request("a", "flux-dev", width=1024, height=1024, num_inference_steps=4))
    n = rec.dim_size
    a = dispatch(sched, "a", (2, 0), 0.0)
    assert a.reshard is None and rec.state is RequestState.RUNNING and sched.free_ranks == (1, 3)
    sched.on_task_done(a.task, a.ranks, TaskTimings(0.0, 0.1))
    assert rec.layout == Layout.sharded((2, 0), 1) and rec.state is RequestState.WAITING
    order = order_ranks_for_reuse(rec.layout, range(4), n)
    assert order.index(2) in (0, 1) and order.index(0) in (2, 3)
    a = dispatch(sched, "a", order, 0.1, num_steps=3)  # more steps than the listed chunk
    assert a.task == Task("a", D, 0, 3) and a.num_steps == 3
    assert a.reshard.elements_kept == n // 2 and a.reshard.elements_moved == n // 2  # 2 -> 4 ranks
    sched.on_task_done(a.task, a.ranks, TaskTimings(0.1, 0.5, 0.01))
    assert rec.num_reshards == 1 and rec.bytes_moved == a.reshard.bytes_moved(256)
    order = order_ranks_for_reuse(rec.layout, {0, 1}, n)
    assert order == [1, 0]  # rank 1 holds a quarter of the first half, rank 0 one of the second
    a = dispatch(sched, "a", order, 0.5)
    assert a.task == Task("a", D, 3, 4) and a.reshard.elements_kept == n // 2
    sched.on_task_done(a.task, a.ranks, TaskTimings(0.5, 0.6))
    a = dispatch(sched, "a", (0, 1), 0.6)  # DECODE on the same 2 ranks in the other order
    assert a.task.kind is TaskKind.DECODE and a.reshard.elements_moved == n
    sched.on_task_done(a.task, a.ranks, TaskTimings(0.6, 0.7))  # DECODE ends the request
    assert rec.state is RequestState.DONE and rec.layout is None and rec.latency_s == pytest.approx(0.7)
    assert rec.num_reshards == 3 and rec.num_group_changes == 3 and len(rec.history) == 4
    assert sched.free_ranks == (0, 1, 2, 3) and sched.num_active == 0


def test_submit_cancel_fail_and_retry():
    sched = Scheduler(2, make_policy("fcfs-elastic"), max_retries=1)
    sched.submit(Request("a", "flux-dev"))
    with pytest.raises(ValueError, match="duplicate"):
        sched.submit(Request("a", "flux-dev"))
    with pytest.raises(ValueError, match="unknown model"):
        sched.submit(Request("b", "sd3"))
    with pytest.raises(ValueError, match="image model"):
        sched.submit(Request("b", "flux-dev", num_frames=9))
    # Cancel while waiting: ends at once.
    sched.submit(Request("w", "flux-dev"))
    assert sched.cancel("w", 0.0) and sched.record("w").state is RequestState.CANCELLED
    assert not sched.cancel("w", 0.1)
    # Fail with retry: runnable again, its state where it was; the second failure is final.
    a = dispatch(sched, "a", (0,), 0.0)
    with pytest.raises(ValueError, match="runs on"):
        sched.on_task_done(a.task, (1,), TaskTimings(0.0, 1.0))
    sched.on_task_failed(a.task, a.ranks, "worker lost", 1.0, retry=True)
    assert sched.record("a").state is RequestState.WAITING and sched.record("a").num_retries == 1
    a = dispatch(sched, "a", (1,), 1.0)
    assert a.task.kind is TaskKind.ENCODE
    sched.on_task_failed(a.task, a.ranks, "worker lost again", 2.0, retry=True)
    rec = sched.record("a")
    assert rec.state is RequestState.FAILED and rec.error == "worker lost again" and rec.met_deadline is None
    with pytest.raises(ValueError, match="is not running"):
        sched.on_task_done(a.task, a.ranks, TaskTimings(0.0, 1.0))
    # Cancel while running: ends when the task reports.
    sched.submit(Request("c", "flux-dev"))
    a = dispatch(sched, "c", (0,), 3.0)
    assert sched.cancel("c", 3.1) and sched.record("c").state is RequestState.RUNNING
    sched.on_task_done(a.task, a.ranks, TaskTimings(3.0, 3.5))
    assert sched.record("c").state is RequestState.CANCELLED and sched.free_ranks == (0, 1)


def test_keep_finished_bounds_the_records_and_decisions_see_unfinished_only():
    sched = Scheduler(2, make_policy("fcfs-elastic"), keep_finished=2)
    with pytest.raises(ValueError, match="keep_finished"):
        Scheduler(2, make_policy("fcfs-elastic"), keep_finished=-1)
    ids = [f"r{i}" for i in range(6)]
    for rid in ids[:5]:
        sched.submit(Request(rid, "flux-dev", width=512, height=512, num_inference_steps=2))
    assert sched.cancel("r4", 0.0)  # ends while waiting: the first finished record
    t = 0.0
    while sched.num_active:
        for a in sched.schedule(t):
            sched.on_task_done(a.task, a.ranks, TaskTimings(t, t + 0.1))
        t += 0.1
        kept_finished = [r for r in sched.records.values() if r.state.is_terminal]
        assert len(kept_finished) <= 2
        assert set(sched.active) == {rid for rid, r in sched.records.items() if not r.state.is_terminal}
    assert list(sched.active) == [] and len(sched.records) == 2
    done = sorted(sched.records.values(), key=lambda r: r.finish_s)
    assert all(r.state is RequestState.DONE for r in done)
    with pytest.raises(KeyError, match="unknown request 'r4'"):
        sched.record("r4")  # forgotten: the oldest finished
    sched.submit(Request(ids[5], "flux-dev"))  # the scheduler keeps working after forgetting
    assert list(sched.active) == ["r5"] and sched.view(t).runnable[0].request_id == "r5"


# Whole runs in the simulator.


def mixed_workload(alpha: float | None = None, seed: int = 3, rate: float = 2.0):
    return make_workload(MIXED, 20, rate_rps=rate, alpha=alpha, cost_model=AnalyticCostModel(), seed=seed)


def check_trace(result, requests):
    """Ranks never run two tasks at once, except the members of one batch (same group, same start);
    each request's tasks run one at a time, in trajectory order, with its DENOISE chunks tiling
    [0, steps)."""
    runs = {}  # (ranks, start) -> end of the batch (a task alone is a batch of one)
    for e in result.trace:
        assert e.end_s >= e.start_s
        key = (e.ranks, e.start_s)
        runs[key] = max(runs.get(key, e.end_s), e.end_s)
    by_rank = defaultdict(list)
    for (ranks, start), end in runs.items():
        for r in ranks:
            by_rank[r].append((start, end))
    for spans in by_rank.values():
        spans.sort()
        assert all(a[1] <= b[0] + 1e-12 for a, b in zip(spans, spans[1:], strict=False))
    for r in requests:
        entries = [e for e in result.trace if e.task.request_id == r.request_id]
        kinds = [e.task.kind for e in entries]
        assert kinds[0] is TaskKind.ENCODE and kinds[-1] is TaskKind.DECODE
        chunks = [e.task for e in entries if e.task.kind is D]
        assert chunks[0].start == 0 and chunks[-1].end == r.num_inference_steps
        assert all(a.end == b.start for a, b in zip(chunks, chunks[1:], strict=False))
        assert all(a.end_s <= b.start_s + 1e-12 for a, b in zip(entries, entries[1:], strict=False))


@pytest.mark.parametrize("spec", POLICIES)
def test_every_policy_completes_a_mixed_batch(spec):
    requests = mixed_workload()
    assert {r.request_id.split("-")[0] for r in requests} == {c.name for c in MIXED}
    sched = Scheduler(4, make_policy(spec))
    result = simulate(sched, requests)
    assert result.num_done == 20 and sched.num_active == 0
    check_trace(result, requests)
    assert all(o.latency_s > 0 for o in result.outcomes.values())
    assert result.throughput_rps > 0 and result.latency_percentile(99) >= result.mean_latency_s > 0
    if spec.startswith("static") and sched.policy.max_batch == 1:
        # A fixed pipeline without batching never moves or pauses a request (batching may: a batch
        # waits for a newcomer's ENCODE on its ranks, Note [Encoding ahead for batches]).
        assert all(o.num_reshards == 0 and o.num_preemptions == 0 for o in result.outcomes.values())
    if spec != "static:sp=4":  # disjoint groups run at the same time
        assert max_concurrency(result.trace) >= 2


def max_concurrency(trace) -> int:
    events = sorted([(e.start_s, 1) for e in trace] + [(e.end_s, -1) for e in trace])
    level = best = 0
    for _, delta in events:
        level += delta
        best = max(best, level)
    return best


def test_edf_best_fit_meets_more_deadlines_than_static():
    requests = mixed_workload(alpha=2.0, seed=5, rate=1.0)
    attained = {}
    for spec in ["static", "static:sp=4", "edf-best-fit"]:
        result = simulate(Scheduler(4, make_policy(spec)), requests)
        assert result.num_done == 20
        attained[spec] = result.deadline_attainment
    assert attained["edf-best-fit"] > max(attained["static"], attained["static:sp=4"])
    assert attained["edf-best-fit"] >= 0.9


def test_preemption_happens_at_chunk_boundaries_only():
    # A long video first, then a stream of short images: SRTF makes the video wait between chunks.
    requests = [Request("video", "wan2.1-1.3b", width=832, height=480, num_frames=81, num_inference_steps=10)]
    requests += [
        Request(f"img{i}", "flux-dev", width=512, height=512, num_inference_steps=8, arrival_s=0.5 + 0.4 * i)
        for i in range(10)
    ]
    sched = Scheduler(2, make_policy("srtf:max_sp=2"))
    result = simulate(sched, requests)
    check_trace(result, requests)
    video = [e for e in result.trace if e.task.request_id == "video"]
    assert result.outcomes["video"].num_preemptions >= 1
    gaps = [(a, b) for a, b in zip(video, video[1:], strict=False) if b.start_s > a.end_s + 1e-9]
    assert gaps, "the video never waited"
    for before, after in gaps:
        assert before.task.kind in (TaskKind.ENCODE, D)  # it waited at a boundary after a whole task
        ran_meanwhile = [
            e
            for e in result.trace
            if e.task.request_id != "video" and before.end_s <= e.start_s < after.start_s
            and set(e.ranks) & set(before.ranks)
        ]  # fmt: skip
        assert ran_meanwhile, "its ranks went to other requests while it waited"
    # No task was ever cut short: every DENOISE chunk ran the steps it was dispatched with, whole.
    cfg = {t.task: t.cfg for t in sched.record("video").history}  # CFG-parallel chunks (cfg=auto)
    for e in video:
        if e.task.kind is D:
            expected = sched.cost_model.task_time(e.task, requests[0], len(e.ranks), cfg=cfg[e.task])
            assert e.end_s - e.start_s - e.reshard_s == pytest.approx(expected)


def test_simulator_learns_true_costs_and_detects_stalls():
    class Slower(AnalyticCostModel):
        def step_time(self, model, width, height, frames, sp_degree):
            return 2.0 * super().step_time(model, width, height, frames, sp_degree)

    requests = mixed_workload(seed=9)[:8]
    sched = Scheduler(4, make_policy("edf-best-fit"), AnalyticCostModel())
    simulate(sched, requests, true_cost=Slower(), noise=0.0)
    assert sched.cost_model.factor(D, "flux-dev") == pytest.approx(2.0, rel=0.02)
    # Same seed, same noise: same result; a policy that never assigns anything stalls.
    a = simulate(Scheduler(4, make_policy("srtf")), requests, noise=0.2, seed=1)
    b = simulate(Scheduler(4, make_policy("srtf")), requests, noise=0.2, seed=1)
    assert a.trace == b.trace
    with pytest.raises(SimulationStalled, match="left them waiting"):
        simulate(Scheduler(4, _Fixed([])), requests)
