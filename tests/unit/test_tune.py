"""gfdit.tune: search expansion, ranking by objective, stalled candidates, and the `gfdit tune` CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from typing import ClassVar

import pytest

from gfdit.bench.workload import Phase, RequestClass, WorkloadSpec, generate, write_trace
from gfdit.policy import Policy, PolicySpecError, register_policy
from gfdit.tune import expand_search, render, tune


@register_policy
@dataclasses.dataclass
class _IdlePolicy(Policy):
    """Never starts anything: the simulator reports it stalled."""

    name: ClassVar[str] = "test-idle"

    def schedule(self, view):
        return []


def _records(rate: float = 0.3, duration: float = 60.0, alpha: float = 2.0):
    classes = (
        RequestClass("S", 512, 512, None, 28, 0.5),
        RequestClass("M", 1024, 1024, None, 28, 0.3),
        RequestClass("L", 2048, 2048, None, 28, 0.2),
    )
    spec = WorkloadSpec("flux-dev", duration, (Phase(0.0, rate),), classes, alpha, 0)
    return spec, generate(spec)


def test_expand_search_is_the_cartesian_product_and_checks_every_value():
    assert expand_search("srtf") == ["srtf"]
    got = expand_search("edf-best-fit:chunk=1|2,tol=0.05|0.1")
    assert got == [
        "edf-best-fit:chunk=1,tol=0.05", "edf-best-fit:chunk=1,tol=0.1",
        "edf-best-fit:chunk=2,tol=0.05", "edf-best-fit:chunk=2,tol=0.1",
    ]  # fmt: skip
    for bad, words in [
        ("edf-best-fit:chunk=1|x", "expects int"),
        ("edf-best-fit:chunk=1|", "key=v1|v2"),
        ("edf-best-fit:chunk=2|2", "twice"),
        ("edf-best-fit:nope=1", "no parameter"),
        ("no-such-policy:chunk=1", "unknown policy"),
    ]:
        with pytest.raises(PolicySpecError, match=words):
            expand_search(bad)


def test_tune_ranks_by_the_objective_with_baselines_and_stalled_candidates_last():
    _, records = _records()
    ranked = tune(
        records, world_size=4, searches=["edf-best-fit:chunk=1|4", "test-idle"], baselines=["static:sp=4"],
        objective="mean",
    )  # fmt: skip
    specs = [c.spec for c in ranked]
    assert sorted(specs) == sorted(
        ["edf-best-fit:chunk=1", "edf-best-fit:chunk=4", "static:sp=4", "test-idle"]
    )
    assert (
        specs[-1] == "test-idle" and ranked[-1].error is not None and "left them waiting" in ranked[-1].error
    )
    means = [c.mean_latency_s for c in ranked[:-1]]
    assert means == sorted(means)
    assert [c.baseline for c in ranked if c.spec == "static:sp=4"] == [True]
    done = [c for c in ranked if c.error is None]
    assert all(c.completed == len(records) for c in done)
    # On this mixed load the elastic policy beats the static baseline (the case gf-dit is built for).
    by_spec = {c.spec: c for c in ranked}
    assert by_spec["edf-best-fit:chunk=1"].mean_latency_s < by_spec["static:sp=4"].mean_latency_s
    slo_first = tune(records, world_size=4, searches=["edf-best-fit:chunk=1|None|4"],
                     baselines=["static:sp=4", "edf-best-fit"])  # fmt: skip
    assert len(slo_first) == 4  # chunk=None is edf-best-fit's default: evaluated once, as the baseline
    attain = [c.slo_attainment for c in slo_first]
    assert attain == sorted(attain, reverse=True)
    text = render(ranked, {"trace": "t", "num_requests": len(records), "world_size": 4, "objective": "mean",
                           "noise": 0.0, "seeds": [0]})  # fmt: skip
    assert "(baseline)" in text and "stalled" in text and text.count("\n| ") == 2 + 4  # header, rule, rows


def test_noise_and_seeds_average_several_simulations():
    _, records = _records(rate=0.2, duration=40.0)
    one = tune(records, world_size=4, searches=["fcfs-elastic"], noise=0.3, seeds=(0,))[0]
    same = tune(records, world_size=4, searches=["fcfs-elastic"], noise=0.3, seeds=(0,))[0]
    three = tune(records, world_size=4, searches=["fcfs-elastic"], noise=0.3, seeds=(0, 1, 2))[0]
    assert one == same  # deterministic per seed
    assert three.mean_latency_s != one.mean_latency_s and math.isfinite(three.mean_latency_s)


def test_tune_refuses_bad_input():
    _, records = _records(duration=20.0)
    with pytest.raises(ValueError, match="objective"):
        tune(records, world_size=4, searches=["srtf"], objective="fast")
    with pytest.raises(ValueError, match="nothing to evaluate"):
        tune(records, world_size=4, searches=[])
    with pytest.raises(ValueError, match="no requests"):
        tune([], world_size=4, searches=["srtf"])
    with pytest.raises(ValueError, match="exceed the limit"):
        tune(records, world_size=4, searches=["edf-best-fit:chunk=1|2|3,tol=0.1|0.2"], max_candidates=5)
    with pytest.raises(PolicySpecError):
        tune(records, world_size=4, searches=[], baselines=["static:sp=zero"])


def test_cli_writes_results_and_names_the_best(tmp_path):
    spec, records = _records(duration=30.0)
    trace = tmp_path / "trace.jsonl"
    write_trace(str(trace), spec, records)
    out = subprocess.run(
        [sys.executable, "-m", "gfdit.cli", "tune", "--trace", str(trace), "--world-size", "4",
         "--search", "edf-best-fit:chunk=1|2", "--baseline", "static:sp=4", "--out", str(tmp_path / "t")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    best = out.stdout.strip().splitlines()[-1]
    assert best.startswith("best: edf-best-fit:chunk="), out.stdout
    data = json.loads((tmp_path / "t" / "results.json").read_text())
    assert len(data["candidates"]) == 3 and data["meta"]["world_size"] == 4
    assert (tmp_path / "t" / "results.md").read_text().count("\n| ") == 2 + 3
    bad = subprocess.run(
        [sys.executable, "-m", "gfdit.cli", "tune", "--trace", str(trace), "--world-size", "4",
         "--search", "edf-best-fit:chunk=x"], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "expects int" in bad.stderr


def _profile_file(tmp_path, **over):
    data = {
        "format": "gfdit-profile/1", "model": "flux-dev",
        "observations": [
            {"kind": "DENOISE", "width": 512, "height": 512, "frames": None, "degree": 1, "seconds": 0.2},
            {"kind": "DENOISE", "width": 512, "height": 512, "frames": None, "degree": 4, "seconds": 0.3},
            {"kind": "ENCODE", "width": 512, "height": 512, "frames": None, "degree": 1, "seconds": 0.5},
        ],
    }  # fmt: skip
    data.update(over)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_cost_profile_read_apply_and_tune(tmp_path):
    from gfdit.cost import AnalyticCostModel
    from gfdit.profile import apply_profile, read_profile
    from gfdit.tasks import TaskKind

    prof = read_profile(_profile_file(tmp_path), model="flux-dev")
    cost = AnalyticCostModel()
    apply_profile(cost, prof)
    assert cost.step_time("flux-dev", 512, 512, None, 4) == 0.3
    assert cost.stage_time(TaskKind.ENCODE, "flux-dev", 2048, 2048, None, 1) == pytest.approx(0.5)  # any size
    ratios = [0.2 / cost.analytic_step_time("flux-dev", 512, 512, None, 1),
              0.3 / cost.analytic_step_time("flux-dev", 512, 512, None, 4)]  # fmt: skip
    assert cost.factor(TaskKind.DENOISE, "flux-dev") == pytest.approx(sum(ratios) / 2)
    _, records = _records(duration=30.0)
    plain = tune(records, world_size=4, searches=[], baselines=["static:sp=4"])[0]
    slow = tune(records, world_size=4, searches=[], baselines=["static:sp=4"], cost_profile=prof)[0]
    assert slow.mean_latency_s != plain.mean_latency_s  # the simulation runs on the profiled costs
    for over, words in [
        ({"format": "x"}, "expected format"),
        ({"model": "wan2.1-1.3b"}, "is for model"),
        ({"observations": []}, "no observations"),
        (
            {
                "observations": [
                    {"kind": "DENOISE", "width": 0, "height": 8, "frames": None, "degree": 1, "seconds": 1.0}
                ]
            },
            "malformed",
        ),  # fmt: skip
    ]:
        with pytest.raises(ValueError, match=words):
            read_profile(_profile_file(tmp_path, **over), model="flux-dev")
    with pytest.raises(ValueError, match="not JSON"):
        (tmp_path / "bad.json").write_text("{")
        read_profile(str(tmp_path / "bad.json"))


def test_bench_gen_takes_standalone_latencies_from_a_profile(tmp_path):
    from gfdit.bench.workload import read_trace

    prof = _profile_file(tmp_path)
    out = str(tmp_path / "trace.jsonl")
    cmd = [sys.executable, "-m", "gfdit.cli", "bench", "gen", "--model", "flux-dev", "--duration", "20",
           "--rate", "0.5", "--class", "S:size=512x512,steps=10,weight=1", "--alpha", "2", "--out", out]  # fmt: skip
    run = subprocess.run([*cmd, "--cost-profile", prof], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    meta, records = read_trace(out)
    assert meta["spec"]["slo_source"] == "profiled"
    # The profile's ENCODE (0.5 s) and SP1 step (0.2 s) are in the one-rank standalone latency.
    assert meta["spec"]["standalone_s"]["S"] > 0.5 + 10 * 0.2
    assert all(r.slo_s == pytest.approx(2 * meta["spec"]["standalone_s"]["S"]) for r in records)
    plain = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0 and read_trace(out)[0]["spec"]["slo_source"] == "analytic"
    bad = subprocess.run([*cmd, "--cost-profile", prof, "--calibrate-url", "http://127.0.0.1:1"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "not both" in bad.stderr


def test_ties_are_said_with_the_reason():
    from gfdit.tune import Candidate, tie_note, tied_best

    def cand(spec, slo, mean, baseline=False):
        return Candidate(spec, baseline, slo, mean, 2 * mean, 0.5, 10.0, 0.0)

    same = [
        cand("static:sp=4", 1.0, 3.0, True),
        cand("edf-best-fit:chunk=4", 1.0, 3.0),
        cand("srtf", 1.0, 3.0),
    ]
    assert [c.spec for c in tied_best(same, "slo")] == [c.spec for c in same]
    note = tie_note(same, "slo")
    assert note.startswith("3 candidates tie on slo") and "identical in every column" in note, note
    assert "busier trace" in note and "`static:sp=4` (baseline)" in note
    text = render(same, {"trace": "t", "num_requests": 3, "world_size": 4, "objective": "slo", "noise": 0,
                         "seeds": [0]})  # fmt: skip
    assert text.count("(tied)") == 3 and "identical in every column" in text
    differ = [cand("a", 1.0, 2.0), cand("b", 1.0, 3.0), cand("c", 0.5, 1.0)]
    assert [c.spec for c in tied_best(differ, "slo")] == ["a", "b"]
    assert "differ in other columns" in tie_note(differ, "slo")
    assert tie_note(differ, "mean") is None and tied_best(differ, "mean") == [differ[0]]
    lone = [cand("a", 1.0, 2.0), cand("b", 0.9, 1.0)]
    assert tie_note(lone, "slo") is None and "(tied)" not in render(lone, {**{"trace": "t"}, "num_requests": 2,
        "world_size": 4, "objective": "slo", "noise": 0, "seeds": [0]})  # fmt: skip


def test_cli_says_when_the_best_ties(tmp_path):
    # A light trace: every policy meets every deadline the same way.
    spec, records = _records(rate=0.02, duration=100.0, alpha=50.0)
    trace = tmp_path / "trace.jsonl"
    write_trace(str(trace), spec, records)
    out = subprocess.run(
        [sys.executable, "-m", "gfdit.cli", "tune", "--trace", str(trace), "--world-size", "4",
         "--search", "edf-best-fit:tol=0.05|0.15", "--baseline", "static:sp=4", "--objective", "slo"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "tie on slo" in out.stdout, out.stdout
    assert "(tied with" in out.stdout.strip().splitlines()[-1], out.stdout
