"""`gfdit profile` on 2 CPU ranks, and the profile loaded by the Engine's scheduler (rank 0)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.launch import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _engine_estimates(world, path):
    from gfdit.runtime import Engine

    engine = Engine(world, "tiny-flux", "fcfs-elastic", cost_profile=path)
    try:
        if world.rank != 0:
            return None
        from gfdit.tasks import TaskKind

        cost = engine.scheduler.cost_model
        return {
            "step_64_2": cost.step_time("tiny-flux", 64, 64, None, 2),
            "decode_32": cost.stage_time(TaskKind.DECODE, "tiny-flux", 32, 32, None, 1),
            "step_96_1": cost.step_time("tiny-flux", 96, 96, None, 1),
            "analytic_96_1": cost.analytic_step_time("tiny-flux", 96, 96, None, 1),
            "factor": cost.factor(TaskKind.DENOISE, "tiny-flux"),
            # Unmeasured steps: max(learned floor, learned GPU scale x GPU formula) (Note [Cost model]).
            "fitted_96_1": max(
                cost.step_fit("tiny-flux").floor(1),
                cost.step_fit("tiny-flux").gpu_scale * cost.analytic_gpu_time("tiny-flux", 96, 96, None, 1),
            ),
        }
    finally:
        engine.close()


def test_profile_writes_measurements_and_the_engine_starts_from_them(tmp_path):
    out = str(tmp_path / "tiny.json")
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run(
        [sys.executable, "-m", "gfdit.cli", "profile", "--nproc", "2", "--model", "tiny-flux", "--device", "cpu",
         "--sizes", "32,64", "--steps", "2", "--reps", "2", "--out", out],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    data = json.load(open(out))
    assert data["format"] == "gfdit-profile/1" and data["model"] == "tiny-flux" and data["world_size"] == 2
    keys = {(o["kind"], o["width"], o["degree"]) for o in data["observations"]}
    assert keys == {(k, s, 1) for k in ("ENCODE", "DECODE") for s in (32, 64)} | {
        ("DENOISE", s, d) for s in (32, 64) for d in (1, 2)
    }
    assert all(o["seconds"] > 0 for o in data["observations"])
    by_key = {(o["kind"], o["width"], o["degree"]): o["seconds"] for o in data["observations"]}
    est = run_ranks(_engine_estimates, 2, out, timeout=240)[0]
    assert est["step_64_2"] == by_key[("DENOISE", 64, 2)]  # a measured key: the measurement itself
    assert est["decode_32"] == by_key[("DECODE", 32, 1)]
    assert est["step_96_1"] == est["fitted_96_1"]  # unmeasured: the learned floor / GPU-scale model
    bad = subprocess.run(
        [sys.executable, "-m", "gfdit.cli", "profile", "--nproc", "2", "--model", "tiny-flux", "--sizes", "64,x",
         "--out", out], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "--sizes" in bad.stderr


def test_profile_breakdown_smoke(tmp_path):
    """`gfdit profile --breakdown` on 2 CPU ranks (tiny-flux): a row per size x degree with host time,
    busy fraction and time by kind; the SP2 row names its collectives (gfcoll custom ops)."""
    prefix = str(tmp_path / "bd")
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run(
        [sys.executable, "-m", "gfdit.cli", "profile", "--nproc", "2", "--model", "tiny-flux", "--device", "cpu",
         "--sizes", "64x32", "--steps", "2", "--reps", "1", "--out", str(tmp_path / "p.json"), "--breakdown", prefix],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    rows = json.load(open(prefix + ".json"))["rows"]
    assert [(r["width"], r["height"], r["degree"]) for r in rows] == [(64, 32, 1), (64, 32, 2)]
    profile = json.load(open(tmp_path / "p.json"))
    assert {(o["kind"], o["width"], o["height"]) for o in profile["observations"]} == {
        ("ENCODE", 64, 32), ("DECODE", 64, 32), ("DENOISE", 64, 32)
    }
    assert "memory" not in profile  # CUDA only
    for r in rows:
        assert r["wall_ms"] > 0 and 0 < r["host_ms"] <= r["wall_ms"] * 1.05
        assert 0 < r["device_busy_fraction"] <= 1
        assert r["device_ms_by_kind"]["gemm"] > 0 and r["device_ms_by_kind"]["attention"] > 0
    assert rows[0]["device_ms_by_kind"]["collective"] == 0
    assert rows[1]["device_ms_by_kind"]["collective"] > 0
    assert "| 64x32 | 2 |" in open(prefix + ".md").read()
