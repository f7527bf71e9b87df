"""`gfdit profile --batch-sizes` on 2 CPU ranks: batched steps per size and degree in the profile's
batch_observations, loaded into the cost model as the batched step estimates (Note [Batched step cost])."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env() -> dict:
    """This environment without torchrun's variables, the repository importable."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_profile_measures_batch_sizes(tmp_path):
    from gfdit.cost import AnalyticCostModel
    from gfdit.profile import apply_profile, read_profile

    out = str(tmp_path / "tiny-batch.json")
    env = _env()
    run = subprocess.run(
        [sys.executable, "-m", "gfdit.cli", "profile", "--nproc", "2", "--model", "tiny-flux", "--device", "cpu",
         "--sizes", "64", "--steps", "2", "--reps", "1", "--batch-sizes", "1,3", "--out", out],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "batch 3" in run.stdout
    data = json.load(open(out))
    rows = data["batch_observations"]
    assert {(r["kind"], r["width"], r["degree"], r["batch"]) for r in rows} == {
        ("DENOISE", 64, d, 3) for d in (1, 2)
    }
    assert all(r["seconds"] > 0 for r in rows)
    # The batch-1 rows are where they always were.
    assert {(o["kind"], o["degree"]) for o in data["observations"] if o["kind"] == "DENOISE"} == {
        ("DENOISE", 1),
        ("DENOISE", 2),
    }
    cost = AnalyticCostModel()
    apply_profile(cost, read_profile(out, "tiny-flux"))
    for r in rows:
        assert cost.batch_step_time("tiny-flux", 64, 64, None, r["degree"], 3) == r["seconds"]
    assert cost.batch_correction("tiny-flux", 3) > 0
    bad = subprocess.run(
        [sys.executable, "-m", "gfdit.cli", "profile", "--nproc", "2", "--model", "tiny-flux",
         "--batch-sizes", "0", "--out", out], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "--batch-sizes" in bad.stderr


def test_profile_measures_cfg_parallel_steps(tmp_path):
    """`gfdit profile --cfg` on 4 CPU ranks: CFG-parallel steps (2x1, 2x2) per size in
    cfg_observations, loaded into the cost model as the CFG-parallel step estimates (Note
    [CFG-parallel step cost]); a model without true CFG is refused."""
    from gfdit.cost import AnalyticCostModel
    from gfdit.profile import apply_profile, read_profile

    out = str(tmp_path / "tiny-wan-cfg.json")
    env = _env()
    run = subprocess.run(
        [sys.executable, "-m", "gfdit.cli", "profile", "--nproc", "4", "--model", "tiny-wan", "--device", "cpu",
         "--sizes", "64", "--frames", "5", "--degrees", "1,2", "--steps", "2", "--reps", "1", "--cfg",
         "--out", out],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "CFG-parallel 2x2" in run.stdout
    data = json.load(open(out))
    rows = data["cfg_observations"]
    assert {(r["width"], r["frames"], r["degree"], r["half_degree"]) for r in rows} == {
        (64, 5, 2, 1),
        (64, 5, 4, 2),
    }
    assert all(r["seconds"] > 0 for r in rows)
    cost = AnalyticCostModel()
    predicted = cost.cfg_step_time("tiny-wan", 64, 64, 5, 1)
    apply_profile(cost, read_profile(out, "tiny-wan"))
    for r in rows:
        assert cost.cfg_step_time("tiny-wan", 64, 64, 5, r["half_degree"]) == r["seconds"]
    assert cost.cfg_correction("tiny-wan") > 0
    if predicted != rows[0]["seconds"]:  # unmeasured keys follow the measured / predicted ratio
        assert cost.cfg_correction("tiny-wan") != 1.0
    bad = subprocess.run(
        [sys.executable, "-m", "gfdit.cli", "profile", "--nproc", "2", "--model", "tiny-flux", "--cfg",
         "--out", out], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "--cfg" in bad.stderr and "classifier-free" in bad.stderr
