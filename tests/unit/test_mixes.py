"""Named mixes (gfdit.bench.mixes), per-class alpha/priority/preemptible in traces and requests, target
load -> rate, the two-state MMPP, and `gfdit bench gen` with them. Fixed seeds; statistical bounds are
several standard deviations wide."""

from __future__ import annotations

import json
import statistics

import pytest

from gfdit.bench.mixes import mix_classes
from gfdit.bench.workload import (
    Mmpp,
    Phase,
    WorkloadSpec,
    analytic_standalone,
    generate,
    mmpp_arrivals,
    offered_load,
    parse_mmpp,
    rate_for_load,
    read_trace,
    write_trace,
)
from gfdit.cli import main


def test_paper_mixes_define_the_classes():
    img = {c.name: c for c in mix_classes("paper-image", video=False)}
    assert [(c.width, c.height, c.num_frames) for c in img.values()] == [
        (512, 512, None), (1024, 1024, None), (1536, 1536, None)
    ]  # fmt: skip
    assert [(c.priority, c.alpha, c.preemptible) for c in img.values()] == [
        (100, 1.5, False), (50, 2.0, False), (0, 6.0, True)
    ]  # fmt: skip
    assert all(c.num_inference_steps == 50 for c in img.values())
    vid = mix_classes("paper-video", video=True)
    assert [(c.height, c.width, c.num_frames) for c in vid] == [
        (480, 832, 49),
        (480, 832, 81),
        (720, 1280, 81),
    ]
    with pytest.raises(ValueError, match="video mix"):
        mix_classes("paper-video", video=False)
    with pytest.raises(ValueError, match="unknown mix"):
        mix_classes("paper-audio")


def test_per_class_alpha_priority_preemptible_reach_the_request(tmp_path):
    classes = mix_classes("paper-image")
    spec = WorkloadSpec("flux-dev", 200.0, (Phase(0.0, 0.5),), classes, alpha=3.0, seed=2)
    records = generate(spec)
    standalone = analytic_standalone("flux-dev", classes)
    alphas = {"S": 1.5, "M": 2.0, "L": 6.0}
    assert {r.cls for r in records} == {"S", "M", "L"}
    for r in records:
        assert r.slo_s == pytest.approx(alphas[r.cls] * standalone[r.cls])
        req = r.to_request()
        assert (req.priority, req.preemptible, req.slo_class) == (
            {"S": 100, "M": 50, "L": 0}[r.cls], r.cls == "L", r.cls
        )  # fmt: skip
    path = tmp_path / "t.jsonl"
    write_trace(str(path), spec, records)
    meta, back = read_trace(str(path))
    assert back == records and meta["spec"]["classes"][2]["preemptible"] is True
    # A trace written before these fields existed still reads (defaults: priority 0, not preemptible).
    lines = path.read_text().splitlines()
    old = [lines[0]] + [json.dumps({k: v for k, v in json.loads(x).items() if k not in ("priority", "preemptible")})
                        for x in lines[1:]]  # fmt: skip
    path.write_text("\n".join(old) + "\n")
    _, back = read_trace(str(path))
    assert all(r.priority == 0 and not r.preemptible for r in back)


def test_target_load_gives_the_rate_that_offers_it():
    classes = mix_classes("paper-image")
    standalone = analytic_standalone("flux-dev", classes)
    rate = rate_for_load(0.8, 8, classes, standalone)
    mean_work = sum(standalone.values()) / 3  # equal weights
    assert rate == pytest.approx(0.8 * 8 / mean_work)
    spec = WorkloadSpec("flux-dev", 4000.0, (Phase(0.0, rate),), classes, 3.0, seed=0)
    records = generate(spec)
    assert offered_load(records, 8, 4000.0) == pytest.approx(0.8, rel=0.1)  # ~1000 requests: ~4 % sd
    with pytest.raises(ValueError, match="target load"):
        rate_for_load(0.0, 8, classes, standalone)


def test_mmpp_mean_rate_and_burstiness():
    m = Mmpp(0.5, 5.0, 40.0, 10.0)
    assert m.mean_rate == pytest.approx((0.5 * 40 + 5.0 * 10) / 50)
    assert (
        m.scaled(2.8).mean_rate == pytest.approx(2.8)
        and m.scaled(2.8).rate_high / m.scaled(2.8).rate_low == 10
    )
    import random

    arrivals = mmpp_arrivals(m, 20000.0, random.Random(0))
    assert len(arrivals) / 20000.0 == pytest.approx(m.mean_rate, rel=0.1)
    assert arrivals == sorted(arrivals) and 0 <= arrivals[0] and arrivals[-1] < 20000.0
    # Bursty: counts per 10 s window are over-dispersed (a Poisson process has variance == mean).
    counts = [0] * 2000
    for t in arrivals:
        counts[int(t // 10)] += 1
    assert statistics.variance(counts) > 3 * statistics.mean(counts)
    assert parse_mmpp("0.5,5,40,10") == m
    for bad in ("1,2,3", "1,2,0,4", "-1,2,3,4", "a,b,c,d"):
        with pytest.raises(ValueError):
            parse_mmpp(bad)


def test_bench_gen_with_mix_target_load_and_mmpp(tmp_path, capsys):
    out = tmp_path / "t.jsonl"
    argv = ["bench", "gen", "--model", "flux-dev", "--mix", "paper-image", "--target-load", "0.5",
            "--world-size", "8", "--duration", "600", "--seed", "3", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    meta, records = read_trace(str(out))
    spec = meta["spec"]
    assert spec["mix"] == "paper-image" and spec["target_load"] == 0.5 and spec["world_size"] == 8
    assert offered_load(records, 8, 600.0) == pytest.approx(0.5, rel=0.35)
    assert main([*argv, "--mmpp", "0.1,1,60,20"]) == 0
    meta, _ = read_trace(str(out))
    assert meta["spec"]["mmpp"]["rate_high"] / meta["spec"]["mmpp"]["rate_low"] == pytest.approx(10)
    assert meta["spec"]["mean_rate"] == pytest.approx(spec["mean_rate"])
    for bad, message in (
        (["--target-load", "0.5"], "needs --world-size"),
        (["--mmpp", "1,2,3,4", "--rate", "1"], "--mmpp sets the rates"),
        ([], "give one of"),
        (["--rate", "1", "--class", "S:size=64x64,steps=2"], "not both"),
    ):
        base = [
            "bench",
            "gen",
            "--model",
            "flux-dev",
            "--duration",
            "10",
            "--mix",
            "paper-image",
            "--out",
            str(out),
        ]
        with pytest.raises(SystemExit) as e:
            main(base + bad)
        assert e.value.code == 2 and message in capsys.readouterr().err
