"""Batched DENOISE chunks in policies and the scheduler (Note [Batching in policies], Note [Batched
chunks in the scheduler]): max_batch on every built-in policy, batches of runnable chunks on shared
ranks, ranks busy until every member reports, one cost observation per batch, models that do not
batch never batched, and the contract checks on batch tags."""

from __future__ import annotations

import dataclasses

import pytest

from gfdit.cost import AnalyticCostModel
from gfdit.policy import DEFAULT_MAX_BATCH, Assignment, PolicySpecError, available_policies, make_policy
from gfdit.request import Request
from gfdit.scheduler import PolicyError, Scheduler
from gfdit.tasks import Task, TaskKind, TaskTimings


class CountingCost(AnalyticCostModel):
    def __init__(self) -> None:
        super().__init__()
        self.batch_observations: list[tuple[int, int]] = []

    def observe_batch(self, model, width, height, frames, sp_degree, batch, seconds, num_steps=1):
        self.batch_observations.append((batch, num_steps))
        super().observe_batch(model, width, height, frames, sp_degree, batch, seconds, num_steps)


def _req(rid: str, model: str = "tiny-flux", steps: int = 4, size: int = 64) -> Request:
    frames = 5 if "wan" in model else None
    return Request(rid, model, "p", width=size, height=size, num_inference_steps=steps, num_frames=frames)


def _at_denoise(model: str = "tiny-flux", n: int = 3, cost=None, sizes=None, world: int = 2) -> Scheduler:
    """A `world`-rank scheduler whose `n` requests have all run ENCODE and wait at DENOISE."""
    encode_only = _Fixed(
        lambda view: [
            Assignment(rt.task, (r,))
            for rt, r in zip(
                [rt for rt in view.runnable if rt.kind is TaskKind.ENCODE], view.free_ranks, strict=False
            )
        ]
    )
    sched = Scheduler(world, encode_only, cost)
    for i in range(n):
        sched.submit(_req(f"r{i}", model, size=(sizes or [64] * n)[i]))
    now = 0.0
    while any(rt.kind is TaskKind.ENCODE for rt in sched.view(now).runnable):
        for a in sched.schedule(now):
            sched.on_task_done(a.task, a.ranks, TaskTimings(now, now + 0.1))
        now += 0.1
    return sched


def test_every_builtin_policy_takes_max_batch_and_defaults_to_the_measured_default():
    builtin = [n for n in available_policies() if type(make_policy(n)).__module__ == "gfdit.policy"]
    assert len(builtin) >= 11
    for name in builtin:
        assert make_policy(name).max_batch == DEFAULT_MAX_BATCH == 4
        assert make_policy(f"{name}:max_batch=1").max_batch == 1
        assert make_policy(f"{name}:max_batch=3").max_batch == 3
        assert "max_batch=3" in make_policy(f"{name}:max_batch=3").spec()
        with pytest.raises(PolicySpecError, match="max_batch"):
            make_policy(f"{name}:max_batch=0")


def test_runnable_denoise_chunks_run_as_one_batch_on_shared_ranks():
    cost = CountingCost()
    sched = _at_denoise(cost=cost, world=1)  # one rank: the policy places one chunk, two wait
    sched.policy = make_policy("edf-best-fit:max_batch=4")
    out = sched.schedule(1.0)
    assert sorted(a.task.request_id for a in out) == ["r0", "r1", "r2"]
    assert len({a.batch for a in out}) == 1 and out[0].batch is not None
    assert len({a.ranks for a in out}) == 1
    assert all(a.task.kind is TaskKind.DENOISE for a in out)
    assert all(sched.record(a.task.request_id).history[-1].batch_size == 3 for a in out)
    ranks = out[0].ranks
    assert not set(ranks) & set(sched.free_ranks)
    # The batch's estimated end is the batched chunk's, the same for every member.
    ends = {sched.record(a.task.request_id).expected_end_s for a in out}
    assert len(ends) == 1
    for a in out[:2]:
        sched.on_task_done(a.task, a.ranks, TaskTimings(1.0, 1.5))
        assert not set(ranks) & set(sched.free_ranks)  # busy until every member reported
    sched.on_task_done(out[2].task, out[2].ranks, TaskTimings(1.0, 1.5))
    assert set(ranks) <= set(sched.free_ranks)
    assert cost.batch_observations == [(3, out[0].task.num_steps)]


def test_a_chunk_with_ranks_of_its_own_is_not_pulled_into_a_batch():
    # Two ranks, three chunks: the policy runs two of them in parallel, one per rank; only the third,
    # left waiting, joins a batch (batching the other two on one rank would leave a rank idle and
    # make both later). Four requests on four ranks: nothing is batched at all.
    sched = _at_denoise()
    sched.policy = make_policy("edf-best-fit:max_batch=4,max_sp=1")
    out = sched.schedule(1.0)
    assert sorted(a.task.request_id for a in out) == ["r0", "r1", "r2"]
    assert len({a.ranks for a in out}) == 2
    assert sorted(sum(1 for x in out if x.batch == a.batch) for a in out if a.batch is not None) == [2, 2]
    sched = _at_denoise(n=4, world=4)
    sched.policy = make_policy("static:sp=1,max_batch=4")
    out = sched.schedule(1.0)
    assert len(out) == 4 and all(a.batch is None for a in out) and len({a.ranks for a in out}) == 4


def test_max_batch_one_and_max_batch_cap():
    sched = _at_denoise()
    sched.policy = make_policy("edf-best-fit:max_batch=1")
    assert all(a.batch is None for a in sched.schedule(1.0))
    sched = _at_denoise()
    sched.policy = make_policy("fcfs-elastic:max_batch=2")
    out = sched.schedule(1.0)
    tags = [a.batch for a in out if a.batch is not None]
    assert len(tags) == 2 and len(set(tags)) == 1


@pytest.mark.parametrize("model", ["tiny-qwen-image", "tiny-wan2.2"])
def test_models_that_do_not_batch_are_never_batched(model):
    sched = _at_denoise(model)
    sched.policy = make_policy("edf-best-fit:max_batch=4")
    out = sched.schedule(1.0)
    assert out and all(a.batch is None for a in out)


def test_different_shapes_are_not_batched():
    sched = _at_denoise(n=2, sizes=[64, 32])
    sched.policy = make_policy("fcfs-elastic:max_batch=4")
    assert all(a.batch is None for a in sched.schedule(1.0))


class _Fixed:
    name = "fixed"

    def __init__(self, decide):
        self.decide = decide

    def spec(self):
        return self.name

    def schedule(self, view):
        return self.decide(view)


@pytest.mark.parametrize(
    "model,tags,ranks,match",
    [
        ("tiny-flux", (None, None), ((0,), (0,)), "already assigned"),
        ("tiny-flux", (7, 7), ((0,), (1,)), "runs on"),
        ("tiny-qwen-image", (7, 7), ((0,), (0,)), "does not denoise in batches"),
    ],
)
def test_bad_batches_are_policy_errors(model, tags, ranks, match):
    sched = _at_denoise(model, n=2)

    def decide(view):
        return [Assignment(rt.task, r, batch=t) for rt, t, r in zip(view.runnable, tags, ranks, strict=True)]

    sched.policy = _Fixed(decide)
    with pytest.raises(PolicyError, match=match):
        sched.schedule(1.0)


@pytest.mark.parametrize("execution", [False, True])
def test_simulator_runs_batches_and_they_pay(execution):
    from gfdit.sim import simulate
    from gfdit.simexec import ExecutionModel

    reqs = [_req(f"s{i}", steps=4) for i in range(8)]
    ex = ExecutionModel.worker(0.002, 1e-4, 1e9) if execution else None
    ends = {}
    for spec in ("fcfs-elastic:max_batch=4", "fcfs-elastic:max_batch=1"):
        fresh = [
            Request(r.request_id, r.model, "p", width=64, height=64, num_inference_steps=4) for r in reqs
        ]
        out = simulate(Scheduler(4, make_policy(spec)), fresh, execution=ex)
        assert all(o.state.value == "done" for o in out.outcomes.values())
        ends[spec] = out.end_s
        if spec.endswith("=4"):
            batched = [e for e in out.trace if e.task.kind is TaskKind.DENOISE]
            starts = {}
            for e in batched:
                starts.setdefault((e.start_s, e.ranks), []).append(e)
            assert max(len(v) for v in starts.values()) >= 2  # members start and end together
    assert ends["fcfs-elastic:max_batch=4"] < ends["fcfs-elastic:max_batch=1"]


def test_chunk_batch_size_histogram_in_metrics():
    from types import SimpleNamespace

    from prometheus_client import generate_latest

    from gfdit.server.metrics import ServerMetrics
    from gfdit.sim import simulate

    engine = SimpleNamespace(
        num_queued=lambda: 0, num_running=lambda: 0, world=SimpleNamespace(size=4),
        graph_pool_stats=lambda: {"graphs": 0, "bytes": 0}, ranks_alive=lambda: 4, num_reruns=0,
    )  # fmt: skip
    m = ServerMetrics(engine, lambda: (True, ""))
    reqs = [Request(f"m{i}", "tiny-flux", "p", width=64, height=64, num_inference_steps=4) for i in range(8)]
    sched = Scheduler(4, make_policy("fcfs-elastic:max_batch=4"))
    simulate(sched, reqs)
    sizes = []
    for r in reqs:
        rec = sched.record(r.request_id)
        sizes += [t.batch_size for t in rec.history if t.task.kind is TaskKind.DENOISE]
        m.record_end("image", "completed", rec, None)
    assert max(sizes) >= 2
    values = {}
    for line in generate_latest(m.registry).decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values["gfdit_chunk_batch_size_count"] == len(sizes)
    assert values["gfdit_chunk_batch_size_sum"] == sum(sizes)
    assert values['gfdit_chunk_batch_size_bucket{le="1.0"}'] == sizes.count(1)


def test_batch_command_round_trips_and_checks_its_members():
    import msgspec

    from gfdit.runtime import messages as msg

    def task(tid, rid, ranks=(1, 0), kind=TaskKind.DENOISE):
        req = Request(rid, "tiny-flux", "a cat", width=64, height=64, seed=tid)
        return msg.Task(
            task_id=tid, request=req, kind=kind, start=0, end=2, ranks=ranks, dim_size=16, token_dim=64
        )

    batch = msg.Batch(tasks=(task(1, "a"), task(2, "b")))
    back = msg.decode_command(msg.encode(batch))
    assert back == batch and type(back) is msg.Batch
    done = msg.Done(rank=0, task_id=1, batch_size=2)
    assert msg.decode_event(msg.encode(done)).batch_size == 2
    enc = msgspec.msgpack.Encoder()
    bad = [
        {"op": "batch", "tasks": [msgspec.to_builtins(task(1, "a"))]},  # one member
        {"op": "batch", "tasks": [msgspec.to_builtins(t) for t in (task(1, "a"), task(2, "a"))]},
        {"op": "batch", "tasks": [msgspec.to_builtins(t) for t in (task(1, "a"), task(2, "b", (0, 1)))]},
        {
            "op": "batch",
            "tasks": [msgspec.to_builtins(t) for t in (task(1, "a"), task(2, "b", kind=TaskKind.DECODE))],
        },
    ]
    for data in bad:
        with pytest.raises(msg.MessageError):
            msg.decode_command(enc.encode(data))


# Note [Encoding ahead for batches]: requests served one after the other still batch.


def _one_rank(spec: str, requests, cost=None) -> Scheduler:
    """A 1-rank scheduler under `spec` whose first request has run ENCODE (at t=0, ending at 0.01) and
    waits at DENOISE while the others wait at ENCODE."""
    sched = Scheduler(1, make_policy(spec), cost, learn=False)  # the estimates stay as the test computes them
    for r in requests:
        sched.submit(r)
    (a,) = sched.schedule(0.0)
    assert (a.task.request_id, a.task.kind) == (requests[0].request_id, TaskKind.ENCODE)
    sched.on_task_done(a.task, a.ranks, TaskTimings(0.0, 0.01))
    return sched


def _decisions(sched: Scheduler, now: float, rounds: int) -> list[list[tuple[str, str, int | None]]]:
    """`rounds` rescheduling points from `now`, each task ending 0.01 s after its decision: per point,
    (request, kind, batch tag) of every assignment."""
    out = []
    for _ in range(rounds):
        made = sched.schedule(now)
        out.append([(a.task.request_id, a.task.kind.name, a.batch) for a in made])
        for a in made:
            sched.on_task_done(a.task, a.ranks, TaskTimings(now, now + 0.01))
        now += 0.01
    return out


def test_one_rank_encodes_ahead_then_batches():
    sched = _one_rank("fcfs-elastic:max_batch=4", [_req(f"r{i}") for i in range(4)])
    points = _decisions(sched, 0.01, 4)
    # The head waits at DENOISE while each queued request of its shape is encoded on its rank ...
    assert points[:3] == [[("r1", "ENCODE", None)], [("r2", "ENCODE", None)], [("r3", "ENCODE", None)]]
    # ... then all four run their first chunk as one batch.
    assert sorted(p[0] for p in points[3]) == ["r0", "r1", "r2", "r3"]
    assert {p[1] for p in points[3]} == {"DENOISE"} and len({p[2] for p in points[3]}) == 1
    assert points[3][0][2] is not None
    assert sched.record("r0").history[-1].batch_size == 4
    # Waiting for the encodes counts as a preemption of the head (its rank went to another request).
    assert sched.record("r0").num_preemptions == 1


def test_one_rank_without_batching_serves_one_request_after_the_other():
    sched = _one_rank("fcfs-elastic:max_batch=1", [_req(f"r{i}") for i in range(4)])
    points = _decisions(sched, 0.01, 4)
    # r0's two chunks (4 steps, chunks of 2) and its DECODE, then r1's ENCODE: exactly as before.
    assert points == [
        [("r0", "DENOISE", None)], [("r0", "DENOISE", None)], [("r0", "DECODE", None)], [("r1", "ENCODE", None)]
    ]  # fmt: skip


def test_encode_ahead_stops_at_max_batch():
    sched = _one_rank("fcfs-elastic:max_batch=2", [_req(f"r{i}") for i in range(4)])
    points = _decisions(sched, 0.01, 2)
    assert points[0] == [("r1", "ENCODE", None)]
    assert sorted(p[0] for p in points[1]) == ["r0", "r1"] and points[1][0][2] is not None


def test_encode_ahead_keeps_a_deadline_the_head_meets_alone():
    cost = AnalyticCostModel()
    head = _req("r0")
    encode_s = cost.stage_time(TaskKind.ENCODE, "tiny-flux", 64, 64, None, 1)
    alone_s = cost.remaining_time(head, Task("r0", TaskKind.DENOISE, 0, 2), 1, head.num_inference_steps)
    # From t=0.01, r0 alone ends at 0.01 + alone_s; encoding r1 first would cost it encode_s and more.
    tight = dataclasses.replace(head, deadline_s=0.01 + alone_s + 0.5 * encode_s)
    sched = _one_rank("fcfs-elastic:max_batch=4", [tight, _req("r1"), _req("r2")], cost)
    assert _decisions(sched, 0.01, 1) == [[("r0", "DENOISE", None)]]
    # With room for the encode and the batched chunks, the same head waits for r1's encode.
    loose = dataclasses.replace(head, deadline_s=0.01 + 2 * alone_s)
    sched = _one_rank("fcfs-elastic:max_batch=4", [loose, _req("r1"), _req("r2")], cost)
    assert _decisions(sched, 0.01, 1) == [[("r1", "ENCODE", None)]]


def test_encode_ahead_keeps_a_deadline_the_newcomer_meets_alone():
    cost = AnalyticCostModel()
    late = _req("r1")
    alone_s = cost.standalone_time(late, 1)
    tight = dataclasses.replace(late, deadline_s=0.01 + alone_s + 1e-4)  # met alone, not in a batch
    sched = _one_rank("fcfs-elastic:max_batch=4", [_req("r0"), tight], cost)
    assert _decisions(sched, 0.01, 1) == [[("r0", "DENOISE", None)]]


@pytest.mark.parametrize("other", [dict(size=128), dict(model="tiny-qwen-image")])
def test_no_encode_ahead_for_another_shape_or_model(other):
    sched = _one_rank("fcfs-elastic:max_batch=4", [_req("r0"), _req("r1", **other), _req("r2", **other)])
    assert _decisions(sched, 0.01, 1) == [[("r0", "DENOISE", None)]]


def test_no_encode_ahead_when_batching_does_not_pay():
    from tests.cost_fakes import BaseRulesCostModel

    no_batching = BaseRulesCostModel(lambda d: 0.01, 0.005)  # B steps of a batch cost B steps
    sched = _one_rank("fcfs-elastic:max_batch=4", [_req(f"r{i}") for i in range(3)], no_batching)
    assert _decisions(sched, 0.01, 1) == [[("r0", "DENOISE", None)]]


@pytest.mark.parametrize("name", ["static", "tetriserve", "edf-best-fit", "srtf", "disaggregated"])
def test_every_builtin_policy_encodes_ahead_on_one_rank(name):
    # disaggregated on one rank (no ranks to set apart for stages) runs everything there.
    sched = _one_rank(f"{name}:max_batch=3", [_req(f"r{i}") for i in range(3)])
    points = _decisions(sched, 0.01, 3)
    assert points[:2] == [[("r1", "ENCODE", None)], [("r2", "ENCODE", None)]], points
    assert sorted(p[0] for p in points[2]) == ["r0", "r1", "r2"] and points[2][0][2] is not None


def test_disaggregated_keeps_encode_off_its_denoise_ranks():
    sched = Scheduler(2, make_policy("disaggregated:max_batch=4"))
    for i in range(3):
        sched.submit(_req(f"r{i}"))
    now = 0.0
    for _ in range(12):
        made = sched.schedule(now)
        for a in made:
            if a.task.kind is TaskKind.ENCODE:
                assert a.ranks == (1,), a  # its stage rank
            sched.on_task_done(a.task, a.ranks, TaskTimings(now, now + 0.01))
        now += 0.01


def _trace(spec: str, world: int, requests) -> list[tuple]:
    from gfdit.sim import simulate

    out = simulate(Scheduler(world, make_policy(spec)), [dataclasses.replace(r) for r in requests])
    return [(e.task, e.ranks, e.start_s, e.end_s) for e in out.trace]


@pytest.mark.parametrize("world", [1, 2])
def test_max_batch_one_decisions_are_unchanged(world, monkeypatch):
    """max_batch=1 makes every decision that the policy made before encoding ahead existed: a
    mixed trace simulated with encode_ahead in place and with it taken out gives the same tasks, on
    the same ranks, at the same times, for every built-in policy."""
    import gfdit.policy as policy

    reqs = [
        dataclasses.replace(_req(f"q{i}", size=(64, 128)[i % 2], steps=4 + i % 3), arrival_s=0.004 * i)
        for i in range(10)
    ]
    builtin = [n for n in available_policies() if type(make_policy(n)).__module__ == "gfdit.policy"]
    for name in builtin:
        with_it = _trace(f"{name}:max_batch=1", world, reqs)
        with monkeypatch.context() as m:
            m.setattr(policy, "encode_ahead", lambda view, out, max_batch, chunk, hold=None: list(out))
            without = _trace(f"{name}:max_batch=1", world, reqs)
        assert with_it == without, name


def test_simulator_batches_an_overloaded_queue_on_one_rank():
    """One rank, one shape, arrivals far faster than it serves them: with max_batch=4 the queue's
    requests are encoded ahead and batched (mean batch size > 1) and throughput rises."""
    from gfdit.sim import simulate

    reqs = [dataclasses.replace(_req(f"s{i}", steps=8), arrival_s=0.005 * i) for i in range(24)]
    cost = AnalyticCostModel()
    assert cost.batch_step_time("tiny-flux", 64, 64, None, 1, 4) < 4 * cost.step_time(
        "tiny-flux", 64, 64, None, 1
    )
    results = {}
    for spec in ("fcfs-elastic:max_batch=1", "fcfs-elastic:max_batch=4"):
        sched = Scheduler(1, make_policy(spec), AnalyticCostModel())
        out = simulate(sched, [dataclasses.replace(r) for r in reqs])
        assert out.num_done == len(reqs)
        sizes = [
            t.batch_size
            for r in reqs
            for t in sched.record(r.request_id).history
            if t.task.kind is TaskKind.DENOISE
        ]
        results[spec] = (sum(sizes) / len(sizes), out.throughput_rps)
    alone, batched = results["fcfs-elastic:max_batch=1"], results["fcfs-elastic:max_batch=4"]
    assert alone[0] == 1.0
    assert batched[0] > 2.0, results
    assert batched[1] > 1.3 * alone[1], results


def test_choose_encode_ahead_refuses_bad_input():
    from gfdit.batching import choose_encode_ahead

    sched = _one_rank("fcfs-elastic", [_req("r0"), _req("r1")])
    view = sched.view(0.01)
    head, waiting = view.runnable
    kw = dict(now_s=0.01, degree=1, max_batch=4, first_chunk=lambda rt: 2)
    with pytest.raises(ValueError, match="empty batch"):
        choose_encode_ahead([], [waiting], view.cost, **kw)
    with pytest.raises(ValueError, match="not an ENCODE"):
        choose_encode_ahead([head], [head], view.cost, **kw)
    with pytest.raises(ValueError, match="not a DENOISE"):
        choose_encode_ahead([waiting], [waiting], view.cost, **kw)
    with pytest.raises(ValueError, match="first_chunk"):
        choose_encode_ahead([head], [waiting], view.cost, **{**kw, "first_chunk": lambda rt: 0})
    assert choose_encode_ahead([head], [waiting], view.cost, **kw) == waiting
    assert choose_encode_ahead([head], [waiting], view.cost, **{**kw, "max_batch": 1}) is None
