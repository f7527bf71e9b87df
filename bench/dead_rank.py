"""A dead GPU under load: `kill -9` one non-zero rank of a serving `gfdit serve` while a trace is
replayed against it, and measure what the survivors make of it.

    python bench/dead_rank.py --trace TRACE --victim 2 --kill-after 10 --out DIR \
        --serve-args "--nproc 4 --model flux-dev --policy edf-best-fit" [--transport nccl|ipc]

The server starts (`--transport` sets GFCOLL_TRANSPORT for it), warms up on one lone request per
class of the trace, then the trace is replayed (gfdit.bench.client.run_trace, in a thread). Once
`--kill-after` seconds of the replay have passed and the victim holds some request's latent (/health
counts them per rank), the victim's process gets SIGKILL. The replay goes on to its end; then the
server is stopped with SIGTERM, whose exit status 0 says it drained every accepted request.

DIR/dead_rank.json and DIR/dead_rank.md report, with the replay's own files (results.jsonl,
run.json), the server's log and /metrics after the replay:
- requests accepted, completed, failed; those in flight at the kill (sent before, done after) and
  how many of them completed;
- from the kill: to /health saying "degraded" (polled every 50 ms), to the first request completed
  after it, and to the last of the requests in flight at the kill;
- mean latency of the requests sent before the kill and of those sent after it;
- gfdit_ranks_alive and gfdit_requests_rerun_total after the replay.
Times of the replay's requests are the client's: completion = replay start + send + latency (the
replay's start is read just before its first /health call: a few milliseconds early at most).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import sys
import threading
import time

import httpx

from gfdit.bench.client import calibrate, run_trace
from gfdit.bench.workload import read_trace, trace_classes
from gfdit.eval.fidelity import ServerProcess

kPollS = 0.05


def _metric(url: str, name: str) -> float | None:
    try:
        text = httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def summarize(rows: list[dict], started_at: float, kill_at: float, degraded_at: float | None) -> dict:
    """The report's figures from the replay's outcomes (results.jsonl rows), the replay's start, the
    kill and the first degraded /health, all on the wall clock (time.time())."""
    done = [r for r in rows if r["status"] == "completed"]
    end = {r["request_id"]: started_at + r["sent_s"] + r["latency_s"] for r in done}
    sent = {r["request_id"]: started_at + r["sent_s"] for r in rows}
    in_flight = [
        r for r in rows if sent[r["request_id"]] < kill_at and end.get(r["request_id"], kill_at + 1) > kill_at
    ]
    after = sorted(t - kill_at for t in end.values() if t > kill_at)
    in_flight_done = [end[r["request_id"]] - kill_at for r in in_flight if r["request_id"] in end]

    def mean(xs):
        return statistics.fmean(xs) if xs else None

    return {
        "requests": len(rows),
        "accepted": sum(1 for r in rows if r["status"] != "rejected"),
        "completed": len(done),
        "failed": [{"id": r["request_id"], "status": r["status"], "error": r["error"]} for r in rows if r["status"] != "completed"],
        "in_flight_at_kill": len(in_flight),
        "in_flight_completed": len(in_flight_done),
        "kill_to_degraded_s": None if degraded_at is None else degraded_at - kill_at,
        "kill_to_first_completion_s": after[0] if after else None,
        "kill_to_last_in_flight_s": max(in_flight_done) if in_flight_done else None,
        "mean_latency_sent_before_s": mean([r["latency_s"] for r in done if sent[r["request_id"]] < kill_at]),
        "mean_latency_sent_after_s": mean([r["latency_s"] for r in done if sent[r["request_id"]] >= kill_at]),
    }  # fmt: skip


def render(report: dict) -> str:
    s = report["summary"]

    def sec(v):
        return "n/a" if v is None else f"{v:.3f} s"

    lines = [
        f"# Dead rank under load: rank {report['victim']} killed (SIGKILL), GFCOLL_TRANSPORT={report['transport']}",
        "",
        f"- server: `{report['server_command']}`",
        f"- trace: `{report['trace']}` ({s['requests']} requests); killed {report['kill_after_replay_s']:.3f} s into the "
        f"replay, while it held {report['victim_requests_at_kill']} request(s)",
        f"- date {report['date']}, commit {report['commit']}, machine {report['machine']}",
        "",
        "| figure | value |",
        "| --- | ---: |",
        f"| requests accepted / completed | {s['accepted']} / {s['completed']} |",
        f"| in flight at the kill / of them completed | {s['in_flight_at_kill']} / {s['in_flight_completed']} |",
        f"| kill to /health degraded | {sec(s['kill_to_degraded_s'])} |",
        f"| kill to the first request completed | {sec(s['kill_to_first_completion_s'])} |",
        f"| kill to the last request in flight at it completed | {sec(s['kill_to_last_in_flight_s'])} |",
        f"| mean latency, sent before / after the kill | {sec(s['mean_latency_sent_before_s'])} / "
        f"{sec(s['mean_latency_sent_after_s'])} |",
        f"| gfdit_ranks_alive / gfdit_requests_rerun_total after | {report['ranks_alive']} / {report['requests_rerun']} |",
        f"| server exit status after SIGTERM (0: drained) | {report['exit_status']} |",
    ]  # fmt: skip
    if s["failed"]:
        lines += ["", "Not completed:", ""] + [
            f"- {f['id']}: {f['status']} ({f['error']})" for f in s["failed"][:20]
        ]
    return "\n".join(lines) + "\n"


def _commit() -> str | None:
    import subprocess  # noqa: PLC0415

    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace", required=True, help="trace file from `gfdit bench gen`")
    p.add_argument("--serve-args", required=True, help="`gfdit serve` options, --policy included")
    p.add_argument("--victim", type=int, default=2, help="the rank to kill (not 0: rank 0 serves HTTP)")
    p.add_argument("--kill-after", type=float, default=10.0, help="seconds into the replay (default 10)")
    p.add_argument("--transport", choices=("auto", "ipc", "nccl"), default=None, help="GFCOLL_TRANSPORT")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--health-timeout", type=float, default=600.0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.victim <= 0:
        p.error("--victim must be a non-zero rank (rank 0 is the front end)")
    serve_args = shlex.split(args.serve_args)
    if "--policy" not in serve_args:
        p.error("--serve-args must name the --policy")
    i = serve_args.index("--policy")
    policy, serve_args = serve_args[i + 1], serve_args[:i] + serve_args[i + 2 :]
    os.makedirs(args.out, exist_ok=True)
    if args.transport:
        os.environ["GFCOLL_TRANSPORT"] = args.transport
    meta, records = read_trace(args.trace)
    server = ServerProcess(serve_args, policy, os.path.join(args.out, "server.log"))
    exit_status = None
    try:
        health = server.wait_healthy(args.health_timeout)
        pids = {r["rank"]: r["pid"] for r in health["ranks"]}
        if args.victim not in pids:
            raise SystemExit(f"rank {args.victim} is not among the server's ranks {sorted(pids)}")
        # One lone request per class first (compilation, graph capture): the kill lands on a warm server.
        model = meta.get("spec", {}).get("model") or records[0].model
        calibrate(server.url, model, trace_classes(meta), repeats=1, timeout_s=args.timeout)

        box: dict = {}

        def replay():
            try:
                box["run"] = run_trace(
                    server.url, args.trace, args.out, timeout_s=args.timeout, command=shlex.join(sys.argv)
                )
            except Exception as e:  # reported below; the kill must not wait for it
                box["error"] = repr(e)

        thread = threading.Thread(target=replay, name="replay")
        t_start = time.time()
        thread.start()
        while time.time() < t_start + args.kill_after and thread.is_alive():
            thread.join(kPollS)
        held = 0
        while thread.is_alive():
            h = httpx.get(server.url + "/health", timeout=5).json()
            held = h["ranks"][args.victim]["requests"]
            if held >= 1:
                break
            thread.join(kPollS)
        if not thread.is_alive():
            raise SystemExit(
                "the replay ended before the victim held a request: raise the load or lower --kill-after"
            )
        kill_at = time.time()
        os.kill(pids[args.victim], signal.SIGKILL)
        degraded_at = None
        while degraded_at is None:  # until /health says degraded, or once more after the replay ended
            ended = not thread.is_alive()
            try:
                if httpx.get(server.url + "/health", timeout=5).json().get("status") == "degraded":
                    degraded_at = time.time()
            except httpx.HTTPError:
                pass
            if ended:
                break
            thread.join(kPollS)
        thread.join()
        if "error" in box:
            raise SystemExit(f"the replay failed: {box['error']}")
        with open(os.path.join(args.out, "metrics.txt"), "w") as f:
            f.write(httpx.get(server.url + "/metrics", timeout=10).text)
        alive = _metric(server.url, "gfdit_ranks_alive")
        rerun = _metric(server.url, "gfdit_requests_rerun_total")
    finally:
        exit_status = server.stop()
    with open(os.path.join(args.out, "results.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    started_at = box["run"]["started_at"]  # the replay's own start (run.json)
    report = {
        "victim": args.victim, "transport": args.transport or os.environ.get("GFCOLL_TRANSPORT", "auto"),
        "server_command": server.command, "trace": os.path.abspath(args.trace),
        "kill_after_replay_s": kill_at - started_at, "victim_requests_at_kill": held,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": _commit(),
        "machine": os.uname().nodename, "ranks_alive": alive, "requests_rerun": rerun, "exit_status": exit_status,
        "summary": summarize(rows, started_at, kill_at, degraded_at),
    }  # fmt: skip
    with open(os.path.join(args.out, "dead_rank.json"), "w") as f:
        json.dump(report, f, indent=1)
    text = render(report)
    with open(os.path.join(args.out, "dead_rank.md"), "w") as f:
        f.write(text)
    print(text)
    s = report["summary"]
    return 0 if exit_status == 0 and s["completed"] == s["accepted"] else 1


if __name__ == "__main__":
    sys.exit(main())
