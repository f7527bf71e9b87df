"""gfdit.simexec: the simulator's model of how the server executes tasks (host overhead, measured
reshard costs, busy senders, text-conditioning copies, decode on ranks[0])."""

from __future__ import annotations

import pytest

from gfdit.cost import AnalyticCostModel
from gfdit.policy import Assignment, make_policy
from gfdit.request import Request
from gfdit.scheduler import Scheduler
from gfdit.sim import simulate
from gfdit.simexec import ExecutionModel, cond_bytes, kH100ReshardBandwidth, kH100ReshardLatencyS
from gfdit.tasks import TaskKind


def req(rid, size=1024, arrival=0.0, steps=6):
    return Request(rid, "flux-dev", width=size, height=size, num_inference_steps=steps, arrival_s=arrival)


def reqs():
    return [req(f"r{i}", (512, 1024, 2048)[i % 3], arrival=0.3 * i) for i in range(12)]


def test_all_off_is_the_plain_simulator():
    a = simulate(Scheduler(4, make_policy("edf-best-fit")), reqs())
    b = simulate(Scheduler(4, make_policy("edf-best-fit")), reqs(), execution=ExecutionModel())
    assert a.trace == b.trace


def test_host_overhead_is_charged_per_task():
    plain = simulate(Scheduler(1, make_policy("static:sp=1,chunk=2")), [req("a", steps=6)])
    over = simulate(
        Scheduler(1, make_policy("static:sp=1,chunk=2"), learn=False), [req("a", steps=6)],
        execution=ExecutionModel(host_overhead_s=0.01),
    )  # fmt: skip
    num_tasks = len(over.trace)
    assert num_tasks == 5  # ENCODE, 3 DENOISE, DECODE
    assert over.outcomes["a"].latency_s == pytest.approx(plain.outcomes["a"].latency_s + 0.01 * num_tasks)


def test_h100_reshard_line_passes_through_the_measurements():
    m = ExecutionModel(0.0, kH100ReshardLatencyS, kH100ReshardBandwidth)
    cost = AnalyticCostModel()
    assert m.move_time(cost, 0.19 * 2**20) == pytest.approx(0.07e-3)
    assert m.move_time(cost, 4 * 2**20) == pytest.approx(0.18e-3)
    assert m.move_time(cost, 0) == 0.0
    with pytest.raises(ValueError, match="both"):
        ExecutionModel(reshard_latency_s=1e-4)


def test_decode_runs_on_the_first_rank_after_a_gather():
    cost = AnalyticCostModel()
    m = ExecutionModel(decode_on_first_rank=True, reshard_latency_s=1e-4, reshard_bandwidth=1e9)
    res = simulate(Scheduler(4, make_policy("static:sp=4"), learn=False), [req("a", 2048)], execution=m)
    (dec,) = [e for e in res.trace if e.task.kind is TaskKind.DECODE]
    one_rank = cost.stage_time(TaskKind.DECODE, "flux-dev", 2048, 2048, None, 1)
    latent = 128 * 128 * 64 * 4  # tokens x fp32 packed latent
    assert dec.end_s - dec.start_s == pytest.approx(one_rank + 1e-4 + latent * 3 / 4 / 1e9)
    # The cost model says the same: one rank decodes, whatever the group's size.
    assert one_rank == cost.stage_time(TaskKind.DECODE, "flux-dev", 2048, 2048, None, 4)


def test_a_busy_sender_delays_the_task_and_its_own_next_task():
    """a's state is on ranks [0, 1]; b runs on rank 0 until t=10; a moves to [2, 3] at t=1: its
    reshard waits for rank 0, and rank 0's next command waits for the send."""
    m = ExecutionModel(busy_senders=True, reshard_latency_s=0.5, reshard_bandwidth=1e12)
    from gfdit.simexec import ExecutionState

    cost = AnalyticCostModel()
    sched = Scheduler(4, make_policy("fcfs-elastic"), cost, learn=False)
    ex = ExecutionState(m, cost)
    sched.submit(req("a", 1024))
    sched.submit(req("b", 1024))
    from gfdit.tasks import TaskTimings

    class Scripted:
        name = "scripted"
        plan: dict = {}

        def schedule(self, view):
            return [
                Assignment(rt.task, self.plan[rt.request_id])
                for rt in view.runnable
                if rt.request_id in self.plan
            ]

    policy = Scripted()
    sched.policy = policy
    policy.plan = {"a": (0, 1)}
    (enc,) = sched.schedule(0.0)
    start, _, _ = ex.timing(enc, sched.record("a").request, 0.0)
    sched.on_task_done(enc.task, enc.ranks, TaskTimings(0.0, 0.1))
    ex.finished(enc.ranks, 0.1)
    policy.plan = {"b": (0,)}
    (b,) = sched.schedule(0.2)
    ex.timing(b, sched.record("b").request, 0.2)
    ex.rank_free_s[0] = 10.0  # b's ENCODE on rank 0 runs until t=10 (as if it were long)
    policy.plan = {"a": (2, 3)}
    (mv,) = sched.schedule(1.0)
    assert mv.reshard is not None and 0 in {t.src_rank for t in mv.reshard.transfers}
    start, reshard_s, _ = ex.timing(mv, sched.record("a").request, 1.0)
    assert start == 10.0 and reshard_s == pytest.approx(0.5, rel=1e-3)
    assert ex.rank_free_s[0] == pytest.approx(10.5, rel=1e-3)  # rank 0 is busy sending until then


def test_cond_copies_add_bytes_for_members_that_lack_the_text_embeddings():
    r = req("a")
    assert cond_bytes(r) == 512 * 4096 * 2 + 768 * 2  # T5 sequence + CLIP pooled, bf16
    m = ExecutionModel(cond_copies=True, reshard_latency_s=0.0, reshard_bandwidth=1.0)
    res = simulate(Scheduler(4, make_policy("static:sp=4"), learn=False), [r], execution=m)
    # ENCODE on 4 ranks: everyone holds the conditioning, nothing is copied later.
    assert all(e.reshard_s == 0 for e in res.trace)
    res = simulate(Scheduler(4, make_policy("fcfs-elastic"), learn=False), [r], execution=m)
    first = next(e for e in res.trace if e.task.kind is TaskKind.DENOISE)
    assert len(first.ranks) > 1 and first.reshard_s >= cond_bytes(r) * (len(first.ranks) - 1)


def test_the_result_spans_first_arrival_to_last_event_with_an_execution_model():
    res = simulate(
        Scheduler(4, make_policy("edf-best-fit")), reqs(), execution=ExecutionModel(host_overhead_s=0.01)
    )
    assert res.start_s == 0.0 and res.end_s == max(o.finish_s for o in res.outcomes.values())


def test_ranks_sharing_cpu_cores_slow_down_when_more_are_busy():
    cost = AnalyticCostModel()
    one = [req("a", 1024, steps=4)]
    alone = simulate(Scheduler(4, make_policy("static:sp=1")), one, execution=ExecutionModel(cores=2))
    plain = simulate(Scheduler(4, make_policy("static:sp=1")), one)
    assert alone.trace == plain.trace  # one busy rank on two cores: no slowdown
    four = [req(f"r{i}", 1024, steps=4) for i in range(4)]
    shared = simulate(
        Scheduler(4, make_policy("static:sp=1,chunk=0"), learn=False), four, execution=ExecutionModel(cores=2)
    )
    last = [e for e in shared.trace if e.task.request_id == "r3" and e.task.kind is TaskKind.DENOISE][0]
    assert last.end_s - last.start_s == pytest.approx(
        2 * cost.task_time(last.task, four[3], 1)
    )  # 4 busy / 2 cores
    # A group's own ranks are already in its profiled time: SP4 alone on 2 cores is not slowed again,
    # and SP2 beside another SP2 is slowed by (4 busy / 2 cores) / (2 / 2).
    sp4 = simulate(
        Scheduler(4, make_policy("static:sp=4,chunk=0"), learn=False), one, execution=ExecutionModel(cores=2)
    )
    assert sp4.trace == simulate(Scheduler(4, make_policy("static:sp=4,chunk=0"), learn=False), one).trace
    two = [req(f"q{i}", 1024, steps=4) for i in range(2)]
    pairs = simulate(
        Scheduler(4, make_policy("static:sp=2,chunk=0"), learn=False), two, execution=ExecutionModel(cores=2)
    )
    second = [e for e in pairs.trace if e.task.request_id == "q1" and e.task.kind is TaskKind.DENOISE][0]
    assert second.end_s - second.start_s == pytest.approx(2 * cost.task_time(second.task, two[1], 2))
    with pytest.raises(ValueError, match="cores"):
        ExecutionModel(cores=-1)


def test_host_work_on_the_shared_cores_slows_the_ranks():
    """Two requests arrive at once on 2 ranks sharing 2 cores, each costing 1 CPU-second of host work
    (half charged at its ENCODE): a's ENCODE sees 1 busy rank + 0.5 core of host load (no slowdown);
    b's sees 2 busy ranks + 1 core: (2 + 1) / 2 = 1.5 times slower."""
    cost = AnalyticCostModel()
    two = [req("a", 1024, steps=4), req("b", 1024, steps=4)]
    m = ExecutionModel(cores=2, host_cpu_s=1.0, host_window_s=1.0)
    res = simulate(Scheduler(2, make_policy("static:sp=1,chunk=0"), learn=False), two, execution=m)
    enc = {e.task.request_id: e for e in res.trace if e.task.kind is TaskKind.ENCODE}
    one = cost.task_time(enc["a"].task, two[0], 1)
    assert enc["a"].end_s - enc["a"].start_s == pytest.approx(one)
    assert enc["b"].end_s - enc["b"].start_s == pytest.approx(1.5 * one)
    # Without host work, 2 ranks on 2 cores run unslowed; without shared cores, host work is ignored.
    plain = simulate(Scheduler(2, make_policy("static:sp=1,chunk=0"), learn=False), two)
    none = simulate(
        Scheduler(2, make_policy("static:sp=1,chunk=0"), learn=False), two, execution=ExecutionModel(cores=2)
    )
    assert none.trace == plain.trace
    ignored = simulate(
        Scheduler(2, make_policy("static:sp=1,chunk=0"), learn=False), two,
        execution=ExecutionModel(host_cpu_s=1.0),
    )  # fmt: skip
    assert ignored.trace == plain.trace


def test_host_load_is_what_the_trailing_window_holds():
    from gfdit.simexec import ExecutionState

    ex = ExecutionState(ExecutionModel(cores=2, host_window_s=0.5), AnalyticCostModel())
    ex._charge_host(0.25, 0.0)
    ex._charge_host(0.5, 0.2)
    assert ex.host_load(0.3) == pytest.approx(1.5)  # 0.75 CPU-s in the last 0.5 s
    assert ex.host_load(0.6) == pytest.approx(1.0)  # the charge at 0.0 left the window
    assert ex.host_load(0.75) == 0.0
    ex._charge_host(5.0, 1.0)
    assert ex.host_load(1.0) == 2.0  # at most the cores


def test_host_cpu_by_size_overrides_the_default_and_survives_json():
    m = ExecutionModel(cores=2, host_cpu_s=0.1, host_cpu_by_size=[[1024, 1024, 0.3]])
    assert m.host_cpu_by_size == ((1024, 1024, 0.3),)
    assert m.request_host_cpu_s(req("a", 1024)) == 0.3
    assert m.request_host_cpu_s(req("b", 512)) == 0.1
    assert ExecutionModel(**m.to_json()) == m
    with pytest.raises(ValueError, match="twice"):
        ExecutionModel(host_cpu_by_size=((8, 8, 0.1), (8, 8, 0.2)))
    with pytest.raises(ValueError, match="host CPU"):
        ExecutionModel(host_cpu_s=-1.0)
    with pytest.raises(ValueError, match="host_window_s"):
        ExecutionModel(host_window_s=0.0)


def test_measured_sharing_replaces_the_ideal_slowdown():
    """Measured: 4 one-rank processes on 2 cores each run 2.4x slower (not 2x), 3 run 1.6x."""
    cost = AnalyticCostModel()
    m = ExecutionModel(cores=2, sharing=[[1, 1.0], [2, 1.0], [3, 1.6], [4, 2.4]])
    assert m.sharing == ((1.0, 1.0), (2.0, 1.0), (3.0, 1.6), (4.0, 2.4))
    assert m.slowdown(2.5) == pytest.approx(1.3)  # interpolated
    assert m.slowdown(8) == pytest.approx(4.8)  # proportional beyond the last point
    assert ExecutionModel(cores=2).slowdown(4) == 2.0 and ExecutionModel().slowdown(4) == 1.0
    assert ExecutionModel(**m.to_json()) == m
    four = [req(f"r{i}", 1024, steps=4) for i in range(4)]
    shared = simulate(Scheduler(4, make_policy("static:sp=1,chunk=0"), learn=False), four, execution=m)
    last = [e for e in shared.trace if e.task.request_id == "r3" and e.task.kind is TaskKind.DENOISE][0]
    assert last.end_s - last.start_s == pytest.approx(2.4 * cost.task_time(last.task, four[3], 1))
    # SP4 alone: its own 4 ranks are in its profiled time, 2.4 / 2.4
    one = [req("a", 1024, steps=4)]
    sp4 = simulate(Scheduler(4, make_policy("static:sp=4,chunk=0"), learn=False), one, execution=m)
    assert sp4.trace == simulate(Scheduler(4, make_policy("static:sp=4,chunk=0"), learn=False), one).trace
    with pytest.raises(ValueError, match="twice"):
        ExecutionModel(sharing=((2, 1.0), (2, 1.1)))
    with pytest.raises(ValueError, match="sharing"):
        ExecutionModel(sharing=((0, 1.0),))


def test_compute_scale_multiplies_every_task():
    one = [req("a", 1024, steps=4)]
    plain = simulate(Scheduler(4, make_policy("static:sp=1,chunk=2"), learn=False), one)
    half = simulate(
        Scheduler(4, make_policy("static:sp=1,chunk=2"), learn=False),
        one,
        execution=ExecutionModel(compute_scale=0.5),
    )
    assert half.outcomes["a"].latency_s == pytest.approx(0.5 * plain.outcomes["a"].latency_s)
    with pytest.raises(ValueError, match="compute_scale"):
        ExecutionModel(compute_scale=0.0)


def test_result_delivery_follows_the_last_task_and_occupies_no_rank():
    one = [req("a", 1024, steps=4)]
    plain = simulate(Scheduler(1, make_policy("static:sp=1"), learn=False), one, execution=ExecutionModel())
    late = simulate(
        Scheduler(1, make_policy("static:sp=1"), learn=False), one, execution=ExecutionModel(result_s=0.05)
    )
    assert late.trace == plain.trace  # the ranks are as busy as before
    assert late.outcomes["a"].latency_s == pytest.approx(plain.outcomes["a"].latency_s + 0.05)
    assert late.end_s == pytest.approx(plain.end_s + 0.05)  # the throughput's span ends at the result
    # On shared cores it is CPU work too: b's result is delivered while a's task still computes
    # (2 ranks, 2 cores: the delivery shares the cores with 1 busy rank, s(2) / s(1) = 1 ideal; with a
    # measured s(2) = 1.5 it takes 1.5 times as long).
    two = [req("a", 1024, steps=8), req("b", 512, steps=2)]
    ex = ExecutionModel(result_s=0.05, cores=2, sharing=((1, 1.0), (2, 1.5), (3, 2.0)))
    res = simulate(Scheduler(2, make_policy("static:sp=1"), learn=False), two, execution=ex)
    b_end = max(e.end_s for e in res.trace if e.task.request_id == "b")
    a_end = max(e.end_s for e in res.trace if e.task.request_id == "a")
    assert b_end < a_end
    assert res.outcomes["b"].finish_s == pytest.approx(b_end + 0.05 * 1.5)
    assert res.outcomes["a"].finish_s == pytest.approx(a_end + 0.05)  # alone by then
    with pytest.raises(ValueError, match="result_s"):
        ExecutionModel(result_s=-1.0)
