"""gfcoll-bench on CPU: a 2-process torchrun smoke run (host transport against gloo on a dedicated
group) whose table, JSON, results.md and plots are checked, and the usage errors of bad options."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from gfcoll.bench.__main__ import default_groups, main, parse_size
from gfcoll.bench.driver import WINDOWS, _time_windows
from gfcoll.bench.ops import OPS
from gfcoll.bench.report import first_op_ratios

SIZES = [8, 32, 128, 512, 2048]  # -b 8 -e 4K -f 4
ENV_KEYS = {
    "hostname",
    "cards",
    "driver_version",
    "cuda",
    "nccl",
    "torch",
    "gfcoll_build",
    "git_commit",
    "date",
    "command",
}


def _run(cmd: list[str], env: dict, timeout: float, cwd=None) -> subprocess.CompletedProcess:
    """Runs cmd in its own session; on timeout kills the whole session (torchrun and its ranks)."""
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(
            f"{cmd} did not finish within {timeout} s\n--- stdout\n{out[-4000:]}\n--- stderr\n{err[-4000:]}"
        )
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _env(**extra) -> dict:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _torchrun(nproc: int, args: list[str]) -> list[str]:
    # --standalone: the rendezvous store listens on a port the OS picks, so no fixed port is used.
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
    ] + args


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    args = [
        "-m",
        "gfcoll.bench",
        "-b",
        "8",
        "-e",
        "4K",
        "-f",
        "4",
        "--iters",
        "3",
        "--warmup",
        "1",
        "--check",
    ]
    args += ["--json", str(out / "r.json"), "--plot", str(out / "plots")]
    proc = _run(_torchrun(2, args), _env(), timeout=240, cwd=out)
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    )
    with open(out / "r.json") as f:
        doc = json.load(f)
    return out, proc, doc


def test_smoke_json_rows(smoke):
    _, _, doc = smoke
    assert doc["schema"] == "gfcoll-bench/1"
    assert ENV_KEYS <= set(doc["environment"]), ENV_KEYS - set(doc["environment"])
    assert doc["environment"]["world_size"] == 2
    assert doc["environment"]["transport"] == "host"
    rows = doc["rows"]
    assert {r["op"] for r in rows} == set(OPS)
    for op in OPS:
        for group in ([0, 1], [1, 0]):
            sizes = sorted(r["requested_bytes"] for r in rows if r["op"] == op and r["group"] == group)
            assert sizes == SIZES, (op, group, sizes)
    for r in rows:
        for impl in ("gfcoll", "baseline"):
            e = r[impl]
            assert e["error"] is None, (r["op"], impl, e["error"])
            assert e["time_us"] > 0 and e["algbw_gbs"] > 0 and e["busbw_gbs"] > 0, r
            assert e["wrong"] == 0, r
        assert r["bytes"] > 0 and r["ratio"] > 0
    assert doc["check"] == {"enabled": True, "wrong": 0, "passed": True}
    assert doc["gfcoll_errors"] == 0
    # Timed as nccl-tests does by default; the host time per call is a column of eager CUDA rows only.
    assert doc["options"]["timing"] == "back-to-back" and doc["options"]["windows"] == WINDOWS
    assert all(r[impl]["host_us"] is None for r in rows for impl in ("gfcoll", "baseline"))


def test_smoke_formation(smoke):
    _, _, doc = smoke
    forms = {r["method"]: r for r in doc["formation"]}
    for method in ("gfcoll.group", "new_group.lazy"):
        r = forms[method]
        assert r["status"] == "ok" and r["group"] == [0, 1] and r["reps"] == 5, r
        assert 0 < r["p10_us"] <= r["median_us"] <= r["p90_us"], r
    # A group of gfcoll costs no communication; new_group + a first gloo collective does.
    assert forms["gfcoll.group"]["median_us"] < forms["new_group.lazy"]["median_us"]
    for method in ("nccl.init_rank", "new_group.eager", "split_group"):
        assert forms[method]["status"] == "n/a" and forms[method]["reason"], forms[method]
    # The first operation on a never-used group: one repetition per member order ([0, 1], [1, 0]),
    # then the steady state on the last of them.
    first, steady = forms["gfcoll.first_op"], forms["gfcoll.steady_op"]
    assert first["status"] == "ok" and first["group"] == [0, 1] and first["reps"] == 2, first
    assert steady["status"] == "ok" and steady["group"] == [1, 0] and steady["reps"] == 5, steady
    assert all(t > 0 for t in first["samples_us"] + steady["samples_us"])
    (q,) = first_op_ratios(doc["formation"])
    assert q["first_us"] == first["samples_us"][0] and q["steady_us"] == steady["median_us"], q
    assert q["first_ratio"] == pytest.approx(q["first_us"] / q["steady_us"]), q


def test_smoke_outputs(smoke):
    out, proc, _ = smoke
    for name in [*OPS, "formation"]:
        path = out / "plots" / f"{name}.png"
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    md = (out / "results.md").read_text()
    assert "## Group formation" in md and all(f"## {op}" in md for op in OPS)
    assert "- group [0, 1]: first operation on it" in md and "timing back-to-back" in md
    assert "busbw(GB/s)" in proc.stdout and "# Check: passed" in proc.stdout
    assert proc.stdout.count("# all_reduce  group") == 2  # rank 0 alone prints


def test_back_to_back_windows_time_each_window_whole():
    calls = []
    times, host = _time_windows(lambda: calls.append(time.perf_counter()), 7, cuda=False)
    assert len(calls) == 7 * WINDOWS and len(times) == len(host) == WINDOWS
    # On CPU a window's time is its wall time / iters: at least the spread of its own calls.
    for w, t in enumerate(times):
        window = calls[7 * w : 7 * (w + 1)]
        assert t * 7 >= (window[-1] - window[0]) * 1e6 and t == host[w]


def test_first_op_ratios_pair_each_set_with_its_steady_row():
    def row(method, group, samples, status="ok"):
        return {"method": method, "group": group, "status": status, "samples_us": samples,
                "median_us": sorted(samples)[len(samples) // 2] if samples else None}  # fmt: skip

    forms = [
        row("gfcoll.first_op", [0, 1, 2], [30.0, 10.0, 12.0]),
        row("gfcoll.steady_op", [2, 1, 0], [9.0, 10.0, 11.0]),
        row("gfcoll.first_op", [0, 3], [5.0]),
        row("gfcoll.steady_op", [3, 0], [], status="n/a"),  # a failed steady row: no ratio
    ]
    (q,) = first_op_ratios(forms)
    assert q["group"] == [0, 1, 2] and q["first_us"] == 30.0 and q["median_us"] == 12.0
    assert q["first_ratio"] == pytest.approx(3.0) and q["median_ratio"] == pytest.approx(1.2)


# -- options -------------------------------------------------------------------------------------
def test_parse_size_and_default_groups():
    assert [parse_size(s) for s in ("8", "1K", "4KiB", "256M", "2g")] == [8, 1024, 4096, 256 << 20, 2 << 30]
    assert default_groups(2) == [(0, 1), (1, 0)]
    assert default_groups(4) == [(0, 1, 2, 3), (3, 2, 1, 0), (0, 1), (0, 3), (1, 2, 3)]
    for w in (1, 3, 8):
        assert all(len(set(g)) == len(g) and all(0 <= r < w for r in g) for g in default_groups(w))


BAD = [
    (["--ops", "all_reduce,foo"], "unknown collective"),
    (["--groups", "0,,1"], "is not a rank"),
    (["--timing", "fast"], "invalid choice: 'fast'"),
    (["--groups", "a,b"], "is not a rank"),
    (["--groups", "0,1;"], "is empty"),
    (["--groups", "0,2"], "outside the world"),
    (["--groups", "1,0,1"], "appears twice"),
    (["-b", "1M", "-e", "1K"], "larger than --maxbytes"),
    (["-b", "12Q"], "invalid size"),
    (["-f", "1"], "at least 2"),
    (["--dtype", "float8"], "unknown dtype"),
    (["--op", "prod"], "invalid choice"),
    (["--op", "avg", "--dtype", "int32"], "floating dtype"),
    (["--iters", "0"], "must be >= 1"),
    (["--transport", "tcp"], "invalid choice"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_option_is_a_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv, environ={"RANK": "0", "WORLD_SIZE": "2"})
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: gfcoll-bench" in err and message in err, err


def test_missing_world_size_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["-b", "8"], environ={})
    assert exc.value.code == 2 and "launch with torchrun" in capsys.readouterr().err


def test_bad_option_exits_2_without_traceback():
    proc = _run(
        [sys.executable, "-m", "gfcoll.bench", "--groups", "0,,1"], _env(RANK="0", WORLD_SIZE="2"), timeout=60
    )
    assert proc.returncode == 2, proc.stderr
    assert "usage: gfcoll-bench" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_bad_option_under_torchrun_ends_every_rank():
    # Every rank validates the same options before any collective, so all exit at once: no hang.
    proc = _run(_torchrun(2, ["-m", "gfcoll.bench", "--groups", "0,5"]), _env(), timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("outside the world") == 2, proc.stderr[-4000:]
