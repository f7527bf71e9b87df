"""The cost model's floor (Note [Cost model] in gfdit/cost.py): step = max(host(d), gpu(N, d)), learned
from DENOISE measurements so that unmeasured sizes and degrees are right on both sides of the
host/GPU crossover."""

import dataclasses

import pytest

from gfdit.cost import AnalyticCostModel, ModelProfile
from gfdit.models.presets import get_preset
from gfdit.tasks import TaskKind

D = TaskKind.DENOISE
# flux-dev's shapes (24 heads, 57 blocks, width 3072, 512 text tokens) under another name.
TOY = ModelProfile(
    dataclasses.replace(get_preset("flux-dev"), name="toy"),
    step_fixed_s=0.002, step_linear_s=2e-5, step_quadratic_s=4e-9,
)  # fmt: skip
SIZES = (256, 512, 768, 1024, 1536, 2048)


def _truth(cost, size, d, floor1=0.065, floor_sp=0.07, scale=1.3):
    gpu = cost.analytic_gpu_time("toy", size, size, None, d)
    return max(floor1 if d == 1 else floor_sp, scale * gpu)


def test_analytic_step_is_the_max_of_host_and_gpu():
    p = ModelProfile(**{**TOY.__dict__, "host_step_s": 0.05})
    cost = AnalyticCostModel(profiles={"toy": p})
    small_gpu = cost.analytic_gpu_time("toy", 256, 256, None, 1)
    assert small_gpu < 0.05
    assert cost.analytic_step_time("toy", 256, 256, None, 1) == 0.05  # host-bound: the floor
    calls = 57 * 3 * p.host_per_collective_s
    assert cost.analytic_step_time("toy", 256, 256, None, 4) == pytest.approx(
        0.05 + calls
    )  # SP adds host work
    big = cost.analytic_gpu_time("toy", 2048, 2048, None, 1)
    assert cost.analytic_step_time("toy", 2048, 2048, None, 1) == big > 0.05  # GPU-bound
    # Without a known host time (the built-in profiles) the formula is the GPU time alone.
    plain = AnalyticCostModel(profiles={"toy": TOY})
    assert plain.analytic_step_time("toy", 256, 256, None, 1) == small_gpu


def test_floor_and_gpu_scale_learned_from_a_profile_predict_unmeasured_keys():
    cost = AnalyticCostModel(profiles={"toy": TOY})
    measured = [(256, 1), (2048, 1), (256, 2), (2048, 2)]
    for size, d in measured:
        cost.set_observed(D, "toy", size, size, None, d, _truth(cost, size, d))
    fit = cost.step_fit("toy")
    assert fit.gpu_scale == pytest.approx(1.3) and fit.num_points == 4
    assert fit.floor_sp1 == pytest.approx(0.065) and fit.floor_sp == pytest.approx(0.07)
    for size in SIZES:
        for d in (1, 2, 4, 8):
            want = _truth(cost, size, d)
            assert cost.step_time("toy", size, size, None, d) == pytest.approx(want), (size, d)
    # The old estimate (one factor times the formula) is off below the crossover by a lot.
    factor = cost.factor(D, "toy")
    assert abs(factor * cost.analytic_step_time("toy", 512, 512, None, 4) - _truth(cost, 512, 4)) > 0.01


def test_floor_of_an_unmeasured_class_comes_from_the_other_plus_collective_calls():
    cost = AnalyticCostModel(profiles={"toy": TOY})
    for size in (256, 2048):
        cost.set_observed(D, "toy", size, size, None, 1, _truth(cost, size, 1))
    fit = cost.step_fit("toy")
    assert fit.floor_sp1 == pytest.approx(0.065)
    assert fit.floor_sp == pytest.approx(0.065 + 57 * 3 * TOY.host_per_collective_s)
    assert cost.step_time("toy", 256, 256, None, 4) == pytest.approx(fit.floor_sp)


def test_gpu_bound_measurements_set_no_floor_and_online_observations_refit():
    cost = AnalyticCostModel(profiles={"toy": TOY}, ema=1.0)
    g = cost.analytic_gpu_time("toy", 2048, 2048, None, 2)
    cost.observe(D, "toy", 2048, 2048, None, 2, seconds=3 * 2.0 * g, num_steps=3)  # GPU-bound, 2x slower
    fit = cost.step_fit("toy")
    assert fit.gpu_scale == pytest.approx(2.0) and fit.floor_sp1 is None and fit.floor_sp is None
    small = cost.analytic_gpu_time("toy", 256, 256, None, 4)
    assert cost.step_time("toy", 256, 256, None, 4) == pytest.approx(2.0 * small)
    cost.observe(D, "toy", 256, 256, None, 4, seconds=0.08)  # host-bound: the SP floor
    assert cost.step_fit("toy").floor_sp == pytest.approx(0.08)
    assert cost.step_time("toy", 512, 512, None, 2) == pytest.approx(
        max(0.08, 2.0 * cost.analytic_gpu_time("toy", 512, 512, None, 2))
    )
    assert cost.step_fit("other") is None
