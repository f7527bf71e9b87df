"""bench/sp_scaling.py: speed-ups over the compiled SP1 step and the SP scaling targets."""

from __future__ import annotations

import pytest

from tests.bench_scripts import load_bench_script


def _module():
    return load_bench_script("sp_scaling")


def _profile(compile_mode, graphs, steps):
    obs = [{"kind": "DENOISE", "width": s, "height": s, "frames": None, "degree": d, "seconds": t}
           for (s, d), t in steps.items()]  # fmt: skip
    obs.append({"kind": "ENCODE", "width": 1024, "height": 1024, "frames": None, "degree": 1, "seconds": 9.0})
    return {"format": "gfdit-profile/1", "model": "flux-dev", "compile": compile_mode, "cuda_graphs": graphs,
            "observations": obs}  # fmt: skip


def test_targets_compare_compiled_steps_with_the_compiled_sp1_step():
    m = _module()
    eager = _profile("off", False, {(1024, 1): 0.200, (1024, 4): 0.060})
    fast = _profile("regional", True, {(1024, 1): 0.100, (1024, 4): 0.030, (512, 1): 0.03, (512, 2): 0.021})
    rows = {(r["mode"], r["width"], r["degree"]): r for r in m.table([eager, fast])}
    sp4 = rows[("compiled + graphs", 1024, 4)]
    assert sp4["speedup"] == pytest.approx(0.100 / 0.030) and sp4["target"] == 3.0 and sp4["met"] is True
    sp2 = rows[("compiled + graphs", 512, 2)]
    assert sp2["speedup"] == pytest.approx(0.03 / 0.021) and sp2["met"] is False  # 1.43x < 1.5x
    # Eager rows are measured against the compiled SP1 step too, and carry no target.
    e4 = rows[("eager", 1024, 4)]
    assert e4["speedup"] == pytest.approx(0.100 / 0.060) and e4["target"] is None
    assert ("eager", 1024, 1) in rows and all(r["frames"] is None for r in rows.values())


def test_an_eager_profile_alone_checks_no_target():
    m = _module()
    rows = m.table([_profile("off", False, {(1024, 1): 0.2, (1024, 4): 0.05})])
    assert all(r["target"] is None and r["met"] is None for r in rows)
    assert rows[-1]["speedup"] == pytest.approx(4.0)
