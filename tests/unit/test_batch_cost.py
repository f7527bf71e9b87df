"""Batched step costs (Note [Batched step cost] in gfdit.cost): the analytic per-batch-size factor,
profiled batched steps (gfdit.profile's batch_observations) and their correction, batched chunks, and the
simulator's price of a batched chunk (gfdit.simexec.ExecutionState.batch_timing)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from gfdit.cost import AnalyticCostModel, CostModel
from gfdit.policy import Assignment
from gfdit.profile import apply_profile, read_profile
from gfdit.request import Request
from gfdit.simexec import ExecutionModel, ExecutionState
from gfdit.tasks import Task, TaskKind

M = "flux-dev"


def test_batch_of_one_is_a_step_and_the_base_model_never_gains():
    cost = AnalyticCostModel()
    for size in (512, 2048):
        assert cost.batch_step_time(M, size, size, None, 1, 1) == cost.step_time(M, size, size, None, 1)
        # CostModel's default (what a model that knows nothing of batching charges): B separate steps.
        assert CostModel.batch_step_time(cost, M, size, size, None, 2, 3) == pytest.approx(
            3 * cost.step_time(M, size, size, None, 2)
        )
    with pytest.raises(ValueError, match="batch"):
        cost.batch_step_time(M, 512, 512, None, 1, 0)


def test_analytic_factor_small_steps_batch_cheaply_large_ones_do_not():
    cost = AnalyticCostModel()
    f = {s: [cost.batch_factor(M, s, s, None, 1, b) for b in (1, 2, 4, 8)] for s in (256, 512, 2048)}
    for s, row in f.items():
        assert row[0] == 1.0 and all(x < y for x, y in zip(row, row[1:], strict=False)), (s, row)
        assert row[-1] <= 8 + 1e-9
    assert f[256][2] < f[512][2] < f[2048][2]  # the fixed per-step cost is shared by the batch
    assert f[2048][2] > 3.5  # compute-bound: batching 4 costs nearly 4 steps
    # The host floor is paid once per batched step: with a floor above the GPU time, batching is free.
    floored = AnalyticCostModel({M: dataclasses.replace(cost.profile(M), host_step_s=1.0)})
    assert floored.batch_factor(M, 512, 512, None, 1, 4) == pytest.approx(1.0)
    # SP: the all-to-all bytes grow with the batch, their latency does not.
    a1 = cost.analytic_batch_gpu_time(M, 1024, 1024, None, 2, 1)
    a4 = cost.analytic_batch_gpu_time(M, 1024, 1024, None, 2, 4)
    assert a1 == pytest.approx(cost.analytic_gpu_time(M, 1024, 1024, None, 2)) and a1 < a4 < 4 * a1


def _profile(tmp_path, batch_rows, rows=None):
    rows = rows or [
        {"kind": "DENOISE", "width": s, "height": s, "frames": None, "degree": 1, "seconds": t}
        for s, t in ((512, 0.070), (1024, 0.175))
    ]
    data = {"format": "gfdit-profile/1", "model": M, "observations": rows, "batch_observations": batch_rows}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_profiled_batched_steps_drive_the_estimates(tmp_path):
    batch_rows = [{"kind": "DENOISE", "width": 512, "height": 512, "frames": None, "degree": 1, "batch": 4,
                   "seconds": 0.120}]  # fmt: skip
    cost = AnalyticCostModel()
    apply_profile(cost, read_profile(_profile(tmp_path, batch_rows), M))
    assert cost.batch_step_time(M, 512, 512, None, 1, 4) == 0.120  # measured key: the measurement
    step512 = cost.step_time(M, 512, 512, None, 1)
    corr = 0.120 / (step512 * cost.analytic_batch_factor(M, 512, 512, None, 1, 4))
    assert cost.batch_correction(M, 4) == pytest.approx(corr) and corr != pytest.approx(1.0)
    # An unmeasured size at the same batch size: step x analytic factor x the learned correction.
    got = cost.batch_step_time(M, 1024, 1024, None, 1, 4)
    want = (
        cost.step_time(M, 1024, 1024, None, 1) * cost.analytic_batch_factor(M, 1024, 1024, None, 1, 4) * corr
    )
    assert got == pytest.approx(want)
    # Another batch size has no correction yet.
    assert cost.batch_correction(M, 2) == 1.0


@pytest.mark.parametrize(
    "row",
    [
        {
            "kind": "DECODE",
            "width": 512,
            "height": 512,
            "frames": None,
            "degree": 1,
            "batch": 2,
            "seconds": 0.1,
        },
        {
            "kind": "DENOISE",
            "width": 512,
            "height": 512,
            "frames": None,
            "degree": 1,
            "batch": 0,
            "seconds": 0.1,
        },
        {"kind": "DENOISE", "width": 512, "height": 512, "frames": None, "degree": 1, "seconds": 0.1},
    ],
)
def test_malformed_batch_rows_are_refused(tmp_path, row):
    with pytest.raises(ValueError, match="batch observation 0 is malformed"):
        read_profile(_profile(tmp_path, [row]), M)


def test_batched_chunk_shrinks_as_members_finish():
    cost = AnalyticCostModel()
    b = {n: cost.batch_step_time(M, 512, 512, None, 1, n) for n in (1, 2, 3)}
    assert cost.batch_chunk_time(M, 512, 512, None, 1, [3, 2, 3]) == pytest.approx(2 * b[3] + b[2])
    assert cost.batch_chunk_time(M, 512, 512, None, 1, [0, 2]) == pytest.approx(2 * b[1])
    assert cost.batch_chunk_time(M, 512, 512, None, 1, [4]) == pytest.approx(4 * b[1])
    with pytest.raises(ValueError, match="steps"):
        cost.batch_chunk_time(M, 512, 512, None, 1, [])


def _member(rid, start, end, ranks, size=512):
    r = Request(rid, M, width=size, height=size, num_inference_steps=8)
    return Assignment(Task(rid, TaskKind.DENOISE, start, end), ranks), r


def test_simulator_prices_a_batched_chunk_from_the_profile(tmp_path):
    batch_rows = [{"kind": "DENOISE", "width": 512, "height": 512, "frames": None, "degree": 2, "batch": 2,
                   "seconds": 0.05}]  # fmt: skip
    rows = [{"kind": "DENOISE", "width": 512, "height": 512, "frames": None, "degree": 2, "seconds": 0.04}]
    cost = AnalyticCostModel()
    apply_profile(cost, read_profile(_profile(tmp_path, batch_rows, rows), M))
    ex = ExecutionState(ExecutionModel(host_overhead_s=0.01), cost)
    members = [_member("a", 0, 2, (0, 1)), _member("b", 4, 7, (0, 1))]
    start, reshard_s, compute_s = ex.batch_timing(members, now=1.0)
    # 2 steps of the profiled batch of 2, then 1 step of b alone (the profiled SP2 step); overhead once.
    assert (start, reshard_s) == (1.0, 0.0)
    assert compute_s == pytest.approx(2 * 0.05 + 0.04 + 0.01)
    with pytest.raises(ValueError, match="cannot be batched"):
        ex.batch_timing([_member("a", 0, 2, (0, 1)), _member("c", 0, 2, (0, 1), size=1024)], now=1.0)
    with pytest.raises(ValueError, match="different groups"):
        ex.batch_timing([_member("a", 0, 2, (0, 1)), _member("b", 0, 2, (1, 0))], now=1.0)
    with pytest.raises(ValueError, match="twice"):
        ex.batch_timing([_member("a", 0, 2, (0, 1)), _member("a", 2, 4, (0, 1))], now=1.0)


def test_observed_batched_chunks_are_learned_per_key():
    cost = AnalyticCostModel(ema=0.5)
    cost.observe_batch(M, 512, 512, None, 1, 4, 0.6, num_steps=3)
    assert cost.batch_step_time(M, 512, 512, None, 1, 4) == pytest.approx(0.2)
    cost.observe_batch(M, 512, 512, None, 1, 4, 0.4, num_steps=1)
    assert cost.batch_step_time(M, 512, 512, None, 1, 4) == pytest.approx(0.3)
    cost.observe_batch(M, 512, 512, None, 1, 1, 0.07)  # batch 1: an ordinary DENOISE observation
    assert cost.step_time(M, 512, 512, None, 1) == pytest.approx(0.07)
    with pytest.raises(ValueError, match="num_steps"):
        cost.observe_batch(M, 512, 512, None, 1, 2, 0.1, num_steps=0)


def test_graph_replayed_steps_pay_no_launch_cost_and_do_not_batch_for_free():
    from gfdit.cost import AnalyticCostModel

    eager, graphs = AnalyticCostModel(), AnalyticCostModel(graph_steps=True)
    c0 = eager.profile("flux-dev").step_fixed_s
    assert c0 > 0
    for size in (256, 512, 1024):
        e = eager.step_time("flux-dev", size, size, None, 1)
        g = graphs.step_time("flux-dev", size, size, None, 1)
        assert abs((e - g) - c0) < 1e-12, (size, e, g)
        assert eager.analytic_batch_factor("flux-dev", size, size, None, 1, 4) < 4 - 1e-6
        assert abs(graphs.analytic_batch_factor("flux-dev", size, size, None, 1, 4) - 4) < 1e-9
