"""gfcoll.bench.targets: the issue's collective targets checked on gfcoll-bench JSON."""

from __future__ import annotations

import json

import pytest

from gfcoll.bench import targets


def _row(op, group, nbytes, g_us, b_us, requested=None):
    def entry(t):
        return {"time_us": t, "busbw_gbs": nbytes / t / 1e3 if t else None, "error": None, "wrong": None}

    return {"op": op, "group": group, "bytes": nbytes, "requested_bytes": requested or nbytes,
            "gfcoll": entry(g_us), "baseline": entry(b_us), "ratio": b_us / g_us if g_us and b_us else None}  # fmt: skip


def _doc(rows, transport="ipc", graph=False, formation=()):
    return {
        "schema": "gfcoll-bench/1",
        "environment": {
            "world_size": 4,
            "gfcoll_transport_forced": transport,
            "cards": ["X"],
            "command": "c",
        },
        "options": {"graph": graph, "timing": "back-to-back", "transport": "nccl"},
        "rows": rows,
        "formation": list(formation),
    }


def _write(tmp_path, name, doc):
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return str(path)


def _by(results, target, op="all_reduce"):
    return [t for t in results if t["target"].startswith(target) and t["op"] == op]


def test_targets_met_and_missed(tmp_path):
    g = [0, 1, 2, 3]
    rows = [
        _row("all_reduce", g, 1 << 10, 10.0, 25.0),  # 0.4x: met
        _row("all_reduce", g, 256 << 10, 30.0, 50.0),  # 0.6x: misses the latency target
        _row("all_reduce", g, 16 << 20, 100.0, 96.0),  # busbw 0.96x: met
        _row("all_reduce", g, 256 << 20, 1000.0, 990.0),  # 0.99x: meets 0.95, misses 1.0 at 256 MiB
        _row("all_gather", g, 16 << 20, 110.0, 100.0),  # busbw 0.909x: missed
        _row("broadcast", g, 1 << 10, 100.0, 10.0),  # no latency target for broadcast
    ]
    first = {
        "method": "gfcoll.first_op",
        "group": g,
        "status": "ok",
        "samples_us": [12.0, 9.0],
        "median_us": 10.5,
    }
    steady = {
        "method": "gfcoll.steady_op",
        "group": g[::-1],
        "status": "ok",
        "samples_us": [10.0],
        "median_us": 10.0,
    }
    run = targets.load(_write(tmp_path, "ipc.json", _doc(rows, formation=[first, steady])))
    assert (run.world, run.transport, run.timing) == (4, "ipc", "back-to-back")
    results = targets.check(run)

    (lat,) = _by(results, "latency")
    assert lat["met"] is False and lat["misses"] == ["256 KiB"] and lat["worst"] == pytest.approx(0.6)
    (bw,) = _by(results, "busbw")
    assert bw["met"] is True and bw["worst"] == pytest.approx(0.96)
    (top,) = _by(results, "all_reduce 256")
    assert top["met"] is False and top["worst"] == pytest.approx(0.99)
    (ag,) = _by(results, "busbw", "all_gather")
    assert ag["met"] is False and ag["worst"] == pytest.approx(100 / 110)
    assert not _by(results, "latency", "broadcast")
    first_use, median = _by(results, "first op")
    assert first_use["met"] is False and first_use["worst"] == pytest.approx(1.2)  # 12 / 10
    assert median["met"] is True and median["worst"] == pytest.approx(1.05)


def test_report_puts_runs_side_by_side(tmp_path):
    g = [0, 1]
    ipc = _write(tmp_path, "ipc.json", _doc([_row("all_reduce", g, 1 << 10, 10.0, 40.0)], "ipc"))
    nccl = _write(tmp_path, "nccl.json", _doc([_row("all_reduce", g, 1 << 10, 30.0, 41.0)], "nccl"))
    out = tmp_path / "t.md"
    assert targets.main([ipc, nccl, "--out", str(out), "--json", str(tmp_path / "t.json")]) == 0
    md = out.read_text()
    assert "| [0, 1] | 1 KiB | 10.00 | 40.00 | 0.250 | 30.00 | 41.00 | 0.732 |" in md, md
    checks = json.loads((tmp_path / "t.json").read_text())
    assert [c["met"] for c in checks] == [True, False]  # ipc 0.25x, nccl 0.73x
    assert "1 of 2 checks met" in md


def test_a_file_that_is_not_a_result_is_refused(tmp_path, capsys):
    bad = _write(tmp_path, "x.json", {"schema": "other"})
    assert targets.main([bad, "--out", str(tmp_path / "t.md")]) == 2
    assert "not a gfcoll-bench result" in capsys.readouterr().err
    assert not (tmp_path / "t.md").exists()
