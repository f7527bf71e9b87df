"""``gfcoll-bench --host-time``: host overhead per operation (Python call to return), eager, 1 KiB.

Run under torchrun; every rank runs every operation on the whole world (so the operations do
complete), and each call is timed on the host alone: how long the caller's thread is held, not how
long the GPU takes. Columns, each the median over ``--iters`` calls, side by side from one run:
- ``api``: the public call (``g.all_reduce(t)``, ...), validation and transport selection included;
- ``native``: the same operation issued straight on the native transport with the pointers, sizes
  and stream computed beforehand, i.e. the binding plus the C++ enqueue (kernels, stream waits);
- ``python``: api - native, what gfcoll's Python layer costs;
- ``copy_``: a torch ``copy_`` of the same 1 KiB on the same stream, the floor of a framework call.
The device of the run decides the transport (ipc on ranks of one node, GFCOLL_TRANSPORT forces).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import time
from datetime import datetime, timezone

import torch

import gfcoll

log = logging.getLogger("gfcoll.bench")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gfcoll-bench --host-time", description=__doc__.splitlines()[0])
    p.add_argument("--host-time", action="store_true", required=True)
    p.add_argument("--bytes", type=int, default=1024, help="bytes per rank (default 1024)")
    p.add_argument("-n", "--iters", type=int, default=2000, help="timed calls per operation (default 2000)")
    p.add_argument("-w", "--warmup", type=int, default=200, help="untimed calls first (default 200)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--json", metavar="PATH", help="write the rows as JSON, and host-time.md beside it")
    return p


def _median_us(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e6, 2)


def _time_calls(fn, iters: int, warmup: int, sync, every: int = 64) -> list[float]:
    """Times each call of fn on the host. Every `every` calls (untimed) the queue is drained, so
    that the launch queue never fills and a call never waits for the GPU."""
    for k in range(warmup):
        fn()
        if k % every == every - 1:
            sync()
    sync()
    out = []
    clock = time.perf_counter
    for k in range(iters):
        t0 = clock()
        fn()
        out.append(clock() - t0)
        if k % every == every - 1:
            sync()
    sync()
    return out


def run(args) -> int:
    world = gfcoll.init(device=args.device)
    try:
        return _run(world, args)
    finally:
        world.close()


def _run(world, args) -> int:
    r, n = world.rank, world.size
    dev = world.device
    g = world.group(list(range(n)))
    numel = max(1, args.bytes // 4)
    cuda = dev.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.current_stream(dev).synchronize()
        world.check()

    x = torch.full((numel,), float(r), device=dev)
    y = torch.empty(numel, device=dev)
    gathered = torch.empty(n * numel, device=dev)
    a2a_in = torch.full((n * numel,), float(r), device=dev)
    a2a_out = torch.empty(n * numel, device=dev)
    rs_out = torch.empty(numel, device=dev)
    recv = torch.empty(numel, device=dev)
    nxt, prv = (r + 1) % n, (r - 1) % n
    members = list(g.ranks)
    stream = torch.cuda.current_stream(dev).cuda_stream if cuda else 0
    ipc = world.native_transport("ipc") if (cuda and "ipc" in world.transports()) else None
    transport = "ipc" if ipc is not None else ("nccl" if cuda else "host")
    me = g.rank

    row_bytes = numel * 4
    api = {
        "all_gather": lambda: g.all_gather(gathered, x),
        "all_to_all": lambda: g.all_to_all(a2a_out, a2a_in),
        "reduce_scatter": lambda: g.reduce_scatter(rs_out, a2a_in),
        "all_reduce": lambda: g.all_reduce(y),
        "broadcast": lambda: g.broadcast(y, 0),
        "sendrecv": lambda: world.batch_p2p([gfcoll.P2P("send", x, nxt), gfcoll.P2P("recv", recv, prv)]),
    }
    native = {}
    if ipc is not None:
        offs = [k * row_bytes for k in range(n)]
        sizes = [row_bytes] * n
        native = {
            "all_gather": lambda: ipc.all_gather(
                members, me, x.data_ptr(), gathered.data_ptr(), row_bytes, stream, -1
            ),
            "all_to_all": lambda: ipc.all_to_all(
                members, me, a2a_in.data_ptr(), a2a_out.data_ptr(), offs, sizes, offs, sizes, stream, -1
            ),
            "reduce_scatter": lambda: ipc.reduce_scatter(
                members, me, a2a_in.data_ptr(), rs_out.data_ptr(), numel, 0, 0, stream, -1
            ),
            "all_reduce": lambda: ipc.all_reduce(
                members, me, y.data_ptr(), y.data_ptr(), numel, 0, 0, stream, -1
            ),
            "broadcast": lambda: ipc.broadcast(members, me, 0, y.data_ptr(), row_bytes, stream, -1),
            "sendrecv": lambda: ipc.batch_p2p(
                [(True, nxt, x.data_ptr(), row_bytes), (False, prv, recv.data_ptr(), row_bytes)], stream
            ),
        }
    copy = _median_us(_time_calls(lambda: y.copy_(x), args.iters, args.warmup, sync))
    rows = []
    for name, fn in api.items():
        if n == 1 and name == "sendrecv":
            continue
        g.barrier()
        t_api = _median_us(_time_calls(fn, args.iters, args.warmup, sync))
        t_native = None
        if name in native:
            g.barrier()
            t_native = _median_us(_time_calls(native[name], args.iters, args.warmup, sync))
        row = {
            "op": name,
            "ranks": n,
            "bytes_per_rank": row_bytes,
            "transport": transport,
            "api_us": t_api,
            "native_us": t_native,
            "python_us": None if t_native is None else round(t_api - t_native, 2),
            "copy_us": copy,
        }
        rows.append(row)
    g.barrier()
    every = [None] * n if n > 1 else None
    if n > 1:
        # Per-rank medians to rank 0 over the host transport (no torch.distributed needed).
        import pickle

        blob = pickle.dumps(rows)
        size = torch.tensor([len(blob)], dtype=torch.int64)
        sizes = torch.empty(n, dtype=torch.int64)
        g.all_gather(sizes, size)
        buf = torch.zeros(int(sizes.max()), dtype=torch.uint8)
        buf[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        allbuf = torch.empty(n * buf.numel(), dtype=torch.uint8)
        g.all_gather(allbuf, buf)
        every = [
            pickle.loads(allbuf[k * buf.numel() : k * buf.numel() + int(sizes[k])].numpy().tobytes())
            for k in range(n)
        ]
    if r == 0:
        per_rank = every or [rows]
        table = []
        for i, row in enumerate(rows):
            merged = dict(row)
            for key in ("api_us", "native_us", "python_us", "copy_us"):
                vals = [pr[i][key] for pr in per_rank if pr[i][key] is not None]
                merged[key] = round(max(vals), 2) if vals else None  # the slowest rank
            table.append(merged)
        _report(world, args, table)
    return 0


def _report(world, args, table) -> None:
    lines = [
        "| op | ranks | transport | api µs | native µs | python µs | torch copy_ µs |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for t in table:
        lines.append(
            f"| {t['op']} | {t['ranks']} | {t['transport']} | {t['api_us']} | {t['native_us']} | "
            f"{t['python_us']} | {t['copy_us']} |"
        )
    md = "\n".join(lines)
    print(md, flush=True)
    if not args.json:
        return
    dev = world.device
    env = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor(),
        "gpus_visible": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "build_info": gfcoll.build_info(),
        "iters": args.iters,
        "warmup": args.warmup,
        "note": "per-call host time, median over iters calls, slowest rank; eager, no graph",
    }
    try:
        env["commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"environment": env, "rows": table}, f, indent=2)
    with open(os.path.join(os.path.dirname(os.path.abspath(args.json)), "host-time.md"), "a") as f:
        f.write(f"\n{world.size} ranks, {env['device']}, {env['date']}, commit {env['commit']}\n\n{md}\n")


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.iters < 1 or args.warmup < 0 or args.bytes < 4:
        _parser().error("--iters >= 1, --warmup >= 0 and --bytes >= 4 are needed")
    if "WORLD_SIZE" not in os.environ:
        _parser().error("launch under torchrun (RANK and WORLD_SIZE are not set)")
    logging.basicConfig(level=logging.WARNING)
    return run(args)
