"""CFG-parallel as a scheduling choice (Note [CFG-parallel in policies], Note [CFG-parallel step cost]):
mirrored layouts and their reshard plans, the CFG-parallel step cost, cfg=auto|on|off on every built-in
policy, the contract checks on Assignment.cfg, and whole simulated runs that price CFG-parallel chunks."""

from __future__ import annotations

import pytest

from gfdit.cost import AnalyticCostModel
from gfdit.layout import Layout, LayoutKind, plan_reshard
from gfdit.policy import Assignment, PolicySpecError, available_policies, make_policy
from gfdit.request import Request
from gfdit.scheduler import PolicyError, Scheduler
from gfdit.sim import simulate
from gfdit.tasks import Task, TaskKind, TaskTimings
from tests.cost_fakes import BaseRulesCostModel

D = TaskKind.DENOISE
kWan = dict(width=832, height=480, num_frames=81)


def _wan(rid: str, guidance: float = 5.0, steps: int = 6, **kw) -> Request:
    return Request(rid, "wan2.1-1.3b", "p", num_inference_steps=steps, guidance_scale=guidance, **kWan, **kw)


def _flux(rid: str) -> Request:
    return Request(rid, "flux-dev", "p", width=1024, height=1024, num_inference_steps=6)


# -- layouts -----------------------------------------------------------------------------------------


def test_mirrored_layout_holdings_and_checks():
    lay = Layout.sharded([4, 5], mirrors=[6, 7])
    assert lay.holders == (4, 5, 6, 7)
    assert lay.holdings(10) == {4: (0, 5), 5: (5, 10), 6: (0, 5), 7: (5, 10)}
    with pytest.raises(ValueError, match="2 ranks but 1 mirrors"):
        Layout.sharded([0, 1], mirrors=[2])
    with pytest.raises(ValueError, match="duplicate ranks"):
        Layout.sharded([0, 1], mirrors=[1, 2])
    with pytest.raises(ValueError, match="only meaningful for SHARDED"):
        Layout(LayoutKind.REPLICATED, (0, 1), mirrors=(2, 3))


def test_plans_into_and_out_of_a_mirrored_layout():
    # plain SP2 on [0, 1] -> CFG 2x2, halves [0, 1] and [2, 3]: the mirrors receive copies
    into = plan_reshard(Layout.sharded([0, 1]), Layout.sharded([0, 1], mirrors=[2, 3]), 8)
    assert sorted((t.src_rank, t.dst_rank, t.start, t.stop) for t in into.transfers) == [
        (0, 2, 0, 4),
        (1, 3, 4, 8),
    ]
    assert sorted((t.dst_rank, t.start, t.stop) for t in into.local) == [(0, 0, 4), (1, 4, 8)]
    # the same mirrored layout again: nothing moves
    same = Layout.sharded([0, 1], mirrors=[2, 3])
    assert plan_reshard(same, same, 8).is_noop
    # from it to plain SP2 on the mirrors [2, 3]: everything stays in place, on the mirror ranks
    out = plan_reshard(same, Layout.sharded([2, 3]), 8)
    assert out.is_noop and sorted((t.dst_rank, t.start, t.stop) for t in out.local) == [(2, 0, 4), (3, 4, 8)]
    # to plain SP4 over all four: each keeps the quarter it already holds
    four = plan_reshard(same, Layout.sharded([0, 2, 1, 3]), 8)
    assert four.elements_moved == 0 and four.elements_kept == 8


# -- the cost model ----------------------------------------------------------------------------------


def test_cfg_step_cost():
    cost = AnalyticCostModel()
    args = ("wan2.1-1.3b", 832, 480, 81)
    for k in (1, 2):
        step, cfg = cost.step_time(*args, k), cost.cfg_step_time(*args, k)
        # one prediction per half: more than half a step of both (c0, exchange), less than a whole one
        assert step / 2 < cfg < step, (k, step, cfg)
        assert cfg == pytest.approx(
            step * cost.cfg_branch_factor(*args, k) + cost.cfg_exchange_time(*args, k)
        )
    # observed CFG-parallel chunks become the estimate of their key (per step)
    cost.observe_cfg(*args, 2, seconds=3.0, num_steps=6)
    assert cost.cfg_step_time(*args, 2) == pytest.approx(0.5)
    r = _wan("w")
    chunk = Task("w", D, 0, 4)
    assert cost.task_time(chunk, r, 4, cfg=True) == pytest.approx(4 * 0.5)
    with pytest.raises(ValueError, match="even group"):
        cost.task_time(chunk, r, 3, cfg=True)
    with pytest.raises(ValueError, match="only DENOISE"):
        cost.task_time(Task("w", TaskKind.ENCODE), r, 2, cfg=True)


def test_profiled_cfg_steps_correct_the_unmeasured_ones():
    cost = AnalyticCostModel()
    args = ("wan2.1-1.3b", 832, 480, 81)
    predicted = {k: cost.cfg_step_time(*args, k) for k in (1, 2)}
    cost.set_observed_cfg(*args, 1, 2.0 * predicted[1])  # measured: twice the prediction
    assert cost.cfg_step_time(*args, 1) == 2.0 * predicted[1]
    assert cost.cfg_correction("wan2.1-1.3b") == pytest.approx(2.0)
    assert cost.cfg_step_time(*args, 2) == pytest.approx(2.0 * predicted[2])
    cost.set_observed_cfg(*args, 1, 2.0 * predicted[1])  # the same again: no compounding
    assert cost.cfg_correction("wan2.1-1.3b") == pytest.approx(2.0)
    assert cost.cfg_correction("wan2.1-14b") == 1.0


def test_base_cost_model_never_makes_cfg_parallel_pay():
    plain = BaseRulesCostModel(lambda d: 1.0 / d, 0.1)
    assert plain.cfg_step_time("wan2.1-1.3b", 832, 480, 81, 2) == 0.5
    sched = Scheduler(4, make_policy("fcfs-elastic"), plain)
    result = simulate(sched, [_wan("a")])
    assert result.num_done == 1
    assert not any(t.cfg for t in sched.record("a").history)  # auto: never faster, so never chosen


# -- policies ----------------------------------------------------------------------------------------


def test_every_builtin_policy_takes_cfg():
    builtin = [n for n in available_policies() if type(make_policy(n)).__module__ == "gfdit.policy"]
    assert len(builtin) >= 11
    for name in builtin:
        default = "off" if name in ("static", "rssp") else "auto"
        assert make_policy(name).cfg == default, name
        assert "cfg=on" in make_policy(f"{name}:cfg=on").spec()
        with pytest.raises(PolicySpecError, match="cfg must be one of auto, on, off"):
            make_policy(f"{name}:cfg=sometimes")


def _at_denoise(world: int, request: Request, spec: str, valid_degrees=None) -> Scheduler:
    sched = Scheduler(world, make_policy(spec), valid_degrees=valid_degrees)
    sched.submit(request)
    (a,) = sched.schedule(0.0)
    assert a.task.kind is TaskKind.ENCODE
    sched.on_task_done(a.task, a.ranks, TaskTimings(0.0, 0.1))
    return sched


@pytest.mark.parametrize(
    "spec, cfg",
    [("fcfs-elastic:cfg=on", True), ("fcfs-elastic:cfg=off", False), ("fcfs-elastic", True),
     ("edf-best-fit:cfg=on", True), ("srtf:cfg=off", False), ("static:sp=4", False), ("static:sp=4,cfg=on", True)],
)  # fmt: skip
def test_cfg_modes_choose_the_layout(spec, cfg):
    sched = _at_denoise(4, _wan("w"), spec)
    rt = sched.view(0.2).runnable[0]
    assert sorted(rt.cfg_step_s) == [2, 4]  # 2 x 1 and 2 x 2 on 4 ranks
    (a,) = sched.schedule(0.2)
    assert a.task.kind is D and len(a.ranks) == 4 and a.cfg is cfg
    if cfg:  # the conditional half holds the most of the state: rank 0 encoded it
        assert a.ranks[0] == 0
        assert a.reshard.dst == Layout.sharded(a.ranks[:2], 1, mirrors=a.ranks[2:])
    # auto chose CFG-parallel because the cost model says it is faster at this size
    if spec == "fcfs-elastic":
        assert rt.cfg_step_s[4] < rt.step_s[4]


def test_requests_without_true_cfg_are_untouched():
    for request in (_flux("f"), _wan("w1", guidance=1.0)):
        sched = _at_denoise(4, request, "fcfs-elastic:cfg=on")
        assert not sched.view(0.2).runnable[0].cfg_step_s
        (a,) = sched.schedule(0.2)
        assert not a.cfg


def test_sizes_only_cfg_parallel_allows_become_degrees():
    # A model whose heads allow SP 1 and 2 only: 4 ranks are valid as CFG 2 x 2, never as plain SP4.
    sched = _at_denoise(4, _wan("w"), "fcfs-elastic:cfg=on", valid_degrees=lambda r, w: (1, 2))
    rt = sched.view(0.2).runnable[0]
    assert rt.valid_degrees == (1, 2) and sorted(rt.cfg_step_s) == [2, 4]
    (a,) = sched.schedule(0.2)
    assert len(a.ranks) == 4 and a.cfg
    off = _at_denoise(4, _wan("w"), "fcfs-elastic:cfg=off", valid_degrees=lambda r, w: (1, 2))
    (b,) = off.schedule(0.2)
    assert len(b.ranks) == 2 and not b.cfg


class _Fixed:
    name = "fixed"

    def __init__(self, fn):
        self.fn = fn

    def schedule(self, view):
        return self.fn(view)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda rt: Assignment(rt.task, (0, 1, 2), cfg=True), "CFG-parallel on 3 ranks"),
        (lambda rt: Assignment(rt.task, (0, 1), cfg=1), "cfg must be a bool"),
        (lambda rt: Assignment(rt.task, (0, 1), cfg=True, batch=0), "not batched"),
    ],
)
def test_contract_checks_on_cfg(make, message):
    sched = _at_denoise(4, _wan("w"), "fcfs-elastic")
    sched.policy = _Fixed(lambda view: [make(view.runnable[0])])
    with pytest.raises(PolicyError, match=message):
        sched.schedule(0.2)


def test_cfg_is_refused_where_it_cannot_run():
    flux = _at_denoise(4, _flux("f"), "fcfs-elastic")
    flux.policy = _Fixed(lambda view: [Assignment(view.runnable[0].task, (0, 1), cfg=True)])
    with pytest.raises(PolicyError, match="runs no true CFG"):
        flux.schedule(0.2)
    fresh = Scheduler(4, _Fixed(lambda view: [Assignment(view.runnable[0].task, (0, 1), cfg=True)]))
    fresh.submit(_wan("w"))
    with pytest.raises(PolicyError, match="only DENOISE"):
        fresh.schedule(0.0)


# -- whole runs --------------------------------------------------------------------------------------


def test_simulated_cfg_parallel_runs_are_priced_and_learned():
    requests = [_wan(f"w{i}", arrival_s=0.3 * i, deadline_s=0.3 * i + 30.0) for i in range(4)]
    requests += [_flux(f"f{i}") for i in range(2)]
    latency = {}
    for mode in ("on", "off"):
        sched = Scheduler(4, make_policy(f"edf-best-fit:cfg={mode},max_batch=1"))
        result = simulate(sched, requests)
        assert result.num_done == len(requests)
        ran = [t for r in sched.records.values() for t in r.history if t.cfg]
        assert bool(ran) == (mode == "on")
        for e in result.trace:  # each chunk took what the cost model prices for its layout
            rec = sched.record(e.task.request_id)
            t = next(t for t in rec.history if t.task == e.task)
            if e.task.kind is D:
                expected = sched.cost_model.task_time(e.task, rec.request, len(e.ranks), cfg=t.cfg)
                assert e.end_s - e.start_s - e.reshard_s == pytest.approx(expected, rel=1e-6)
        latency[mode] = result.mean_latency_s
    # the analytic model says a CFG-parallel step beats plain SP at the same size for Wan 480p
    assert latency["on"] < latency["off"]
