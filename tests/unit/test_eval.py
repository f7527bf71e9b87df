"""gfdit eval: the sweep's metrics, summary and target tables, the degree extrapolation check, the
fidelity metrics and errors, and the CLI's usage errors. Small simulated workloads only."""

from __future__ import annotations

import json
import math

import pytest

from gfdit.cli import main
from gfdit.eval.fidelity import calibrated_overhead, errors, measured_metrics, simulated_metrics
from gfdit.eval.sweep import SweepConfig, degree_check, run_sweep, summarize, write_sweep
from gfdit.simexec import ExecutionModel

PROFILE = {
    "format": "gfdit-profile/1",
    "model": "flux-dev",
    "observations": [
        {"kind": "DENOISE", "width": 512, "height": 512, "frames": None, "degree": d, "seconds": s}
        for d, s in ((1, 0.10), (2, 0.08), (4, 0.07))
    ],
}


def test_sweep_runs_every_cell_and_summarizes(tmp_path):
    cfg = SweepConfig("flux-dev", 4, "paper-image", (0.1, 0.8), ("static:sp=4", "edf-best-fit", "tetriserve"),
                      seeds=1, num_requests=10)  # fmt: skip
    result = run_sweep(cfg)
    assert len(result["runs"]) == 2 * 3
    for r in result["runs"]:
        assert r["completed"] == r["num_requests"] and 0 <= r["slo"] <= 1 and r["gpu_s"] > 0
        assert set(r["slo_per_class"]) <= {"S", "M", "L"}
    summary = write_sweep(result, str(tmp_path), plots=True)
    table = summary["table"]
    assert table["edf-best-fit"]["0.8"]["slo"] >= table["static:sp=4"]["0.8"]["slo"]
    g = summary["goodput"]["edf-best-fit"]
    assert g["load"] in (0.1, 0.8, None)
    if g["load"] is not None:
        assert g["goodput_rps"] == table["edf-best-fit"][str(g["load"])]["throughput_rps"]
    t = summary["targets"]
    assert {
        "goodput_vs_fixed_pipeline",
        "slo_at_0.8_vs_tetriserve",
        "mean_latency_at_0.8_vs_fixed_pipeline",
    } <= set(t)
    m = t["mean_latency_at_0.8_vs_fixed_pipeline"]
    assert m["ratio"] == pytest.approx(m["elastic_s"] / m["baseline_s"]) and m["met"] == (m["ratio"] <= 0.1)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"]["targets"].keys() == t.keys()
    assert "## Targets" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "slo_per_class.png").stat().st_size > 1000


def test_goodput_is_the_throughput_at_the_highest_load_with_90_percent_slo():
    runs = [
        {"policy": "p", "load": x, "seed": 0, "throughput_rps": x * 10, "mean_latency_s": 1.0, "p99_latency_s": 2.0,
         "slo": s, "slo_per_class": {"S": s}, "gpu_s": 1.0, "preemptions": 0, "reshards": 0, "reshard_bytes": 0,
         "mean_chunk_degree": 1.0, "completed": 1}
        for x, s in ((0.2, 1.0), (0.5, 0.95), (0.8, 0.7))
    ]  # fmt: skip
    config = {"policies": ["p"], "loads": [0.2, 0.5, 0.8], "world_size": 8}
    s = summarize({"config": config, "runs": runs})
    assert s["goodput"]["p"] == {"load": 0.5, "goodput_rps": 5.0}


def test_degree_check_holds_out_the_largest_degree():
    check = degree_check(PROFILE)
    (row,) = check["sizes"]
    assert row["held_out_degree"] == 4 and row["measured_s"]["4"] == 0.07
    assert row["relative_error"] == pytest.approx(row["predicted_s"] / 0.07 - 1)
    assert "estimate_degree_8_s" in row and row["estimate_degree_8_s"] > 0


def test_fidelity_metrics_and_errors():
    rows = [
        {"arrival_s": 0.0, "sent_s": 0.0, "status": "completed", "latency_s": 1.0, "met_slo": True},
        {"arrival_s": 1.0, "sent_s": 1.0, "status": "completed", "latency_s": 3.0, "met_slo": False},
        {"arrival_s": 2.0, "sent_s": 2.0, "status": "error", "latency_s": None, "met_slo": False},
    ]
    m = measured_metrics(rows)
    assert m["mean_latency_s"] == 2.0 and m["p99_latency_s"] == 3.0 and m["slo"] == pytest.approx(1 / 3)
    assert m["throughput_rps"] == pytest.approx(2 / 4.0)  # two done by t=4
    e = errors(m, {**m, "mean_latency_s": 2.2, "slo": 0.5})
    assert e["mean_latency_error"] == pytest.approx(0.1) and e["slo_points_error"] == pytest.approx(
        100 * (0.5 - 1 / 3)
    )
    assert e["throughput_error"] == 0.0


def test_simulated_metrics_and_calibrated_overhead(tmp_path):
    from gfdit.bench.workload import Phase, RequestClass, WorkloadSpec, generate

    classes = (RequestClass("S", 512, 512, None, 4, 1.0), RequestClass("L", 1024, 1024, None, 4, 1.0))
    records = generate(WorkloadSpec("flux-dev", 20.0, (Phase(0.0, 0.5),), classes, 3.0, 0))
    plain = simulated_metrics(
        records, "edf-best-fit", 4, chunk_steps=2, cost_profile=None, execution=ExecutionModel()
    )
    slow = simulated_metrics(records, "edf-best-fit", 4, chunk_steps=2, cost_profile=None,
                             execution=ExecutionModel(host_overhead_s=0.05))  # fmt: skip
    assert plain["completed"] == len(records) and slow["mean_latency_s"] > plain["mean_latency_s"]
    # A server whose lone requests take 8 tasks x 0.05 s longer than simulated has 0.05 s per task.
    from gfdit.policy import make_policy
    from gfdit.request import Request
    from gfdit.scheduler import Scheduler
    from gfdit.sim import simulate

    measured = {}
    for c in classes:
        r = Request("x", "flux-dev", width=c.width, height=c.height, num_inference_steps=4)
        res = simulate(Scheduler(4, make_policy("edf-best-fit"), chunk_steps=2), [r])
        measured[c.name] = res.outcomes["x"].latency_s + 0.05 * len(res.trace)
    got = calibrated_overhead("edf-best-fit", 4, "flux-dev", classes, measured, chunk_steps=2, cost_profile=None,
                              execution=ExecutionModel())  # fmt: skip
    assert got == pytest.approx(0.05)


def test_host_cpu_is_the_measured_cpu_less_the_simulated_compute():
    from gfdit.bench.workload import RequestClass
    from gfdit.eval.fidelity import host_cpu_by_size, lone_compute_cpu_s
    from gfdit.policy import make_policy
    from gfdit.request import Request
    from gfdit.scheduler import Scheduler
    from gfdit.sim import simulate

    classes = (RequestClass("S", 512, 512, None, 4, 1.0), RequestClass("L", 1024, 1024, None, 4, 1.0))
    ex = ExecutionModel(cores=2)
    # static:sp=1: every task on one rank, so the compute CPU is the lone request's latency
    for c in classes:
        r = Request("x", "flux-dev", width=c.width, height=c.height, num_inference_steps=4)
        lat = simulate(Scheduler(4, make_policy("static:sp=1"), chunk_steps=2), [r]).outcomes["x"].latency_s
        got = lone_compute_cpu_s(
            "static:sp=1", 4, "flux-dev", c, chunk_steps=2, cost_profile=None, execution=ex
        )
        assert got == pytest.approx(lat)
    # static:sp=4 on 2 cores: its tasks keep both cores busy
    r = Request("x", "flux-dev", width=1024, height=1024, num_inference_steps=4)
    lat4 = simulate(Scheduler(4, make_policy("static:sp=4"), chunk_steps=2), [r]).outcomes["x"].latency_s
    got4 = lone_compute_cpu_s("static:sp=4", 4, "flux-dev", classes[1], chunk_steps=2, cost_profile=None,
                              execution=ex)  # fmt: skip
    assert got4 == pytest.approx(2 * lat4)
    compute = {
        c.name: lone_compute_cpu_s(
            "static:sp=1", 4, "flux-dev", c, chunk_steps=2, cost_profile=None, execution=ex
        )
        for c in classes
    }
    table = host_cpu_by_size("static:sp=1", 4, "flux-dev", classes, {"S": compute["S"] + 0.03, "L": 0.0},
                             chunk_steps=2, cost_profile=None, execution=ex)  # fmt: skip
    assert table[0][:2] == (512, 512) and table[0][2] == pytest.approx(0.03)
    assert table[1] == (1024, 1024, 0.0)  # less than the compute: none


def test_calibrated_scale_is_the_lone_requests_speed_against_the_simulation():
    from gfdit.bench.workload import RequestClass
    from gfdit.eval.fidelity import calibrated_scale, calibration_request
    from gfdit.policy import make_policy
    from gfdit.scheduler import Scheduler
    from gfdit.sim import simulate

    classes = (RequestClass("S", 512, 512, None, 4, 1.0), RequestClass("L", 1024, 1024, None, 4, 1.0))
    lone = {}
    for c in classes:
        res = simulate(
            Scheduler(4, make_policy("static:sp=1"), chunk_steps=2), [calibration_request("flux-dev", c)]
        )
        lone[c.name] = res.outcomes["calibration"].latency_s
    kw = dict(chunk_steps=2, cost_profile=None, execution=ExecutionModel())
    faster = {k: 0.8 * v for k, v in lone.items()}
    assert calibrated_scale("static:sp=1", 4, "flux-dev", classes, faster, **kw) == pytest.approx(0.8)
    slower = {k: 1.3 * v for k, v in lone.items()}
    assert calibrated_scale("static:sp=1", 4, "flux-dev", classes, slower, **kw) == 1.0  # the overhead's job


def test_process_tree_cpu_counts_children(tmp_path):
    import os
    import subprocess
    import sys

    from gfdit.eval.fidelity import FidelityError, process_tree_cpu_s

    # a child that burns about 0.3 s of CPU, then waits for its stdin to close
    code = "import sys, time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\nprint(1, flush=True)\nsys.stdin.read()"
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == b"1"
        own = process_tree_cpu_s(child.pid)
        mine = process_tree_cpu_s(os.getpid())
        assert own >= 0.25
        assert mine >= own  # the child is a descendant of this process
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    with pytest.raises(FidelityError, match="not running"):
        process_tree_cpu_s(child.pid)


def test_named_threads_cpu_is_theirs_alone():
    import os
    import sys
    import threading
    import time

    if not sys.platform.startswith("linux"):
        pytest.skip("OS thread names and /proc are Linux only")
    from gfdit.eval.fidelity import process_tree_cpu_s
    from gfdit.runtime.engine import name_os_thread

    seen, burnt, done = {}, threading.Event(), threading.Event()

    def burn():
        name_os_thread("gfdit-burner")
        with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
            seen["name"] = f.read().strip()
        t = time.thread_time()
        while time.thread_time() - t < 0.3:
            pass
        burnt.set()
        done.wait(timeout=60)

    assert process_tree_cpu_s(os.getpid(), threads_named="gfdit-burner") == 0.0  # no such thread yet
    th = threading.Thread(target=burn)
    th.start()
    try:
        assert burnt.wait(timeout=60)
        assert seen["name"] == "gfdit-burner"
        named = process_tree_cpu_s(os.getpid(), threads_named="gfdit-burner")
        assert 0.25 <= named <= process_tree_cpu_s(os.getpid())
        assert process_tree_cpu_s(os.getpid(), threads_named="no-such-thread") == 0.0
    finally:
        done.set()
        th.join(timeout=30)


def test_host_cpu_table_prefers_the_cpu_measured_without_the_workers():
    from gfdit.bench.workload import RequestClass
    from gfdit.eval.fidelity import host_cpu_by_size, host_cpu_table

    classes = (RequestClass("S", 512, 512, None, 4, 1.0), RequestClass("L", 1024, 1024, None, 4, 1.0))
    kw = dict(chunk_steps=2, cost_profile=None, execution=ExecutionModel(cores=2))
    total = {"S": 5.0, "L": 9.0}
    direct = host_cpu_table({"per_request_s": total, "host_per_request_s": {"S": 0.01, "L": 0.02}},
                            "static:sp=1", 4, "flux-dev", classes, **kw)  # fmt: skip
    assert direct == ((512, 512, 0.01), (1024, 1024, 0.02))
    fallback = host_cpu_table({"per_request_s": total, "host_per_request_s": None},
                              "static:sp=1", 4, "flux-dev", classes, **kw)  # fmt: skip
    assert fallback == host_cpu_by_size("static:sp=1", 4, "flux-dev", classes, total, **kw)


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            [
                "eval",
                "sweep",
                "--model",
                "flux-dev",
                "--world-size",
                "8",
                "--mix",
                "paper-video",
                "--loads",
                "0.5",
                "--policies",
                "static:sp=8",
                "--out",
                "x",
            ],
            "video mix",
        ),  # fmt: skip
        (
            [
                "eval",
                "sweep",
                "--model",
                "flux-dev",
                "--world-size",
                "8",
                "--mix",
                "paper-image",
                "--loads",
                "0.5",
                "--policies",
                "nope",
                "--out",
                "x",
            ],
            "unknown policy",
        ),  # fmt: skip
        (["eval", "fidelity", "--trace", "t.jsonl", "--out", "x"], "give --policies"),
    ],
)
def test_eval_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_eval_sweep_command(tmp_path, capsys):
    out = tmp_path / "s"
    argv = ["eval", "sweep", "--model", "flux-dev", "--world-size", "4", "--mix", "paper-image", "--loads", "0.3",
            "--policies", "static:sp=4;edf-best-fit", "--num-requests", "8", "--no-plots", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["execution"]["busy_senders"] is True and len(data["runs"]) == 2
    assert not math.isnan(data["summary"]["table"]["edf-best-fit"]["0.3"]["mean_latency_s"])
    assert "# gfdit eval sweep" in capsys.readouterr().out
