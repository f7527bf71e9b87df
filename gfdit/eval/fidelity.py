"""`gfdit eval fidelity`: the simulator's error, measured. For each policy: start a server
(`gfdit serve <serve-args> --policy SPEC` on a free port), wait for /health, measure each class's
standalone latency on the idle server (`gfdit.bench.client.calibrate`, which also warms it up),
replay the trace (`gfdit bench run`'s machinery), save /metrics, stop the server with SIGTERM; then
simulate the same trace with the same policy and chunk_steps, and write measured beside simulated.

Errors (simulated vs measured): relative error (sim / measured - 1) of the mean latency, the P99
latency and the throughput; the SLO attainment difference in percentage points. Both sides use the
simulator's definitions: latency = arrival to result of completed requests, throughput = completed
requests / (last completion - first arrival), P99 nearest-rank, SLO = requests that completed by
their deadline / all requests.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace

from gfdit.bench.workload import read_trace
from gfdit.policy import make_policy
from gfdit.request import RequestState
from gfdit.scheduler import Scheduler
from gfdit.sim import simulate
from gfdit.simexec import ExecutionModel

__all__ = [
    "FidelityError",
    "measured_metrics",
    "repeated_metrics",
    "simulated_metrics",
    "simulate_records",
    "errors",
    "run_fidelity",
    "render_markdown",
    "process_tree_cpu_s",
    "measured_host_cpu",
    "lone_compute_cpu_s",
    "host_cpu_by_size",
    "calibration_request",
    "calibrated_scale",
    "calibrated_result_s",
    "lone_task_fit",
    "host_cpu_table",
    "threads_cpu_s",
]

log = logging.getLogger("gfdit.eval")

kStopTimeoutS = 120.0  # SIGTERM to exit: the drain plus the ranks' shutdown


class FidelityError(RuntimeError):
    """A server did not start, answer or stop as expected."""


def _p99(values: list[float]) -> float:
    if not values:
        return math.nan
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(0.99 * len(v)) - 1))]


def measured_metrics(rows: list[dict], time_scale: float = 1.0) -> dict:
    """The metrics of one replay from its results.jsonl rows (client-side latencies)."""
    done = [r for r in rows if r["status"] == "completed" and r["latency_s"] is not None]
    lat = [r["latency_s"] for r in done]
    first = min(r["arrival_s"] * time_scale for r in rows)
    last = max((r["sent_s"] + r["latency_s"] for r in done), default=first)
    return {
        "num_requests": len(rows),
        "completed": len(done),
        "mean_latency_s": sum(lat) / len(lat) if lat else math.nan,
        "p99_latency_s": _p99(lat),
        "throughput_rps": len(done) / (last - first) if last > first else math.nan,
        "slo": sum(bool(r["met_slo"]) and r["status"] == "completed" for r in rows) / len(rows),
    }


def simulate_records(
    records, policy: str, world_size: int, *, chunk_steps: int, cost_profile: dict | None,
    execution: ExecutionModel, time_scale: float = 1.0,
):  # fmt: skip
    """Simulates `records` (arrivals scaled, deadlines = arrival + SLO): (requests, scheduler, SimResult)."""
    from gfdit.eval.sweep import SweepConfig

    cfg = SweepConfig("x", world_size, "paper-image", (1.0,), (policy,), cost_profile=cost_profile)
    requests = []
    for r in records:
        req = r.to_request()
        arrival = r.arrival_s * time_scale
        requests.append(replace(req, arrival_s=arrival, deadline_s=arrival + r.slo_s))
    sched = Scheduler(world_size, make_policy(policy), cfg.cost_model(), chunk_steps=chunk_steps)
    return requests, sched, simulate(sched, requests, true_cost=cfg.cost_model(), execution=execution)


def simulated_metrics(
    records, policy: str, world_size: int, *, chunk_steps: int, cost_profile: dict | None,
    execution: ExecutionModel, time_scale: float = 1.0, keep: dict | None = None,
) -> dict:  # fmt: skip
    """The same metrics from simulating `records` (simulate_records); `keep` receives the requests
    and the SimResult."""
    requests, sched, res = simulate_records(
        records, policy, world_size, chunk_steps=chunk_steps, cost_profile=cost_profile,
        execution=execution, time_scale=time_scale,
    )  # fmt: skip
    if keep is not None:
        keep.update(requests=requests, result=res)
    done = [o for o in res.outcomes.values() if o.state is RequestState.DONE]
    return {
        "num_requests": len(requests),
        "completed": len(done),
        "mean_latency_s": res.mean_latency_s,
        "p99_latency_s": res.latency_percentile(99),
        "throughput_rps": res.throughput_rps,
        "slo": sum(bool(o.met_deadline) for o in res.outcomes.values()) / len(requests),
        "preemptions": sched.num_preemptions,
    }


def errors(measured: dict, simulated: dict) -> dict:
    """`*_error` keys: relative errors (sim / measured - 1) and the SLO difference in points."""

    def rel(key: str) -> float:
        m, s = measured[key], simulated[key]
        return s / m - 1.0 if m and not math.isnan(m) and not math.isnan(s) else math.nan

    return {
        "mean_latency_error": rel("mean_latency_s"),
        "p99_latency_error": rel("p99_latency_s"),
        "throughput_error": rel("throughput_rps"),
        "slo_points_error": 100.0 * (simulated["slo"] - measured["slo"]),
    }


kCalibrationSloS = 3600.0  # the SLO gfdit.bench.client.calibrate gives its lone requests


def calibration_request(model: str, c):
    """The simulated twin of a lone calibration request of class `c` (gfdit.bench.client.calibrate):
    its class label (per-class policies such as rssp choose its degree by it) and its far deadline."""
    from gfdit.request import Request

    return Request("calibration", model, width=c.width, height=c.height, num_frames=c.num_frames,
                   num_inference_steps=c.num_inference_steps, slo_class=c.name,
                   deadline_s=kCalibrationSloS)  # fmt: skip


def lone_task_fit(
    rows: list[dict], replayed: set[str], policy: str, world_size: int, model: str, classes, *,
    chunk_steps: int, cost_profile: dict | None, execution: ExecutionModel,
) -> tuple[float, float, int] | None:  # fmt: skip
    """(compute scale, per-task overhead seconds, tasks used) from the idle server's lone requests in
    its task log (`rows`; the requests not in `replayed`): each of their tasks' measured duration
    (dispatch to done) against the same task of the simulated lone request of its class (cost model
    only: no overhead, scale 1), fitted as measured = scale x simulated + overhead (Theil-Sen: robust
    to a slow task; short ENCODE/DECODE tasks pin the overhead, long DENOISE chunks the scale). Each
    shape's first lone request is left out (the calibration's warm-up).
    Where the task log is at hand this replaces calibrated_scale and calibrated_overhead, which can
    only share one lone latency between the two. None with fewer than 3 matched tasks or a
    degenerate fit (scale <= 0)."""
    from gfdit.eval.sweep import SweepConfig

    cfg = SweepConfig("x", world_size, "paper-image", (1.0,), (policy,), cost_profile=cost_profile)
    bare = replace(execution, host_overhead_s=0.0, compute_scale=1.0, result_s=0.0, host_cpu_s=0.0,
                   host_cpu_by_size=())  # fmt: skip
    simulated: dict[tuple[int, int], dict[tuple, float]] = {}
    for c in classes:
        sched = Scheduler(world_size, make_policy(policy), cfg.cost_model(), chunk_steps=chunk_steps)
        res = simulate(sched, [calibration_request(model, c)], true_cost=cfg.cost_model(), execution=bare)
        simulated[(c.width, c.height)] = {
            (e.task.kind.name, e.task.start, e.task.end, len(e.ranks)): e.end_s - e.start_s for e in res.trace
        }
    first_of_shape: dict[tuple[int, int], str] = {}  # each shape's first lone request: a warm-up
    for row in sorted(rows, key=lambda r: r["arrival_s"]):
        if row["request_id"] not in replayed:
            first_of_shape.setdefault((row["width"], row["height"]), row["request_id"])
    warmups = set(first_of_shape.values())
    pairs = []
    for row in rows:
        if row["request_id"] in replayed or row["request_id"] in warmups:
            continue
        sim = simulated.get((row["width"], row["height"]), {})
        key = (row["kind"], row["start"], row["end"], len(row["ranks"]))
        if key in sim:
            pairs.append((sim[key], row["end_s"] - row["dispatch_s"]))
    # Theil-Sen: the median of the pairwise slopes, then the median intercept (a slow outlier task
    # moves neither)
    slopes = sorted(
        (y1 - y0) / (x1 - x0) for i, (x0, y0) in enumerate(pairs) for x1, y1 in pairs[i + 1 :] if x1 != x0
    )
    if len(pairs) < 3 or not slopes:
        return None
    scale = slopes[len(slopes) // 2]
    if not scale > 0:
        return None
    rest = sorted(y - scale * x for x, y in pairs)
    return scale, max(0.0, rest[len(rest) // 2]), len(pairs)


def calibrated_overhead(
    policy: str, world_size: int, model: str, classes, measured_s: dict, *, chunk_steps: int,
    cost_profile: dict | None, execution: ExecutionModel,
) -> float:  # fmt: skip
    """Per-task host overhead implied by the idle-server calibration: for each class, (measured lone
    latency - simulated lone latency without overhead) / tasks simulated; the median, at least 0.
    An independent measurement (an idle server, one request at a time), not a fit to the trace."""
    from gfdit.eval.sweep import SweepConfig

    cfg = SweepConfig("x", world_size, "paper-image", (1.0,), (policy,), cost_profile=cost_profile)
    values = []
    for c in classes:
        req = calibration_request(model, c)
        sched = Scheduler(world_size, make_policy(policy), cfg.cost_model(), chunk_steps=chunk_steps)
        res = simulate(
            sched, [req], true_cost=cfg.cost_model(), execution=replace(execution, host_overhead_s=0.0)
        )
        values.append((measured_s[c.name] - res.outcomes["calibration"].latency_s) / len(res.trace))
    values.sort()
    return max(0.0, values[len(values) // 2]) if values else 0.0


def process_tree_cpu_s(pid: int, *, threads_named: str | None = None) -> float:
    """CPU-seconds (user + system) used so far by process `pid` and its live descendants (Linux /proc;
    a descendant that already exited is not counted); with `threads_named`, only by their threads
    of that OS name (gfdit.runtime.engine.name_os_thread)."""
    tick = os.sysconf("SC_CLK_TCK")
    parent, cpu = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
        except OSError:
            continue  # exited meanwhile
        parent[int(entry)] = int(fields[1])
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    if pid not in cpu:
        raise FidelityError(f"process {pid} is not running")
    total, todo = 0.0, [pid]
    children: dict[int, list[int]] = {}
    for child, par in parent.items():
        children.setdefault(par, []).append(child)
    while todo:
        p = todo.pop()
        total += cpu[p] if threads_named is None else _named_threads_cpu_s(p, threads_named)
        todo += children.get(p, [])
    return total


def threads_cpu_s(pid: int) -> dict[int, tuple[str, float]]:
    """Thread id -> (its OS name, CPU-seconds it used so far) for every thread of process `pid`
    (Linux /proc; {} once the process is gone)."""
    tick = os.sysconf("SC_CLK_TCK")
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    out = {}
    for t in tids:
        try:
            with open(f"/proc/{pid}/task/{t}/stat") as f:
                raw = f.read()
        except OSError:
            continue  # exited meanwhile
        fields = raw.rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
        out[int(t)] = (raw[raw.index("(") + 1 : raw.rindex(")")], (int(fields[11]) + int(fields[12])) / tick)
    return out


def _named_threads_cpu_s(pid: int, name: str) -> float:
    return sum(cpu for n, cpu in threads_cpu_s(pid).values() if n == name)


kHostCpuRepeats = 6  # lone requests per class and round (CPU time counts in 10 ms ticks)
kHostCpuRounds = 3  # rounds per class: the median round is kept (one disturbed round changes nothing)
kIdleWindowS = 1.0  # the idle server's own CPU use is measured over this long first


def measured_host_cpu(url: str, server_pid: int, model: str, classes, *, timeout_s: float) -> dict:
    """CPU use of the idle server's processes and of this process (the replaying client) around lone
    requests: {"idle_cores": CPU-seconds per second of the idle server, "per_request_s": {class:
    CPU-seconds per lone request, the idle rate's share of its wall time taken off}, "rounds_s":
    {class: each round's value}, "host_per_request_s": {class: the same without the ranks' worker
    threads} or None where no thread carries the worker's name}. Per class, kHostCpuRounds rounds
    of kHostCpuRepeats requests; the median round counts (one round disturbed by anything else on
    the machine swung the figure 14-fold in a run of 2026-12-06). What is not the tasks' own compute
    is the host work of Note [Simulated execution] in gfdit.simexec: measured directly as the CPU of
    every thread but the workers (gfdit.runtime.engine.kWorkerThreadName) where those are named,
    else per_request_s less the simulated compute (gfdit.eval.fidelity.host_cpu_by_size). Call it on
    a warm server."""
    from gfdit.bench.client import calibrate
    from gfdit.runtime.engine import kWorkerThreadName

    def now_cpu() -> tuple[float, float]:
        total = process_tree_cpu_s(server_pid) + time.process_time()
        return total, total - process_tree_cpu_s(server_pid, threads_named=kWorkerThreadName)

    (c0, h0), t0 = now_cpu(), time.monotonic()
    time.sleep(kIdleWindowS)  # the measurement itself: an idle interval
    (c1, h1), wall = now_cpu(), time.monotonic() - t0
    idle, idle_host = (c1 - c0) / wall, (h1 - h0) / wall
    per_request, rounds, host, named = {}, {}, {}, False
    for c in classes:
        values, host_values = [], []
        for _ in range(kHostCpuRounds):
            (c0, h0), t0 = now_cpu(), time.monotonic()
            calibrate(
                url, model, [c], repeats=kHostCpuRepeats - 1, timeout_s=timeout_s
            )  # sends kHostCpuRepeats
            (c1, h1), wall = now_cpu(), time.monotonic() - t0
            values.append((c1 - c0 - idle * wall) / kHostCpuRepeats)
            host_values.append((h1 - h0 - idle_host * wall) / kHostCpuRepeats)
            named = named or (c1 - c0) - (h1 - h0) > 0  # the workers' threads computed, by name
        rounds[c.name] = values
        per_request[c.name] = sorted(values)[len(values) // 2]
        host[c.name] = max(0.0, sorted(host_values)[len(host_values) // 2])
    return {"idle_cores": idle, "per_request_s": per_request, "rounds_s": rounds,
            "host_per_request_s": host if named else None}  # fmt: skip


def lone_compute_cpu_s(
    policy: str, world_size: int, model: str, c, *, chunk_steps: int, cost_profile: dict | None,
    execution: ExecutionModel,
) -> float:  # fmt: skip
    """CPU-seconds the tasks of one lone request of class `c` compute, as the simulator runs them: each
    task's time (no host overhead) times the cores its ranks keep busy, min(ranks, cores); a DECODE
    that runs on ranks[0] alone keeps one. An upper bound for groups wider than one rank: their ranks
    wait for each other in collectives on a futex, not spinning."""
    from gfdit.eval.sweep import SweepConfig
    from gfdit.tasks import TaskKind

    cfg = SweepConfig("x", world_size, "paper-image", (1.0,), (policy,), cost_profile=cost_profile)
    req = calibration_request(model, c)
    sched = Scheduler(world_size, make_policy(policy), cfg.cost_model(), chunk_steps=chunk_steps)
    ex = replace(execution, host_overhead_s=0.0, host_cpu_s=0.0, host_cpu_by_size=())
    res = simulate(sched, [req], true_cost=cfg.cost_model(), execution=ex)
    cores = execution.cores or world_size
    total = 0.0
    for e in res.trace:
        width = 1 if (e.task.kind is TaskKind.DECODE and execution.decode_on_first_rank) else len(e.ranks)
        total += (e.end_s - e.start_s) * min(width, cores)
    return total


def host_cpu_by_size(
    policy: str, world_size: int, model: str, classes, per_request_s: dict, *, chunk_steps: int,
    cost_profile: dict | None, execution: ExecutionModel,
) -> tuple[tuple[int, int, float], ...]:  # fmt: skip
    """ExecutionModel.host_cpu_by_size from measured_host_cpu's per-request CPU: per class, the
    measured CPU-seconds less the simulated compute of a lone request (lone_compute_cpu_s), at least 0."""
    out = []
    for c in classes:
        compute = lone_compute_cpu_s(policy, world_size, model, c, chunk_steps=chunk_steps,
                                     cost_profile=cost_profile, execution=execution)  # fmt: skip
        out.append((c.width, c.height, max(0.0, per_request_s[c.name] - compute)))
    return tuple(out)


def host_cpu_table(
    host_cpu: dict, policy: str, world_size: int, model: str, classes, *, chunk_steps: int,
    cost_profile: dict | None, execution: ExecutionModel,
) -> tuple[tuple[int, int, float], ...]:  # fmt: skip
    """ExecutionModel.host_cpu_by_size from measured_host_cpu: the CPU of every thread but the
    workers' where it was measured by name, else the total less the simulated compute
    (host_cpu_by_size)."""
    direct = host_cpu.get("host_per_request_s")
    if direct:
        return tuple((c.width, c.height, float(direct[c.name])) for c in classes)
    return host_cpu_by_size(policy, world_size, model, classes, host_cpu["per_request_s"],
                            chunk_steps=chunk_steps, cost_profile=cost_profile, execution=execution)  # fmt: skip


def calibrated_result_s(after_s: list[float]) -> float:
    """Result delivery (ExecutionModel.result_s) implied by the idle server: the median over its lone
    requests of the latency at the client less the server's own (gfdit.bench.client.calibrate's
    `after`), at least 0; 0 without any."""
    values = sorted(after_s)
    return max(0.0, values[len(values) // 2]) if values else 0.0


def calibrated_scale(
    policy: str, world_size: int, model: str, classes, measured_s: dict, *, chunk_steps: int,
    cost_profile: dict | None, execution: ExecutionModel,
) -> float:  # fmt: skip
    """Compute scale implied by the idle-server calibration: for each class, measured lone latency /
    simulated lone latency (no host overhead, scale 1); the median, at most 1 (a server slower than
    the simulation is calibrated_overhead's business, per task). The same independent measurement."""
    from gfdit.eval.sweep import SweepConfig

    cfg = SweepConfig("x", world_size, "paper-image", (1.0,), (policy,), cost_profile=cost_profile)
    ex = replace(execution, host_overhead_s=0.0, compute_scale=1.0)
    values = []
    for c in classes:
        sched = Scheduler(world_size, make_policy(policy), cfg.cost_model(), chunk_steps=chunk_steps)
        res = simulate(sched, [calibration_request(model, c)], true_cost=cfg.cost_model(), execution=ex)
        values.append(measured_s[c.name] / res.outcomes["calibration"].latency_s)
    values.sort()
    return min(1.0, values[len(values) // 2]) if values else 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> dict | None:
    import httpx

    try:
        r = httpx.get(url + "/health", timeout=2.0)
    except httpx.HTTPError:
        return None
    return r.json() if r.status_code == 200 else None


class ServerProcess:
    """`gfdit serve` (it becomes torchrun) in its own process group: `stop` sends SIGTERM to torchrun,
    which forwards it to the ranks; the group is killed only if that does not end them in time."""

    def __init__(self, serve_args: list[str], policy: str, log_path: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "gfdit.cli",
            "serve",
            *serve_args,
            "--policy",
            policy,
            "--port",
            str(self.port),
        ]
        self.command = shlex.join(cmd)
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_healthy(self, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            health = _healthy(self.url)
            if health is not None:
                return health
            try:
                code = self.proc.wait(timeout=0.5)  # the poll interval; returns early if the server died
            except subprocess.TimeoutExpired:
                continue
            raise FidelityError(f"server exited with status {code} before it was healthy ({self.command})")
        raise FidelityError(f"server not healthy after {timeout_s:.0f} s ({self.command})")

    def stop(self) -> int | None:
        """SIGTERM (the server drains), bounded; SIGKILL to the group if it does not exit."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)  # torchrun forwards it to every rank
                try:
                    return self.proc.wait(timeout=kStopTimeoutS)
                except subprocess.TimeoutExpired:
                    log.warning(
                        "server %d did not exit %s s after SIGTERM: SIGKILL", self.proc.pid, kStopTimeoutS
                    )
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    return self.proc.wait(timeout=30)
            return self.proc.returncode
        finally:
            self._log.close()


def _label(policy: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in policy)


def _replay_and_measure(
    url: str, args, out_dir: str, classes, model: str, command: str, server_pid: int | None = None
) -> tuple[dict, dict]:
    """Calibrates on the idle server (with `server_pid`, its host CPU too), then replays the trace
    into out_dir: (run.json, {"rows", "standalone_s", "host_cpu"})."""
    import httpx

    from gfdit.bench.client import calibrate, run_trace

    after: list[float] = []
    standalone = calibrate(
        url, model, classes, timeout_s=args.timeout, after=after
    )  # also warms the server up
    host_cpu = None
    if getattr(args, "calibrate_overhead", False) and server_pid is not None and classes:
        host_cpu = measured_host_cpu(url, server_pid, model, classes, timeout_s=args.timeout)
    run = run_trace(
        url, args.trace, out_dir, time_scale=args.time_scale, timeout_s=args.timeout, command=command
    )
    try:
        with open(os.path.join(out_dir, "metrics.txt"), "w") as f:
            f.write(httpx.get(url + "/metrics", timeout=10.0).text)
    except httpx.HTTPError as e:
        log.warning("could not read %s/metrics: %s", url, e)
    with open(os.path.join(out_dir, "results.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return run, {"rows": rows, "standalone_s": standalone, "host_cpu": host_cpu, "after_s": after}


def _repeat_dir(out_dir: str, k: int) -> str:
    """Where measurement k (from 0) of a policy goes: out_dir, then out_dir/repeat2, ... (created)."""
    where = out_dir if k == 0 else os.path.join(out_dir, f"repeat{k + 1}")
    os.makedirs(where, exist_ok=True)
    return where


def _measure_policy(policy: str, args, serve_args, out_dir: str, classes, model: str, command: str):
    """`args.repeats` measurements of one policy, each on a fresh server (two servers differ more than
    two replays on one: bench/results/2026-12-06-cpu-s9/fidelity4/README.md), the first into out_dir,
    measurement k into out_dir/repeatK; the first server's calibration counts. Returns (world size,
    server command, the first task log's path, the first got with "replays": every measurement's rows)."""
    first, replays = None, []
    for k in range(getattr(args, "repeats", 1)):
        where = _repeat_dir(out_dir, k)
        task_log = os.path.join(where, "tasks.jsonl")
        server = ServerProcess(
            [*serve_args, "--task-log", task_log], policy, os.path.join(where, "server.log")
        )
        try:
            world = server.wait_healthy(args.health_timeout)["world_size"]
            _, got = _replay_and_measure(
                server.url, args, where, classes, model, command, server.proc.pid if k == 0 else None
            )
        finally:
            code = server.stop()
        log.info("%s: server %d exited with %s", policy, k + 1, code)
        first = first or (world, server.command, task_log, got)
        replays.append(got["rows"])
    world, server_command, task_log, got = first
    return world, server_command, task_log, {**got, "replays": replays}


kMetricKeys = ("mean_latency_s", "p99_latency_s", "throughput_rps", "slo")


def repeated_metrics(replays: list[list[dict]], time_scale: float = 1.0) -> tuple[dict, dict]:
    """Several measurements of one trace (fresh servers, or replays on one): (each metric's mean over
    them, the spread: per metric the largest relative deviation of one from that mean, in points for
    SLO — how far the measurement itself moves; 0 for one)."""
    each = [measured_metrics(rows, time_scale) for rows in replays]
    mean = dict(each[0])
    spread = {}
    for key in kMetricKeys:
        values = [m[key] for m in each]
        mean[key] = sum(values) / len(values)
        if key == "slo":
            spread["slo_points"] = 100.0 * max(abs(v - mean[key]) for v in values)
        else:
            spread[key] = max(abs(v / mean[key] - 1.0) for v in values) if mean[key] else math.nan
    mean["completed"] = min(m["completed"] for m in each)
    mean["replays"] = len(each)
    return mean, {"replays": each, **spread}


def run_fidelity(args, execution: ExecutionModel, command: str) -> dict:
    """Every policy measured and simulated; writes fidelity.json and fidelity.md under args.out."""
    from gfdit.bench.workload import trace_classes

    meta, records = read_trace(args.trace)
    if not records:
        raise ValueError(f"{args.trace} has no requests")
    spec = meta.get("spec", {})
    model = spec.get("model") or records[0].model
    classes = trace_classes(meta)
    profile = None
    if args.cost_profile:
        from gfdit.cost import read_profile

        profile = read_profile(args.cost_profile, model=model)
    os.makedirs(args.out, exist_ok=True)
    serve_args = shlex.split(args.serve_args)
    rows = []
    policies = list(args.policies) or [None]
    for policy in policies:
        if args.url is not None:
            health = _healthy(args.url)
            if health is None:
                raise FidelityError(f"{args.url}/health does not answer 200")
            policy = health["policy_spec"]
            out_dir = os.path.join(args.out, _label(health["policy"]))
            replays, got = [], None
            for k in range(args.repeats):  # one server: replays on it
                where = _repeat_dir(out_dir, k)
                _, g = _replay_and_measure(args.url, args, where, classes, model, command)
                got = got or g
                replays.append(g["rows"])
            got = {**got, "replays": replays}
            world = health["world_size"]
            task_log = None  # the running server's own --task-log, if any, is not known here
            server_command = None
        else:
            out_dir = os.path.join(args.out, _label(policy))
            os.makedirs(out_dir, exist_ok=True)
            world, server_command, task_log, got = _measure_policy(
                policy, args, serve_args, out_dir, classes, model, command
            )
        measured, spread = repeated_metrics(got["replays"], args.time_scale)
        ex = execution
        measured_tasks, mapping = _read_task_log(task_log, records, policy)
        if getattr(args, "calibrate_overhead", False) and classes:
            ex = replace(ex, result_s=calibrated_result_s(got["after_s"]))
        fit = None
        if getattr(args, "calibrate_overhead", False) and classes and measured_tasks:
            fit = lone_task_fit(
                measured_tasks, set(mapping), policy, world, model, classes, chunk_steps=args.chunk_steps,
                cost_profile=profile, execution=ex,
            )  # fmt: skip
        if fit is not None:  # the lone requests' tasks, one by one
            ex = replace(ex, compute_scale=fit[0], host_overhead_s=fit[1])
        if (
            fit is None and getattr(args, "calibrate_overhead", False) and classes
        ):  # first: the host CPU is what it leaves
            scale = calibrated_scale(
                policy, world, model, classes, got["standalone_s"], chunk_steps=args.chunk_steps,
                cost_profile=profile, execution=ex,
            )  # fmt: skip
            ex = replace(ex, compute_scale=scale)
        if got["host_cpu"] is not None and execution.cores > 0:
            ex = replace(ex, host_cpu_by_size=host_cpu_table(
                got["host_cpu"], policy, world, model, classes, chunk_steps=args.chunk_steps,
                cost_profile=profile, execution=ex,
            ))  # fmt: skip
        if fit is None and getattr(args, "calibrate_overhead", False) and classes:
            overhead = calibrated_overhead(
                policy, world, model, classes, got["standalone_s"], chunk_steps=args.chunk_steps,
                cost_profile=profile, execution=ex,
            )  # fmt: skip
            ex = replace(ex, host_overhead_s=overhead)
        kept: dict = {}
        simulated = simulated_metrics(
            records, policy, world, chunk_steps=args.chunk_steps, cost_profile=profile, execution=ex,
            time_scale=args.time_scale, keep=kept,
        )  # fmt: skip
        by_task = _compare_tasks(measured_tasks, mapping, got["rows"], kept, out_dir, policy)
        plain = simulated_metrics(
            records, policy, world, chunk_steps=args.chunk_steps, cost_profile=profile,
            execution=ExecutionModel(), time_scale=args.time_scale,
        )  # fmt: skip
        row = {"policy": policy, "world_size": world, "server_command": server_command,
               "calibrated_standalone_s": got["standalone_s"], "host_overhead_s": ex.host_overhead_s,
               "host_cpu": got["host_cpu"], "host_cpu_by_size": ex.host_cpu_by_size, "compute_scale": ex.compute_scale,
               "result_s": ex.result_s, "calibration_after_s": got["after_s"],
               "lone_task_fit": fit,
               "measured": measured, "measured_spread": spread, "simulated": simulated, **errors(measured, simulated),
               "plain_simulated": plain,
               "plain_errors": errors(measured, plain), "by_request": by_task}  # fmt: skip
        rows.append(row)
        log.info("%s: %s", policy, {k: round(v, 4) for k, v in row.items() if k.endswith("_error")})
    report = {
        "trace": os.path.abspath(args.trace), "trace_meta": meta, "model": model, "command": command,
        "chunk_steps": args.chunk_steps, "time_scale": args.time_scale, "cost_profile": args.cost_profile,
        "execution": execution.to_json(), "runs": rows,
    }  # fmt: skip
    with open(os.path.join(args.out, "fidelity.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "fidelity.md"), "w") as f:
        f.write(render_markdown(report))
    return report


def _read_task_log(task_log, records, policy: str) -> tuple[list[dict], dict[str, str]]:
    """The server's task log and its replayed requests' trace ids (gfdit.eval.tasks.align); ([], {})
    without a usable log."""
    from gfdit.eval import tasks

    if task_log is None or not os.path.exists(task_log):
        return [], {}
    rows = tasks.read_task_log(task_log)
    try:
        return rows, tasks.align(rows, records)
    except ValueError as e:
        log.warning("%s: the task log does not match the trace: %s", policy, e)
        return [], {}


def _compare_tasks(measured, mapping, rows, kept: dict, out_dir: str, policy: str) -> dict | None:
    """The server's task log beside the simulation's trace (gfdit.eval.tasks): writes tasks.md and
    sim-tasks.jsonl.gz in out_dir, returns the per-request breakdown (None without a usable log)."""
    from gfdit.eval import tasks

    sim_rows = tasks.sim_task_rows(kept["result"], kept["requests"])
    with gzip.open(os.path.join(out_dir, "sim-tasks.jsonl.gz"), "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in sim_rows)
    if not measured:
        return None
    latency = {r["request_id"]: r["latency_s"] for r in rows if r["latency_s"] is not None}
    sim_latency = {rid: o.latency_s for rid, o in kept["result"].outcomes.items()}
    report = tasks.compare(measured, sim_rows, mapping, latency, sim_latency)
    with open(os.path.join(out_dir, "tasks.md"), "w") as f:
        f.write(tasks.render_markdown(report, policy))
    return report["by_request"]


def _pct(x: float) -> str:
    return "–" if x is None or math.isnan(x) else f"{x * 100:+.1f} %"


def _abs_pct(x: float) -> str:
    return "–" if x is None or math.isnan(x) else f"{x * 100:.1f} %"


def render_markdown(report: dict) -> str:
    lines = [
        f"# Simulator fidelity: {report['model']}, trace {os.path.basename(report['trace'])}",
        "",
        "| policy | mean latency meas / sim (s) | error | P99 meas / sim (s) | error | throughput meas / sim (req/s) "
        "| error | SLO meas / sim | points |",
        "| --- | --- | ---: | --- | ---: | --- | ---: | --- | ---: |",
    ]
    for r in report["runs"]:
        m, s = r["measured"], r["simulated"]
        lines.append(
            f"| {r['policy']} | {m['mean_latency_s']:.3f} / {s['mean_latency_s']:.3f} | {_pct(r['mean_latency_error'])} "
            f"| {m['p99_latency_s']:.3f} / {s['p99_latency_s']:.3f} | {_pct(r['p99_latency_error'])} "
            f"| {m['throughput_rps']:.3f} / {s['throughput_rps']:.3f} | {_pct(r['throughput_error'])} "
            f"| {m['slo']:.3f} / {s['slo']:.3f} | {r['slo_points_error']:+.1f} |"
        )
    lines += [
        "",
        "The same with the plain simulator (no execution model: cost-model task times only):",
        "",
        "| policy | mean latency error | P99 error | throughput error | SLO points |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in report["runs"]:
        e = r["plain_errors"]
        lines.append(
            f"| {r['policy']} | {_pct(e['mean_latency_error'])} | {_pct(e['p99_latency_error'])} "
            f"| {_pct(e['throughput_error'])} | {e['slo_points_error']:+.1f} |"
        )
    runs = [r for r in report["runs"] if r["measured"].get("replays", 1) > 1]
    if runs:
        lines += [
            "",
            f"The measurement's own spread: the trace measured {runs[0]['measured']['replays']} times, each on a "
            "fresh server (--url: replays on that one); measured above = their mean; the largest deviation of "
            "one measurement from that mean:",
            "",
            "| policy | mean latency | P99 | throughput | SLO points |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for r in runs:
            sp = r["measured_spread"]
            lines.append(
                f"| {r['policy']} | {_abs_pct(sp['mean_latency_s'])} | {_abs_pct(sp['p99_latency_s'])} "
                f"| {_abs_pct(sp['throughput_rps'])} | {sp['slo_points']:.1f} |"
            )
    return "\n".join(lines) + "\n"
