"""gfdit.bench.workload: arrival rates (Poisson and piecewise), the class mix, deadlines from the cost
model or calibration, determinism in the seed, the trace file round trip, and spec errors. Fixed
seeds; statistical bounds are 4-5 standard deviations wide, so they fail only on a real bias."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from gfdit.bench.workload import (
    Phase,
    RequestClass,
    WorkloadSpec,
    analytic_standalone,
    default_classes,
    generate,
    parse_class,
    parse_phases,
    poisson_arrivals,
    read_trace,
    write_trace,
)
from gfdit.cost import AnalyticCostModel
from gfdit.models.presets import check_request, get_preset
from gfdit.request import Request

CLASSES = (
    RequestClass("S", 32, 32, None, 2, 0.5),
    RequestClass("M", 64, 64, None, 4, 0.3),
    RequestClass("L", 128, 128, None, 8, 0.2),
)


def _spec(**kw) -> WorkloadSpec:
    base = dict(
        model="tiny-flux", duration_s=500.0, phases=(Phase(0.0, 20.0),), classes=CLASSES, alpha=3.0, seed=1
    )
    base.update(kw)
    return WorkloadSpec(**base)


def test_poisson_rate_and_exponential_gaps():
    records = generate(_spec())
    n, rate, duration = len(records), 20.0, 500.0
    # Count ~ Poisson(rate * duration): within 5 standard deviations.
    assert abs(n - rate * duration) < 5 * math.sqrt(rate * duration), n
    times = [r.arrival_s for r in records]
    assert times == sorted(times) and 0 <= times[0] and times[-1] < duration
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    mean = statistics.fmean(gaps)
    assert abs(mean - 1 / rate) < 0.05 / rate, mean
    # Exponential gaps: coefficient of variation 1 (a fixed-rate or bursty generator fails this).
    cv = statistics.pstdev(gaps) / mean
    assert abs(cv - 1.0) < 0.05, cv


def test_piecewise_poisson_rates_per_phase():
    phases = (Phase(0.0, 5.0), Phase(100.0, 40.0), Phase(200.0, 0.0), Phase(250.0, 10.0))
    records = generate(_spec(duration_s=400.0, phases=phases))
    times = [r.arrival_s for r in records]
    bounds = [(0.0, 100.0, 5.0), (100.0, 200.0, 40.0), (200.0, 250.0, 0.0), (250.0, 400.0, 10.0)]
    for lo, hi, rate in bounds:
        count = sum(lo <= t < hi for t in times)
        expected = rate * (hi - lo)
        assert abs(count - expected) <= 5 * math.sqrt(max(expected, 1.0)), (lo, hi, count, expected)
    assert not any(200.0 <= t < 250.0 for t in times)


def test_class_mix_follows_weights():
    records = generate(_spec())
    n = len(records)
    for c in CLASSES:
        share = sum(r.cls == c.name for r in records) / n
        sigma = math.sqrt(c.weight * (1 - c.weight) / n)
        assert abs(share - c.weight) < 5 * sigma, (c.name, share)
    # Each record carries its class's shape.
    by_name = {c.name: c for c in CLASSES}
    for r in records[:200]:
        c = by_name[r.cls]
        assert (r.width, r.height, r.num_frames, r.num_inference_steps) == (
            c.width, c.height, c.num_frames, c.num_inference_steps,
        )  # fmt: skip


def test_deadlines_are_alpha_times_analytic_standalone():
    spec = _spec(duration_s=50.0, alpha=2.5)
    records = generate(spec)
    cost = AnalyticCostModel()
    expected = {}
    for c in CLASSES:
        req = Request(
            "x", "tiny-flux", "p", width=c.width, height=c.height, num_inference_steps=c.num_inference_steps
        )
        expected[c.name] = cost.standalone_time(req, sp_degree=1)
    assert analytic_standalone("tiny-flux", CLASSES) == pytest.approx(expected)
    assert expected["S"] < expected["M"] < expected["L"]
    for r in records:
        assert r.standalone_s == pytest.approx(expected[r.cls])
        assert r.slo_s == pytest.approx(2.5 * expected[r.cls])
        assert r.deadline_s == pytest.approx(r.arrival_s + r.slo_s)


def test_calibrated_standalone_overrides_the_cost_model():
    measured = {"S": 0.2, "M": 0.5, "L": 1.5}
    records = generate(_spec(duration_s=20.0, standalone_s=measured, slo_source="calibrated", alpha=4.0))
    assert records
    for r in records:
        assert r.slo_s == pytest.approx(4.0 * measured[r.cls])
    with pytest.raises(ValueError, match="standalone"):
        generate(_spec(duration_s=20.0, standalone_s={"S": 0.2}))


def test_same_seed_same_trace_other_seed_other_trace():
    a, b = generate(_spec(duration_s=30.0)), generate(_spec(duration_s=30.0))
    c = generate(_spec(duration_s=30.0, seed=2))
    assert a == b
    assert [r.arrival_s for r in a] != [r.arrival_s for r in c]
    assert len({r.seed for r in a}) == len(a)  # image seeds are drawn per request


def test_poisson_arrivals_direct():
    rng = random.Random(7)
    assert poisson_arrivals([Phase(0.0, 0.0)], 100.0, rng) == []
    times = poisson_arrivals([Phase(0.0, 100.0)], 10.0, rng)
    assert all(0 <= t < 10.0 for t in times) and abs(len(times) - 1000) < 5 * math.sqrt(1000)


def test_trace_round_trip(tmp_path):
    spec = _spec(duration_s=5.0)
    records = generate(spec)
    path = tmp_path / "trace.jsonl"
    write_trace(str(path), spec, records)
    meta, back = read_trace(str(path))
    assert back == records
    assert meta["num_requests"] == len(records)
    assert sum(meta["per_class"].values()) == len(records)
    assert meta["spec"]["alpha"] == 3.0 and meta["spec"]["seed"] == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"request_id": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_trace(str(bad))


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-wan", "flux-dev", "wan2.1-1.3b"])
def test_default_classes_are_valid_requests(model):
    classes = default_classes(model)
    assert [c.name for c in classes] == ["S", "M", "L"]
    assert sum(c.weight for c in classes) == pytest.approx(1.0)
    preset = get_preset(model)
    for c in classes:
        req = Request("x", model, "p", width=c.width, height=c.height, num_frames=c.num_frames,
                      num_inference_steps=c.num_inference_steps)  # fmt: skip
        check_request(preset, req)  # raises if the class cannot run on the model
    work = [c.width * c.height * (c.num_frames or 1) for c in classes]
    assert work[0] < work[1] <= work[2]


def test_parsers():
    c = parse_class("XL:size=256x128,steps=6,weight=0.25,frames=9")
    assert (c.name, c.width, c.height, c.num_inference_steps, c.weight, c.num_frames) == (
        "XL",
        256,
        128,
        6,
        0.25,
        9,
    )
    assert parse_class("A:size=32x32,steps=2").weight == 1.0
    for bad in (
        "A",
        "A:size=32,steps=2",
        "A:steps=2",
        "A:size=32x32,steps=2,color=red",
        "A:size=32x32,steps=0",
    ):
        with pytest.raises(ValueError):
            parse_class(bad)
    assert parse_phases("3.5") == (Phase(0.0, 3.5),)
    assert parse_phases("0:1,10:4") == (Phase(0.0, 1.0), Phase(10.0, 4.0))
    with pytest.raises(ValueError):
        parse_phases("0:x")


def test_spec_errors():
    with pytest.raises(ValueError, match="start at 0"):
        _spec(phases=(Phase(1.0, 2.0),))
    with pytest.raises(ValueError, match="increase"):
        _spec(phases=(Phase(0.0, 2.0), Phase(5.0, 1.0), Phase(5.0, 3.0)))
    with pytest.raises(ValueError, match="alpha"):
        _spec(alpha=0.0)
    with pytest.raises(ValueError, match="unique"):
        _spec(classes=(CLASSES[0], CLASSES[0]))
    with pytest.raises(ValueError, match="needs frames"):
        generate(_spec(model="tiny-wan", duration_s=5.0))
    with pytest.raises(ValueError, match="no frames"):
        generate(_spec(classes=(RequestClass("V", 64, 64, 9, 2, 1.0),), duration_s=5.0))
