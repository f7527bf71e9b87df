"""Built-in policies, the policy spec parser, and the scheduler's validation of policy output."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import pytest

from gfdit.cost import AnalyticCostModel
from gfdit.layout import Layout, plan_reshard
from gfdit.policy import (
    Assignment,
    EdfBestFitPolicy,
    Policy,
    PolicySpecError,
    SchedulerView,
    SrtfPolicy,
    StaticPolicy,
    available_policies,
    make_policy,
)
from gfdit.request import Request, RequestState
from gfdit.scheduler import PolicyError, Scheduler
from gfdit.sim import simulate
from gfdit.tasks import Task, TaskKind, TaskTimings


@dataclass
class Scripted(Policy):
    """Test policy: returns whatever `fn(view)` returns."""

    name: ClassVar[str] = "scripted"
    fn: Callable[[SchedulerView], list] = field(default=lambda view: [])

    def schedule(self, view: SchedulerView) -> list[Assignment]:
        return self.fn(view)


def flux(rid: str, size: int = 1024, arrival: float = 0.0, steps: int = 8, deadline: float | None = None):
    return Request(
        rid,
        "flux-dev",
        width=size,
        height=size,
        num_inference_steps=steps,
        arrival_s=arrival,
        deadline_s=deadline,
    )


def finish_all(sched: Scheduler, assignments: list[Assignment], now: float) -> None:
    for a in assignments:
        sched.on_task_done(a.task, a.ranks, TaskTimings(now, now))


def run_on(sched: Scheduler, rid: str, ranks: tuple[int, ...], now: float = 0.0) -> Assignment:
    """Dispatch the runnable task of `rid` on `ranks` with a scripted policy and complete it."""
    policy = sched.policy
    sched.policy = Scripted(
        lambda view: [Assignment(rt.task, ranks) for rt in view.runnable if rt.request_id == rid]
    )
    try:
        (a,) = sched.schedule(now)
    finally:
        sched.policy = policy
    finish_all(sched, [a], now)
    return a


# Parser.


def test_make_policy_parses_params_and_round_trips():
    p = make_policy("edf-best-fit:chunk=2,max_sp=4")
    assert isinstance(p, EdfBestFitPolicy) and p.chunk == 2 and p.max_sp == 4 and p.tol == 0.05
    p = make_policy(" srtf : max-sp=2 , tol=0.2 ")
    assert isinstance(p, SrtfPolicy) and p.max_sp == 2 and p.tol == 0.2
    assert make_policy("edf-best-fit:hopeless_last=false").hopeless_last is False
    assert make_policy("static:sp=4") == StaticPolicy(sp=4)
    assert set(available_policies()) >= {"static", "fcfs-elastic", "edf-best-fit", "srtf"}
    for spec in ["static:sp=2,chunk=3", "fcfs-elastic:max_sp=2", "edf-best-fit:margin=1.5", "srtf"]:
        p = make_policy(spec)
        assert make_policy(p.spec()) == p


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "unknown policy ''"),
        ("fifo", "unknown policy 'fifo'; available: disaggregated, edf-best-fit, edf-greedy, fcfs-elastic"),
        ("edf-best-fit:chunk", "expected key=value, got 'chunk'"),
        ("edf-best-fit:chunk=", "expected key=value"),
        (
            "edf-best-fit:sp=2",
            "has no parameter 'sp'; parameters: cfg, chunk, hopeless_fastest, hopeless_last, margin, max_batch, max_sp, tol",
        ),
        ("static:max_sp=2", "has no parameter 'max_sp'; parameters: cfg, chunk, max_batch, sp"),
        ("srtf:chunk=x", "parameter 'chunk' expects int, got 'x'"),
        ("srtf:chunk=2.5", "parameter 'chunk' expects int, got '2.5'"),
        ("srtf:tol=abc", "parameter 'tol' expects float"),
        ("edf-best-fit:hopeless_last=maybe", "parameter 'hopeless_last' expects bool"),
        ("srtf:chunk=-1", "chunk must be None (the scheduler's chunk_steps) or >= 0"),
        ("srtf:tol=1.5", "tol must be in [0, 1)"),
        ("static:sp=0", "sp must be >= 1"),
        ("edf-best-fit:margin=0", "margin must be > 0"),
        ("fcfs-elastic:chunk=2,chunk=3", "parameter 'chunk' given twice"),
    ],
)
def test_make_policy_errors(spec, message):
    with pytest.raises(PolicySpecError) as e:
        make_policy(spec)
    assert message in str(e.value)


# Built-in policies.


def test_static_binds_aligned_groups_and_keeps_them():
    sched = Scheduler(4, make_policy("static:sp=2,max_batch=1"))
    for i in range(3):
        sched.submit(flux(f"r{i}"))
    first = sched.schedule(0.0)
    assert [(a.task.request_id, a.task.kind, a.ranks) for a in first] == [
        ("r0", TaskKind.ENCODE, (0, 1)),
        ("r1", TaskKind.ENCODE, (2, 3)),
    ]
    finish_all(sched, first[:1], 1.0)
    (nxt,) = sched.schedule(1.0)  # r0 continues on its group; r2 still has no free group
    assert nxt.task == Task("r0", TaskKind.DENOISE, 0, 8) and nxt.ranks == (0, 1) and nxt.reshard.is_noop


def test_static_sim_keeps_one_group_per_request():
    reqs = [flux(f"r{i}", size=512 * (1 + i % 3), arrival=0.1 * i) for i in range(6)]
    sched = Scheduler(4, make_policy("static:sp=2,max_batch=1"))
    result = simulate(sched, reqs)
    assert result.num_done == 6
    for r in reqs:
        groups = [e.ranks for e in result.trace if e.task.request_id == r.request_id]
        assert len(set(groups)) == 1 and len(groups[0]) == 2  # ENCODE .. DECODE on one group
        assert result.outcomes[r.request_id].num_reshards == 0
        assert result.outcomes[r.request_id].num_preemptions == 0


def test_static_falls_back_to_largest_valid_degree():
    sched = Scheduler(4, make_policy("static:sp=4"), valid_degrees=lambda r, w: (1, 2))
    sched.submit(flux("a"))
    (a,) = sched.schedule(0.0)
    assert a.ranks == (0, 1)


def test_fcfs_elastic_gives_helpful_ranks_in_arrival_order():
    sched = Scheduler(4, make_policy("fcfs-elastic"))
    sched.submit(flux("big", size=2048))
    sched.submit(flux("small", size=512, arrival=0.5))
    run_on(sched, "big", (0,))
    run_on(sched, "small", (1,), now=0.5)
    view = sched.view(1.0)
    (a,) = make_policy("fcfs-elastic").schedule(view)  # big came first; every extra rank helps it
    assert a.task.request_id == "big" and len(a.ranks) == 4 and a.ranks[0] == 0
    assert a.num_steps is None and a.task.num_steps == 2  # chunk None: the scheduler's chunk_steps (2)
    a, b = make_policy("fcfs-elastic:max_sp=2").schedule(view)
    assert (a.task.request_id, len(a.ranks), b.task.request_id) == ("big", 2, "small")
    assert 0 in a.ranks and 1 in b.ranks  # each on the rank holding its state
    out = make_policy("fcfs-elastic:tol=0.9,chunk=0").schedule(view)  # degrees within 1.9x of the best
    assert [(x.task.request_id, len(x.ranks)) for x in out] == [("big", 2), ("small", 1)]
    assert 0 in out[0].ranks and 1 not in out[0].ranks and out[1].ranks == (1,)
    assert out[0].num_steps == 8  # chunk=0: all remaining steps


def test_fcfs_elastic_does_not_waste_ranks_on_small_requests():
    sched = Scheduler(4, make_policy("fcfs-elastic:tol=0.15"))
    sched.submit(flux("small", size=512))
    run_on(sched, "small", (0,))
    (rt,) = sched.view(1.0).runnable
    best = min(rt.step_s.values())
    expected = min(d for d in rt.valid_degrees if rt.step_s[d] <= best * 1.15)
    assert expected < 4  # per the cost model, 4 ranks gain less than 15% over `expected` on 512^2
    (a,) = sched.schedule(1.0)
    assert len(a.ranks) == expected


def test_edf_best_fit_gives_smallest_degree_that_meets_deadline_then_spreads():
    cost = AnalyticCostModel()
    probe = flux("big", size=2048, steps=28)
    head = Task("big", TaskKind.DENOISE, 0, 2)  # its head after ENCODE
    r1, r2 = (cost.remaining_time(probe, head, d, 28) for d in (1, 2))
    assert r2 < r1
    sched = Scheduler(4, make_policy("edf-best-fit"), cost)
    sched.submit(flux("loose", size=1024, steps=28))  # no deadline, arrived first
    sched.submit(flux("big", size=2048, steps=28, deadline=(r1 + r2) / 2))  # degree 1 misses, 2 meets
    run_on(sched, "loose", (0,))
    run_on(sched, "big", (1,))
    out = {a.task.request_id: a for a in sched.schedule(0.0)}
    assert len(out["big"].ranks) == 2  # smallest meeting the deadline; 4 would need 2 more spare ranks
    assert len(out["loose"].ranks) == 2  # the spare rank goes to the 1024^2 request: 1 -> 2 helps it
    assert set(out["big"].ranks) | set(out["loose"].ranks) == {0, 1, 2, 3}
    assert 1 in out["big"].ranks and 0 in out["loose"].ranks  # each keeps its state's rank


def test_edf_best_fit_serves_hopeless_requests_last():
    sched = Scheduler(1, make_policy("edf-best-fit"))
    sched.submit(flux("late", deadline=0.01))
    sched.submit(flux("free", arrival=0.001))
    (a,) = sched.schedule(0.01)
    assert a.task.request_id == "free"
    sched2 = Scheduler(1, make_policy("edf-best-fit:hopeless_last=false"))
    sched2.submit(flux("late", deadline=0.01))
    sched2.submit(flux("free", arrival=0.001))
    (a,) = sched2.schedule(0.01)
    assert a.task.request_id == "late"


def test_srtf_runs_shorter_request_first_and_preempts_at_boundaries():
    sched = Scheduler(1, make_policy("srtf"))
    sched.submit(flux("long", size=2048, steps=20))
    (a,) = sched.schedule(0.0)
    assert a.task.request_id == "long" and a.task.kind is TaskKind.ENCODE
    sched.submit(flux("short", size=512, steps=4, arrival=0.01))
    assert sched.schedule(0.02) == []  # no free rank: the running ENCODE is never interrupted
    finish_all(sched, [a], 0.05)
    (b,) = sched.schedule(0.05)
    assert b.task.request_id == "short"
    assert sched.record("long").num_preemptions == 1
    assert sched.record("long").state is RequestState.WAITING


@pytest.mark.parametrize("spec", ["fcfs-elastic", "edf-best-fit", "srtf", "static:sp=2"])
def test_policies_prefer_ranks_holding_the_state(spec):
    sched = Scheduler(4, make_policy(spec), valid_degrees=lambda r, w: (1, 2))
    sched.submit(flux("a", size=2048))
    run_on(sched, "a", (3, 2))  # ENCODE on group (3, 2): state SHARDED over [3, 2]
    assert sched.record("a").layout == Layout.sharded((3, 2), 1)
    (x,) = sched.schedule(1.0)
    assert x.ranks == (3, 2) and x.reshard.is_noop and x.reshard.elements_kept == sched.record("a").dim_size


@pytest.mark.parametrize("spec", ["fcfs-elastic", "edf-best-fit", "srtf", "static:sp=4"])
def test_policies_only_use_valid_degrees(spec):
    sched = Scheduler(4, make_policy(spec), valid_degrees=lambda r, w: (1, 3))
    reqs = [flux(f"r{i}", size=(512, 1024, 2048)[i % 3], arrival=0.05 * i) for i in range(8)]
    result = simulate(sched, reqs)
    assert result.num_done == 8
    assert {len(e.ranks) for e in result.trace} <= {1, 3}
    assert any(len(e.ranks) == 3 for e in result.trace)


# Validation of policy output.


def bad_output_cases():
    def first(view):
        return view.runnable[0]

    return {
        "not a list": (lambda v: None, "must return a list"),
        "not an assignment": (lambda v: [("a", (0,))], "expected Assignment"),
        "unknown request": (
            lambda v: [Assignment(Task("zz", TaskKind.ENCODE), (0,))],
            "has no runnable task",
        ),
        "wrong task": (
            lambda v: [Assignment(Task(first(v).request_id, TaskKind.DECODE), (0,))],
            "is not the runnable task",
        ),
        "empty group": (lambda v: [Assignment(first(v).task, ())], "empty group"),
        "out of range": (lambda v: [Assignment(first(v).task, (4,))], "not in [0, 4)"),
        "negative": (lambda v: [Assignment(first(v).task, (-1,))], "not in [0, 4)"),
        "duplicate": (lambda v: [Assignment(first(v).task, (1, 1))], "duplicate ranks"),
        "busy": (lambda v: [Assignment(first(v).task, (3,))], "are busy"),
        "invalid degree": (lambda v: [Assignment(first(v).task, (0, 1, 2))], "not a valid degree"),
        "twice": (
            lambda v: [Assignment(first(v).task, (0,)), Assignment(first(v).task, (1,))],
            "assigned twice",
        ),
        "overlap": (
            lambda v: [Assignment(v.runnable[0].task, (0, 1)), Assignment(v.runnable[1].task, (1, 2))],
            "already assigned in this decision",
        ),
        "steps too many": (lambda v: [Assignment(first(v).task, (0,), num_steps=99)], "num_steps 99"),
        "steps zero": (lambda v: [Assignment(first(v).task, (0,), num_steps=0)], "num_steps 0"),
    }


@pytest.mark.parametrize("case", list(bad_output_cases()))
def test_scheduler_rejects_bad_policy_output(case):
    fn, message = bad_output_cases()[case]
    sched = Scheduler(4, make_policy("fcfs-elastic"))
    for rid in ("a", "b", "c"):
        sched.submit(flux(rid))
    run_on(sched, "a", (0,))
    run_on(sched, "b", (1,))
    run_on(sched, "c", (3,))
    sched.policy = Scripted(
        lambda v: [Assignment(rt.task, (3,)) for rt in v.runnable if rt.request_id == "c"]
    )
    sched.schedule(1.0)  # c's first chunk keeps rank 3 busy
    sched.policy = Scripted(fn)
    before = sched.free_ranks
    with pytest.raises(PolicyError) as e:
        sched.schedule(2.0)
    assert message in str(e.value) and "policy 'scripted'" in str(e.value)
    assert sched.free_ranks == before  # nothing committed
    assert all(sched.record(r).state is RequestState.WAITING for r in ("a", "b"))


def test_scheduler_rejects_steps_on_stage_tasks_and_decode_ends_the_request():
    sched = Scheduler(4, make_policy("fcfs-elastic"))
    sched.submit(flux("a", steps=1))
    run_on(sched, "a", (0,))  # ENCODE
    sched.policy = Scripted(lambda v: [Assignment(v.runnable[0].task, (0,), num_steps=1)])
    run_on(sched, "a", (0,))  # DENOISE [0, 1)
    sched.policy = Scripted(lambda v: [Assignment(v.runnable[0].task, (0, 1), num_steps=2)])
    with pytest.raises(PolicyError, match="num_steps 2 given for a DECODE task"):
        sched.schedule(1.0)
    sched.policy = Scripted(lambda v: [Assignment(v.runnable[0].task, (0, 1))])
    run_on(sched, "a", (0, 1))  # DECODE on two ranks: the last task
    assert sched.record("a").state is RequestState.DONE and sched.num_active == 0


def test_scheduler_rejects_reshard_filled_by_policy():
    sched = Scheduler(2, make_policy("srtf"))
    sched.submit(flux("a"))
    run_on(sched, "a", (0,))

    def fn(view):
        rt = view.runnable[0]
        return [
            Assignment(rt.task, (1,), reshard=plan_reshard(rt.layout, Layout.sharded((1,), 1), rt.dim_size))
        ]

    sched.policy = Scripted(fn)
    with pytest.raises(PolicyError, match="must leave `reshard` None"):
        sched.schedule(1.0)
