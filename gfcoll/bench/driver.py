"""The benchmark driver: process groups, the sweep, warm-up, timed iterations, checks, the
cross-rank reduction of timings, and the run's environment. Collective-specific parts are the
plugins of gfcoll.bench.ops.

Every function here that takes a ``Bench`` is called by EVERY rank in the same order, members of
the measured group or not: non-members skip the operation but join the control-plane collectives
(agreements, barriers, gathers), so that no rank waits for one that went elsewhere.

Note [bench process groups]
- torch.distributed is initialised first (gfcoll.init then bootstraps through its store):
  backend "gloo" on CPU, "cpu:gloo,cuda:nccl" on CUDA, WITHOUT a bound device, because a bound
  default group makes every later ``new_group`` eager (ncclCommSplit), and the formation benchmark
  needs the lazy case too.
- ``Bench.ctl``: a gloo group of the whole world, CPU tensors only, for the control plane. It never
  touches a GPU, so it neither creates the world's NCCL communicator nor waits on a stream.
- Baseline: one dedicated ``new_group`` per measured group, with the same ranks in the same order
  (``sort_ranks=False`` where torch has it), backend NCCL (CUDA) or gloo (CPU), connected once by
  a first tiny collective before anything is timed.
- The formation benchmark binds the default group to the device at its end, for split_group
  (gfcoll.bench.formation); the baseline groups were all made before, so that changes none of them.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import torch
import torch.distributed as dist

import gfcoll

from . import report
from .ops import OPS, Case, Collective, count_wrong

log = logging.getLogger("gfcoll.bench")

# Timed replays of a captured CUDA graph (each replays `iters` operations), after one untimed one.
GRAPH_REPLAYS = 5
# Timed windows of `iters` back-to-back eager operations (--timing back-to-back).
WINDOWS = 5
TIMINGS = ("back-to-back", "per-op")


@dataclass
class Options:
    """The validated command line (gfcoll.bench.__main__)."""

    sizes: list[int]  # sweep sizes, bytes (each collective's own convention, see ops)
    ops: list[str]  # collective names, keys of ops.OPS
    groups: list[tuple[int, ...]]  # ordered global ranks
    dtype: torch.dtype
    redop: str  # sum | avg | max | min, for all_reduce and reduce_scatter
    warmup: int  # untimed iterations per measurement
    iters: int  # timed iterations per measurement (operations per graph with --graph)
    transport: str  # "host" (CPU tensors, baseline gloo) or "nccl" (CUDA tensors, baseline NCCL)
    graph: bool  # time CUDA-graph replays
    timing: str  # eager timing: "back-to-back" (nccl-tests: a window of ops, divided) or "per-op"
    check: bool  # verify each measurement's result
    json: str | None  # JSON path (results.md is written beside it)
    plot: str | None  # directory of the PNG plots
    formation_reps: int  # repetitions per group-formation method
    baseline: bool  # run the torch.distributed baseline in the sweeps
    formation: bool  # measure group formation
    world_size: int
    rank: int
    argv: list[str] = field(default_factory=list)
    verbose: bool = False
    split_group: bool = False  # also measure dist.split_group (opt-in, see formation.py)


@dataclass
class Bench:
    """Run-wide state of one rank."""

    opts: Options
    rank: int
    size: int
    device: torch.device
    backend: str  # baseline backend: "nccl" or "gloo"
    world: gfcoll.World
    ctl: object  # gloo ProcessGroup of the whole world (control plane)
    # ordered ranks -> (dedicated torch group or None for a non-member, its member order)
    baseline: dict[tuple[int, ...], tuple[object, tuple[int, ...]]] = field(default_factory=dict)
    # (implementation, collective) -> why CUDA-graph capture is off for it
    graph_off: dict[tuple[str, str], str] = field(default_factory=dict)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    # -- control plane (every rank calls these) -------------------------------------------------
    def barrier(self) -> None:
        # An all-reduce of a CPU tensor rather than dist.barrier, whose device choice varies with
        # the torch version and the default group's binding.
        self.agree(True)

    def agree(self, ok: bool) -> bool:
        """True on every rank iff ``ok`` on every rank."""
        t = torch.tensor([1 if ok else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.ctl)
        return bool(t.item())

    def gather(self, values: list[float]) -> list[list[float]]:
        """Every rank's ``values`` (same length on every rank), in rank order."""
        t = torch.tensor(values, dtype=torch.float64)
        out = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(out, t, group=self.ctl)
        return [o.tolist() for o in out]

    def gather_objects(self, obj) -> list:
        out = [None] * self.size
        dist.all_gather_object(out, obj, group=self.ctl)
        return out

    def sync(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)


def describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


# -- setup ---------------------------------------------------------------------------------------
def setup(opts: Options) -> Bench:
    """Initialises torch.distributed, then gfcoll on its store (Note [bench process groups])."""
    if opts.transport == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        dist.init_process_group(backend="cpu:gloo,cuda:nccl")
        backend = "nccl"
    else:
        device = torch.device("cpu")
        dist.init_process_group(backend="gloo")
        backend = "gloo"
    ctl = dist.new_group(backend="gloo")
    world = gfcoll.init(device=device.type, store=None)
    log.info("ready: %s, baseline %s, gfcoll transports %s", world, backend, world.transports())
    return Bench(opts, dist.get_rank(), dist.get_world_size(), world.device, backend, world, ctl)


def make_baseline_groups(b: Bench) -> None:
    """One dedicated torch group per measured group (every rank calls new_group for each)."""
    keep_order = "sort_ranks" in inspect.signature(dist.new_group).parameters
    for ranks in b.opts.groups:
        kwargs = {"sort_ranks": False} if keep_order else {}
        pg = dist.new_group(list(ranks), backend=b.backend, **kwargs)
        if b.rank in ranks:
            order = tuple(dist.get_process_group_ranks(pg))
            # Connect now (NCCL creates its communicator at the first collective), untimed.
            dist.all_reduce(torch.zeros(1, device=b.device), group=pg)
            b.sync()
            b.baseline[ranks] = (pg, order)
        else:
            b.baseline[ranks] = (None, ranks)
    if not keep_order:
        log.info("this torch's new_group sorts ranks: the baseline runs in sorted member order")


# -- timing --------------------------------------------------------------------------------------
def _time_cpu(run: Callable[[], None], barrier: Callable[[], None], iters: int) -> list[float]:
    samples = []
    for _ in range(iters):
        barrier()
        t0 = time.perf_counter()
        run()
        samples.append((time.perf_counter() - t0) * 1e6)
    return samples


def _time_events(step: Callable[[], None], count: int) -> list[float]:
    """Runs ``step`` count times between CUDA events on the current stream; microseconds each."""
    pairs = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(count)
    ]
    for start, end in pairs:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) * 1e3 for start, end in pairs]


def _time_cuda(run: Callable[[], None], iters: int) -> list[float]:
    return _time_events(run, iters)


def _time_windows(run: Callable[[], None], iters: int, cuda: bool) -> tuple[list[float], list[float]]:
    """nccl-tests' timing: WINDOWS windows of ``iters`` operations issued back to back, each window
    timed as a whole (CUDA events around it on the current stream, or the wall clock on CPU, whose
    operations complete before returning) and divided by ``iters``. Returns (per-operation time,
    per-operation host time: first call to last return, no wait) of each window, in microseconds.
    Unlike an event pair around every operation, a launch-bound operation's window measures how
    fast the operations follow each other, not how long one launch takes."""
    times, host = [], []
    events = []
    for _ in range(WINDOWS):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        for _ in range(iters):
            run()
        t1 = time.perf_counter()
        if cuda:
            end.record()
            events.append((start, end))
        else:
            times.append((t1 - t0) * 1e6 / iters)
        host.append((t1 - t0) * 1e6 / iters)
    if cuda:
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) * 1e3 / iters for start, end in events]
    return times, host


def _capture(run: Callable[[], None], iters: int):
    """Captures ``iters`` operations into one CUDA graph. Returns (graph, None) or (None, reason).
    Capture issues no communication, so a rank that fails leaves no peer waiting."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            for _ in range(iters):
                run()
        torch.cuda.synchronize()
        return graph, None
    except Exception as e:  # capture unsupported by this operation: the caller falls back
        del graph
        try:
            torch.cuda.synchronize()
        except Exception:  # the reason above is what matters
            pass
        return None, describe(e)


def _time_graph(graph, iters: int) -> list[float]:
    """Per-operation time of each replay after the first (untimed) one."""
    return [t / iters for t in _time_events(graph.replay, GRAPH_REPLAYS + 1)[1:]]


# -- one measurement -----------------------------------------------------------------------------
@dataclass
class _Impl:
    time_us: float = math.nan  # this rank's median
    host_us: float = math.nan  # host time per call (back-to-back windows, CUDA): this rank's median
    wrong: int = -1  # mismatching elements (-1: not checked)
    graph: bool = False
    error: str | None = None


def _run_impl(b: Bench, plugin: Collective, case: Case | None, impl: str) -> _Impl:
    """Warm-up, (capture,) timed iterations and check of one implementation. Every rank calls it;
    ``case`` is None on non-members."""
    opts = b.opts
    res = _Impl()
    member = case is not None
    fn = plugin.run_gfcoll if impl == "gfcoll" else plugin.run_baseline
    run = (lambda: fn(case)) if member else None

    # Capture needs every connection open already (a lazy NCCL connect would communicate inside
    # the capture): with --graph, at least one eager warm-up.
    warmup = max(opts.warmup, 1) if opts.graph else opts.warmup
    if member:
        try:
            plugin.fill_timing(case)
            for _ in range(warmup):
                run()
            b.sync()
        except Exception as e:
            res.error = describe(e)
    if not b.agree(res.error is None):
        res.error = res.error or "skipped: another member failed"
        return res

    graph = None
    key = (impl, plugin.name)
    if opts.graph and key not in b.graph_off:
        reason = None
        if member:
            graph, reason = _capture(run, opts.iters)
        if not b.agree(reason is None):
            graph = None
            reasons = [r for r in b.gather_objects(reason) if r]
            b.graph_off[key] = reasons[0]
            if b.rank == 0:
                log.warning(
                    "%s %s: CUDA-graph capture failed, timing eager launches: %s",
                    impl,
                    plugin.name,
                    reasons[0],
                )
    b.barrier()  # the members start the timed iterations together

    if member:
        try:
            if graph is not None:
                samples = _time_graph(graph, opts.iters)
                res.graph = True
            elif opts.timing == "back-to-back":
                samples, host = _time_windows(run, opts.iters, b.is_cuda)
                if b.is_cuda:
                    res.host_us = statistics.median(host)
            elif b.is_cuda:
                samples = _time_cuda(run, opts.iters)
            else:
                samples = _time_cpu(run, case.group.barrier, opts.iters)
            res.time_us = statistics.median(samples)
        except Exception as e:
            res.error = describe(e)
        del graph
    if not b.agree(res.error is None):
        res.error = res.error or "skipped: another member failed"
        return res

    if member and opts.check:
        try:
            order = case.ranks if impl == "gfcoll" else case.pg_ranks
            plugin.fill(case, order)
            run()
            want = plugin.expected(case, order)
            res.wrong = count_wrong(plugin.result(case), want, case.redop if plugin.reduces else None, case.n)
            b.sync()
        except Exception as e:
            res.error = describe(e)
    return res


kCols = 5  # values per implementation in measure's gathered row: time, wrong, error, graph, host


def measure(b: Bench, plugin: Collective, ranks: tuple[int, ...], nbytes: int) -> dict:
    """One row: gfcoll and the baseline on one group and size. Every rank calls it."""
    opts = b.opts
    n = len(ranks)
    layout = plugin.layout(nbytes, n, opts.dtype.itemsize)
    group = b.world.group(ranks)
    case = None
    error = None
    if group.rank >= 0:
        pg, pg_order = b.baseline.get(ranks, (None, ranks))
        case = Case(b.world, ranks, group, pg, pg_order, opts.dtype, b.device, opts.redop, layout)
        try:
            plugin.alloc(case)
        except Exception as e:  # e.g. out of memory at the largest sizes
            error = describe(e)
    impls = ["gfcoll"] + (["baseline"] if opts.baseline else [])
    results = {}
    if b.agree(error is None):
        for impl in impls:
            results[impl] = _run_impl(b, plugin, case, impl)
    else:
        results = {impl: _Impl(error=error or "skipped: another member failed") for impl in impls}
    case = None  # frees the buffers before the next size

    local = [1.0 if group.rank >= 0 else 0.0]
    for impl in impls:
        r = results[impl]
        local += [r.time_us, float(r.wrong), 1.0 if r.error else 0.0, 1.0 if r.graph else 0.0, r.host_us]
    table = b.gather(local)
    errors = None
    if any(t[3 + kCols * k] for t in table for k in range(len(impls))):
        errors = b.gather_objects({impl: results[impl].error for impl in impls})

    row = {
        "op": plugin.name,
        "group": list(ranks),
        "n": n,
        "bytes": layout.nbytes,
        "count": layout.count,
        "requested_bytes": nbytes,
        "dtype": str(opts.dtype).removeprefix("torch."),
        "redop": opts.redop if plugin.reduces else None,
    }
    members = [k for k, t in enumerate(table) if t[0]]
    for k, impl in enumerate(impls):
        col = 1 + kCols * k
        errs = [errors[r][impl] for r in members if errors and errors[r][impl]] if errors else []
        times = [table[r][col] for r in members]
        entry: dict = {"error": errs[0] if errs else None, "graph": all(table[r][col + 3] for r in members)}
        if not errs and all(math.isfinite(t) for t in times):
            t_us = max(times)
            algbw = layout.nbytes / (t_us * 1e-6) / 1e9 if t_us > 0 else math.inf
            entry.update(
                time_us=t_us,
                algbw_gbs=algbw,
                busbw_gbs=algbw * plugin.busbw_factor(n),
                time_us_min_rank=min(times),
            )
        else:
            entry.update(time_us=None, algbw_gbs=None, busbw_gbs=None, time_us_min_rank=None)
        hosts = [table[r][col + 4] for r in members]
        entry["host_us"] = max(hosts) if hosts and not errs and all(math.isfinite(h) for h in hosts) else None
        wrong = [int(table[r][col + 1]) for r in members]
        entry["wrong"] = sum(wrong) if opts.check and all(w >= 0 for w in wrong) else None
        if opts.graph:
            entry["graph_fallback"] = b.graph_off.get((impl, plugin.name))
        row[impl] = entry
    if "baseline" not in row:
        row["baseline"] = None
    g, base = row["gfcoll"], row["baseline"]
    row["ratio"] = (
        base["time_us"] / g["time_us"] if base and g["time_us"] and base["time_us"] else None
    )  # = gfcoll busbw / baseline busbw
    return row


def sweep(
    b: Bench, on_section: Callable[[str, tuple[int, ...]], None], on_row: Callable[[dict], None]
) -> list[dict]:
    rows = []
    for name in b.opts.ops:
        plugin = OPS[name]
        for ranks in b.opts.groups:
            if len(ranks) < plugin.min_group:
                log.info(
                    "%s: skipping group %s (needs at least %d ranks)", name, list(ranks), plugin.min_group
                )
                continue
            on_section(name, ranks)
            for nbytes in b.opts.sizes:
                row = measure(b, plugin, ranks, nbytes)
                rows.append(row)
                on_row(row)
    return rows


# -- environment ---------------------------------------------------------------------------------
def _run_quiet(cmd: list[str], cwd: str | None = None) -> str | None:
    try:
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def _driver_version() -> str | None:
    try:
        import pynvml  # noqa: PLC0415 - optional

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:  # not installed or no driver: try nvidia-smi
        pass
    out = _run_quiet(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect_environment(b: Bench) -> dict:
    """Every rank's host and device, and rank 0's software versions. Every rank calls it."""
    mine = {
        "rank": b.rank,
        "hostname": socket.gethostname(),
        "device": str(b.device),
        "card": torch.cuda.get_device_name(b.device) if b.is_cuda else _cpu_name(),
    }
    ranks = b.gather_objects(mine)
    if b.rank != 0:
        return {}
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    commit = _run_quiet(["git", "rev-parse", "HEAD"], cwd=repo)
    dirty = _run_quiet(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo) if commit else None
    nccl = None
    if torch.cuda.is_available():
        try:
            v = torch.cuda.nccl.version()
            nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except Exception:  # torch without NCCL
            nccl = None
    try:
        build = gfcoll.build_info()
    except Exception as e:  # the report must still be written
        build = {"error": describe(e)}
    return {
        "hostname": socket.gethostname(),
        "hostnames": sorted({r["hostname"] for r in ranks}),
        "cards": sorted({r["card"] for r in ranks}),
        "ranks": ranks,
        "driver_version": _driver_version() if b.is_cuda or torch.cuda.is_available() else None,
        "cuda": torch.version.cuda,
        "nccl": nccl,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gfcoll": gfcoll.__version__,
        "gfcoll_build": build,
        "git_commit": commit,
        "git_dirty": bool(dirty) if commit else None,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(getattr(sys, "orig_argv", sys.argv)),
        "argv": b.opts.argv,
        "world_size": b.size,
        "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", b.size)),
        "transport": b.opts.transport,
        "gfcoll_transports": b.world.transports(),
        # which of them CUDA operations use: auto (nccl where it exists) unless forced
        "gfcoll_transport_forced": os.environ.get("GFCOLL_TRANSPORT", "auto"),
        "baseline": f"torch.distributed {b.backend} (dedicated new_group per group)"
        if b.opts.baseline
        else None,
        "graph": b.opts.graph,
    }


def _options_json(opts: Options) -> dict:
    return {
        "sizes": opts.sizes,
        "ops": opts.ops,
        "groups": [list(g) for g in opts.groups],
        "dtype": str(opts.dtype).removeprefix("torch."),
        "redop": opts.redop,
        "warmup": opts.warmup,
        "iters": opts.iters,
        "transport": opts.transport,
        "graph": opts.graph,
        "graph_replays": GRAPH_REPLAYS if opts.graph else None,
        "timing": "graph replay" if opts.graph else opts.timing,
        "windows": WINDOWS if opts.timing == "back-to-back" and not opts.graph else None,
        "check": opts.check,
        "formation_reps": opts.formation_reps,
        "baseline": opts.baseline,
        "formation": opts.formation,
    }


# -- the run -------------------------------------------------------------------------------------
def run(opts: Options, measure_formation: Callable | None = None) -> int:
    """Runs the whole benchmark on this rank. Returns the exit status: 0, or 1 when a check found
    wrong results or a gfcoll operation failed. `measure_formation(bench, groups)`: the group-formation
    measurements (gfcoll.bench.formation.measure, which builds on this module), run when
    opts.formation."""
    b = setup(opts)
    try:
        environment = collect_environment(b)
        if opts.baseline:
            make_baseline_groups(b)
        forms = measure_formation(b, opts.groups) if opts.formation and measure_formation else []
        printer = report.TablePrinter(b.backend, opts) if b.rank == 0 else None
        if printer:
            printer.preamble(environment)
            if forms:
                printer.formation(forms)
        rows = sweep(
            b,
            (lambda op, ranks: printer.section(op, ranks)) if printer else (lambda op, ranks: None),
            printer.row if printer else (lambda row: None),
        )
        wrong = sum((r["gfcoll"]["wrong"] or 0) + ((r["baseline"] or {}).get("wrong") or 0) for r in rows)
        failed = sum(1 for r in rows if r["gfcoll"]["error"])
        status = 1 if wrong or failed else 0
        if b.rank == 0:
            doc = {
                "schema": "gfcoll-bench/1",
                "environment": environment,
                "options": _options_json(opts),
                "formation": forms,
                "rows": rows,
                "check": {"enabled": opts.check, "wrong": wrong if opts.check else None, "passed": wrong == 0}
                if opts.check
                else {"enabled": False, "wrong": None, "passed": None},
                "gfcoll_errors": failed,
            }
            printer.summary(doc)
            if opts.json:
                report.write_json(opts.json, doc)
                report.write_markdown(
                    os.path.join(os.path.dirname(os.path.abspath(opts.json)), "results.md"), doc
                )
            if opts.plot:
                report.write_plots(opts.plot, doc)
        b.barrier()
        return status
    finally:
        b.world.close()
        dist.destroy_process_group()
