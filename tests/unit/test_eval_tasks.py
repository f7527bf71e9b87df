"""gfdit.eval.tasks (the task-by-task comparison of `gfdit eval fidelity`) and the repeated replays'
metrics: a simulation's own trace as the measured side must agree with itself, alignment must refuse
a log that does not replay the trace, and each part of a request's latency is what its rows say."""

import pytest

from gfdit.bench.workload import Phase, RequestClass, WorkloadSpec, generate
from gfdit.eval import tasks
from gfdit.eval.fidelity import repeated_metrics, simulate_records
from gfdit.simexec import ExecutionModel


def _row(rid, kind, start, end, dispatch, done, *, arrival=0.0, ranks=(0,), batch=1, reshard=0.0, side=32):
    return {"request_id": rid, "arrival_s": arrival, "width": side, "height": side, "num_frames": None,
            "kind": kind, "start": start, "end": end, "ranks": list(ranks), "batch_size": batch,
            "dispatch_s": dispatch, "end_s": done, "reshard_s": reshard}  # fmt: skip


def test_request_breakdown_splits_the_latency_into_its_parts():
    rows = [
        _row("a", "ENCODE", 0, 0, 1.0, 1.5, arrival=0.5),
        _row("a", "DENOISE", 0, 4, 2.0, 4.0, arrival=0.5, ranks=(0, 1)),
        _row("a", "DECODE", 0, 0, 4.0, 4.25, arrival=0.5),
    ]
    b = tasks.request_breakdown(rows, {"a": 4.0})
    assert b["a"]["wait_s"] == 0.5  # arrival 0.5 -> first dispatch 1.0
    assert b["a"]["tasks_s"] == 0.5 + 2.0 + 0.25
    assert b["a"]["gaps_s"] == 0.5  # 1.5 -> 2.0; 4.0 -> 4.0 is none
    assert b["a"]["end_s"] == 3.75 and b["a"]["after_s"] == pytest.approx(0.25)
    # the parts add up to the last end
    assert b["a"]["wait_s"] + b["a"]["tasks_s"] + b["a"]["gaps_s"] == b["a"]["end_s"]


def _simulated():
    classes = (RequestClass("S", 512, 512, None, 6, 1.0), RequestClass("L", 1024, 1024, None, 6, 1.0))
    records = generate(WorkloadSpec("flux-dev", 30.0, (Phase(0.0, 0.6),), classes, 3.0, 1))
    requests, _, res = simulate_records(
        records, "fcfs-elastic", 4, chunk_steps=2, cost_profile=None, execution=ExecutionModel()
    )
    return records, requests, res


def test_a_simulation_compared_with_itself_agrees_everywhere():
    records, requests, res = _simulated()
    sim = tasks.sim_task_rows(res, requests)
    assert len(sim) == len(res.trace)
    batched = [r for r in sim if r["batch_size"] > 1]
    # batch members share group, dispatch and end, and each says how many they are
    for r in batched:
        same = [
            x
            for x in sim
            if (x["ranks"], x["dispatch_s"], x["end_s"]) == (r["ranks"], r["dispatch_s"], r["end_s"])
        ]
        assert len(same) == r["batch_size"]
    # "measured" = the simulation under other ids and a shifted clock (a server's engine clock)
    shift = 7.0
    ids = {r.request_id: f"srv-{i}" for i, r in enumerate(requests)}
    measured = [
        dict(r, request_id=ids[r["request_id"]], arrival_s=r["arrival_s"] + shift,
             dispatch_s=r["dispatch_s"] + shift, end_s=r["end_s"] + shift)
        for r in sim
    ]  # fmt: skip
    # a lone calibration request before the replay is not part of it
    measured.insert(0, _row("calib", "ENCODE", 0, 0, 0.1, 0.2, side=1024))
    mapping = tasks.align(measured, records)
    assert mapping == {ids[r.request_id]: r.request_id for r in requests}
    latency = {o.request_id: o.latency_s + 0.01 for o in res.outcomes.values()}
    report = tasks.compare(measured, sim, mapping, latency)
    m, s = report["by_request"]["measured"], report["by_request"]["simulated"]
    for part in ("wait_s", "tasks_s", "gaps_s", "end_s", "num_tasks"):
        assert m[part] == pytest.approx(s[part]), part
    assert m["after_s"] == pytest.approx(0.01) and m["requests"] == len(requests)
    for t in report["by_task"]:
        assert t["measured_count"] == t["simulated_count"] > 0
        assert t["measured_mean_s"] == pytest.approx(t["simulated_mean_s"])
    text = tasks.render_markdown(report, "fcfs-elastic")
    assert "| DENOISE |" in text and f"| measured | {len(requests)} |" in text


def test_align_refuses_a_log_that_does_not_replay_the_trace():
    records, requests, res = _simulated()
    sim = tasks.sim_task_rows(res, requests)
    first = requests[0].request_id
    wrong = [dict(r, width=r["width"] + 16) if r["request_id"] == first else r for r in sim]
    with pytest.raises(ValueError, match="does not match the trace"):
        tasks.align(wrong, records)
    with pytest.raises(ValueError, match="holds"):
        tasks.align([r for r in sim if r["request_id"] != first], records)


def test_align_takes_back_two_requests_that_arrived_swapped():
    records, requests, res = _simulated()
    sim = tasks.sim_task_rows(res, requests)
    order = sorted(requests, key=lambda r: r.arrival_s)
    # two neighbours of different shapes, their arrivals swapped by a few milliseconds
    i = next(k for k in range(len(order) - 1) if order[k].width != order[k + 1].width)
    a, b = order[i].request_id, order[i + 1].request_id
    t = order[i + 1].arrival_s
    swapped = [dict(r, arrival_s=t + 0.001) if r["request_id"] == a else dict(r, arrival_s=t) if r["request_id"] == b else r
               for r in sim]  # fmt: skip
    mapping = tasks.align(swapped, records)
    assert mapping[a] == a and mapping[b] == b and len(mapping) == len(requests)
    # the same swap a second apart is not a reordering: refused
    far = [dict(r, arrival_s=t + 1.0) if r["request_id"] == a else r for r in sim]
    with pytest.raises(ValueError, match="does not match"):
        tasks.align(far, records)


def test_read_task_log_drops_a_torn_last_line(tmp_path):
    p = tmp_path / "tasks.jsonl"
    p.write_text('{"request_id": "a"}\n{"request_id": "b"}\n{"request_i')
    assert [r["request_id"] for r in tasks.read_task_log(str(p))] == ["a", "b"]


def test_repeated_replays_report_their_mean_and_spread():
    def rows(lat, met):
        return [{"arrival_s": float(i), "sent_s": float(i), "status": "completed", "latency_s": x,
                 "met_slo": ok} for i, (x, ok) in enumerate(zip(lat, met, strict=True))]  # fmt: skip

    a = rows([1.0, 1.0], [True, True])
    b = rows([2.0, 2.0], [True, False])
    mean, spread = repeated_metrics([a, b])
    assert mean["mean_latency_s"] == 1.5 and mean["slo"] == 0.75 and mean["replays"] == 2
    assert spread["mean_latency_s"] == pytest.approx(1 / 3)  # each replay 1/3 from the mean
    assert spread["slo_points"] == pytest.approx(25.0)
    one, s1 = repeated_metrics([a])
    assert one["mean_latency_s"] == 1.0 and s1["mean_latency_s"] == 0.0 and s1["slo_points"] == 0.0


def test_repeats_must_be_positive(capsys):
    from gfdit.cli import main

    with pytest.raises(SystemExit) as e:
        main(["eval", "fidelity", "--trace", "t.jsonl", "--policies", "sjf", "--repeats", "0", "--out", "x"])
    assert e.value.code == 2 and "--repeats must be >= 1" in capsys.readouterr().err


def test_task_log_directory_must_exist(capsys, tmp_path):
    from gfdit.serve import build_parser, check_args

    parser = build_parser()
    args = parser.parse_args(
        ["--model", "tiny-flux", "--port", "0", "--task-log", str(tmp_path / "no" / "t.jsonl")]
    )
    with pytest.raises(SystemExit) as e:
        check_args(parser, args)
    assert e.value.code == 2 and "--task-log" in capsys.readouterr().err
    ok = parser.parse_args(["--model", "tiny-flux", "--port", "0", "--task-log", str(tmp_path / "t.jsonl")])
    check_args(parser, ok)  # no exit


def test_result_delivery_is_calibrated_from_the_lone_requests():
    from gfdit.eval.fidelity import calibrated_result_s

    # the median of (latency at the client - the server's own) over the lone requests
    assert calibrated_result_s([0.012, 0.008, 0.010, 0.30]) == pytest.approx(0.012)  # one outlier: no effect
    assert calibrated_result_s([0.011, 0.009, 0.010]) == pytest.approx(0.010)
    assert calibrated_result_s([-0.001]) == 0.0  # never below 0
    assert calibrated_result_s([]) == 0.0


def test_read_task_log_reads_gzip(tmp_path):
    import gzip

    p = tmp_path / "tasks.jsonl.gz"
    with gzip.open(p, "wt") as f:
        f.write('{"request_id": "a"}\n')
    assert tasks.read_task_log(str(p)) == [{"request_id": "a"}]


def test_lone_task_fit_recovers_scale_and_overhead_and_skips_the_warm_up():
    from gfdit.bench.workload import RequestClass as Cls
    from gfdit.eval.fidelity import calibration_request, lone_task_fit
    from gfdit.policy import make_policy
    from gfdit.scheduler import Scheduler
    from gfdit.sim import simulate

    classes = [Cls("S", 512, 512, None, 6, 1.0), Cls("L", 1024, 1024, None, 6, 1.0)]
    rows, per_request = [], []
    for c in classes:
        req = calibration_request("flux-dev", c)
        res = simulate(Scheduler(4, make_policy("static:sp=1"), chunk_steps=2), [req])
        per_request.append(len(res.trace))
        for k, slow in enumerate((50.0, 1.0, 1.0)):  # the first of each shape is the warm-up: 50x slower
            t = 100.0 * k + (0 if c.name == "S" else 1000.0)
            for e in res.trace:
                d = (1.2 * (e.end_s - e.start_s) + 0.003) * slow
                rows.append(_row(f"{c.name}{k}", e.task.kind.name, e.task.start, e.task.end, t, t + d,
                                 arrival=t, ranks=e.ranks, side=c.width))  # fmt: skip
                t += d
    rows.append(_row("replayed", "DECODE", 0, 0, 5000.0, 5009.0, arrival=5000.0, side=512))  # not lone
    fit = lone_task_fit(rows, {"replayed"}, "static:sp=1", 4, "flux-dev", classes, chunk_steps=2,
                        cost_profile=None, execution=ExecutionModel())  # fmt: skip
    assert fit is not None
    scale, overhead, n = fit
    assert scale == pytest.approx(1.2) and overhead == pytest.approx(0.003)
    assert n == 2 * sum(per_request)  # two timed requests per shape, every task of each
    assert lone_task_fit(rows[:2], set(), "static:sp=1", 4, "flux-dev", classes, chunk_steps=2,
                         cost_profile=None, execution=ExecutionModel()) is None  # fmt: skip
