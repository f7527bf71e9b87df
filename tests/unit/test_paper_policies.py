"""The paper's baselines and policies (rssp, tetriserve, step-preempt, load-adaptive, sjf, edf-greedy,
disaggregated), edf-best-fit's late requests, and chunk=None (the scheduler's chunk_steps): each
through the Scheduler (its validation) and the simulator."""

from __future__ import annotations

import pytest

from gfdit.policy import available_policies, make_policy
from gfdit.request import Request, RequestState
from gfdit.scheduler import Scheduler
from gfdit.sim import simulate
from gfdit.tasks import TaskKind, TaskTimings


def req(rid, size=1024, arrival=0.0, steps=8, deadline=None, cls="", priority=0, preemptible=False):
    return Request(
        rid, "flux-dev", width=size, height=size, num_inference_steps=steps, arrival_s=arrival,
        deadline_s=deadline, slo_class=cls, priority=priority, preemptible=preemptible,
    )  # fmt: skip


def mixed(n=24, gap=0.4):
    sizes = (512, 1024, 2048)
    out = []
    for i in range(n):
        s = sizes[i % 3]
        out.append(
            req(f"r{i}", s, arrival=i * gap, deadline=i * gap + 6.0 * (1 + i % 3), cls="SML"[i % 3],
                priority=(100, 50, 0)[i % 3], preemptible=i % 3 == 2)
        )  # fmt: skip
    return out


@pytest.mark.parametrize("name", available_policies())
def test_every_policy_finishes_a_mixed_workload_and_round_trips(name):
    if name == "test-idle":  # registered by test_tune: waits forever on purpose
        pytest.skip("test policy")
    p = make_policy(name)
    assert make_policy(p.spec()) == p
    assert p.__doc__ and len(p.__doc__) > 80  # names what it models
    sched = Scheduler(4, p, chunk_steps=2)
    res = simulate(sched, mixed())
    assert all(o.state is RequestState.DONE for o in res.outcomes.values())
    assert sched.num_preemptions == sum(o.num_preemptions for o in res.outcomes.values())


def groups(res, rid):
    return [e.ranks for e in res.trace if e.task.request_id == rid]


def test_rssp_gives_each_class_its_degree_for_life():
    p = make_policy("rssp:S=4,M=2,L=1")
    sched = Scheduler(4, p)
    res = simulate(sched, [req("s", 512, cls="S"), req("m", 1024, arrival=30.0, cls="M"),
                           req("l", 2048, arrival=60.0, cls="L"), req("x", 512, arrival=90.0, cls="X")])  # fmt: skip
    for rid, d in (("s", 4), ("m", 2), ("l", 1), ("x", 1)):
        g = groups(res, rid)
        assert all(r == g[0] for r in g) and len(g[0]) == d  # one group for life
    with pytest.raises(ValueError, match="S must be >= 1"):
        make_policy("rssp:S=0")


def test_tetriserve_fixes_the_degree_at_admission_and_packs():
    p = make_policy("tetriserve")
    sched = Scheduler(4, p)
    cost = sched.cost_model
    tight = req("tight", 2048, steps=8)
    alone = cost.standalone_time(tight, 1)
    # "tight" cannot meet its deadline on one rank but can on more; "loose" can on one.
    reqs = [
        req("tight", 2048, steps=8, deadline=0.6 * alone),
        req("loose", 512, steps=8, deadline=1000.0),
    ]
    res = simulate(sched, reqs)
    for rid in ("tight", "loose"):
        sizes = {len(g) for e, g in zip(res.trace, [e.ranks for e in res.trace], strict=True)
                 if e.task.request_id == rid}  # fmt: skip
        assert len(sizes) == 1  # the admission degree, for every task
    sizes = {rid: len(groups(res, rid)[0]) for rid in ("tight", "loose")}
    assert sizes["tight"] > 1 and sizes["loose"] == 1


def test_tetriserve_does_not_admit_onto_ranks_a_started_request_waits_for():
    p = make_policy("tetriserve")
    sched = Scheduler(4, p)
    sched.submit(req("a", 2048, deadline=None))
    (enc,) = sched.schedule(0.0)
    assert len(enc.ranks) == 4  # fastest degree without a deadline
    sched.on_task_done(enc.task, enc.ranks, TaskTimings(0.0, 0.1))
    sched.submit(req("b", 512, arrival=0.1))
    out = sched.schedule(0.1)
    assert [a.task.request_id for a in out] == ["a"]  # a keeps its 4 ranks; b waits for free ranks


def test_step_preempt_demotes_or_pauses_the_preemptible_request():
    for demote, expect in ((True, "demoted"), (False, "paused")):
        sched = Scheduler(4, make_policy(f"step-preempt:demote={demote}"))
        sched.submit(req("big", 2048, steps=20, priority=0, preemptible=True))
        (enc,) = sched.schedule(0.0)
        sched.on_task_done(enc.task, enc.ranks, TaskTimings(0.0, 0.1))
        (d1,) = sched.schedule(0.1)
        assert len(d1.ranks) == 4  # alone: the fastest degree
        sched.on_task_done(d1.task, d1.ranks, TaskTimings(0.1, 0.5))
        # A high-priority request whose deadline needs 2+ ranks arrives at the chunk boundary.
        small = req("hi", 1024, steps=20, arrival=0.5, priority=100, preemptible=False)
        small = Request(
            **{**small.__dict__, "deadline_s": 0.5 + 0.6 * sched.cost_model.standalone_time(small, 1)}
        )
        sched.submit(small)
        out = {a.task.request_id: a for a in sched.schedule(0.5)}
        assert out["hi"].task.kind is TaskKind.ENCODE and len(out["hi"].ranks) == 1
        if expect == "demoted":
            assert len(out["big"].ranks) == 2  # 3 ranks left; 2 is the largest valid degree
        else:
            assert "big" not in out  # waits for 4 ranks again
        assert sched.num_preemptions == 1 and sched.record("big").num_preemptions == 1


def test_step_preempt_never_pauses_a_started_non_preemptible_request():
    policy = make_policy("step-preempt")
    checked = []

    class Checked:
        name = "checked"

        def schedule(self, view):
            out = policy.schedule(view)
            protected = {rt.request_id for rt in view.runnable if rt.started and not rt.request.preemptible}
            if len(view.free_ranks) >= len(protected):
                assert protected <= {a.task.request_id for a in out}
                checked.append(len(protected))
            return out

    sched = Scheduler(4, Checked())
    res = simulate(sched, mixed(30, gap=0.2))
    assert all(o.state is RequestState.DONE for o in res.outcomes.values())
    assert sum(checked) > 10  # the property was exercised


def test_load_adaptive_shrinks_degrees_with_the_queue():
    p = make_policy("load-adaptive")
    sched = Scheduler(8, p)
    sched.submit(req("a", 2048))
    (a,) = sched.schedule(0.0)
    assert p.cap(sched.view(0.0)) == 8
    sched.on_task_done(a.task, a.ranks, TaskTimings(0.0, 0.1))
    for i in range(3):
        sched.submit(req(f"q{i}", 2048, arrival=0.1))
    view = sched.view(0.1)
    assert p.cap(view) == 2  # 4 requests in the system: 8 // 4
    out = p.schedule(view)
    assert all(len(x.ranks) <= 2 for x in out if x.task.kind is TaskKind.DENOISE)


def test_sjf_admits_the_shortest_job_first_and_does_not_overtake_started_ones():
    sched = Scheduler(1, make_policy("sjf"))
    sched.submit(req("long", 2048))
    (a,) = sched.schedule(0.0)
    sched.on_task_done(a.task, a.ranks, TaskTimings(0.0, 0.1))
    sched.submit(req("mid", 1024, arrival=0.05))
    sched.submit(req("short", 512, arrival=0.08))
    (b,) = sched.schedule(0.1)
    assert b.task.request_id == "long"  # started: continues (srtf would run "short")
    res_order = []
    sched2 = Scheduler(1, make_policy("sjf"))
    res = simulate(
        sched2, [req("long", 2048), req("mid", 1024, arrival=0.01), req("short", 512, arrival=0.02)]
    )
    res_order = sorted(res.outcomes.values(), key=lambda o: o.finish_s)
    assert [o.request_id for o in res_order] == ["long", "short", "mid"]


def test_edf_greedy_gives_the_earliest_deadline_the_fastest_degree():
    sched = Scheduler(4, make_policy("edf-greedy:chunk=0"))
    res = simulate(sched, [req("late", 2048, deadline=500.0), req("soon", 2048, deadline=100.0)])
    first_denoise = next(e for e in res.trace if e.task.kind is TaskKind.DENOISE)
    assert first_denoise.task.request_id == "soon" and len(first_denoise.ranks) == 4


def test_disaggregated_keeps_stages_off_the_denoise_ranks():
    sched = Scheduler(4, make_policy("disaggregated:stage_ranks=1"))
    res = simulate(sched, mixed(12))
    for e in res.trace:
        if e.task.kind is TaskKind.DENOISE:
            assert 3 not in e.ranks
        else:
            assert e.ranks == (3,)
    assert all(o.num_reshards >= 2 for o in res.outcomes.values())  # to the denoise group and back


def test_edf_best_fit_gives_a_late_request_the_fastest_free_degree():
    def decide(flag):
        sched = Scheduler(4, make_policy(f"edf-best-fit:hopeless_fastest={flag}"))
        reqs = [
            req("ok1", 512, deadline=1000.0),
            req("ok2", 512, deadline=1000.0),
            req("late", 2048, deadline=0.5),
        ]
        for r in reqs:
            sched.submit(r)
            sched.on_task_done(*_encode(sched, r.request_id))
        return {a.task.request_id: len(a.ranks) for a in sched.schedule(0.1)}

    assert decide(True) == {"ok1": 1, "ok2": 1, "late": 2}  # the two ranks left, in pass 1
    assert decide(False) == {"ok1": 2, "ok2": 1, "late": 1}  # one rank; pass 2 gives the spare to ok1


def _encode(sched, rid):
    view = sched.view(0.0)
    rt = next(x for x in view.runnable if x.request_id == rid)
    from gfdit.policy import Assignment

    policy = sched.policy

    class One:
        name = "one"

        def schedule(self, view):
            return [Assignment(rt.task, (sched.free_ranks[0],))]

    sched.policy = One()
    try:
        (a,) = sched.schedule(0.0)
    finally:
        sched.policy = policy
    return a.task, a.ranks, TaskTimings(0.0, 0.0)


def test_chunk_none_uses_the_schedulers_chunk_steps():
    for chunk_steps in (1, 3):
        sched = Scheduler(4, make_policy("edf-best-fit"), chunk_steps=chunk_steps)
        res = simulate(sched, [req("a", 1024, steps=7)])
        lens = [e.task.num_steps for e in res.trace if e.task.kind is TaskKind.DENOISE]
        assert lens == [chunk_steps] * (7 // chunk_steps) + ([7 % chunk_steps] if 7 % chunk_steps else [])
    sched = Scheduler(
        4, make_policy("edf-best-fit:chunk=4"), chunk_steps=1
    )  # the policy's own parameter wins
    res = simulate(sched, [req("a", 1024, steps=8)])
    assert [e.task.num_steps for e in res.trace if e.task.kind is TaskKind.DENOISE] == [4, 4]
