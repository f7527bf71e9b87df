"""Do the stream memory waits of one process progress independently across its streams?

The ipc transport waits with cuStreamWaitValue32 (Note [ipc signalling]). Its promise that
overlapping groups on different streams progress independently needs a stream blocked in such a
wait to leave the process's other streams running. This probe checks exactly that, without gfcoll:

  one-process   stream s1 waits for a word that a kernel on stream s2 (issued after the wait)
                writes. Independent streams: both finish.
  two-process   two processes on one GPU (or one GPU each, when there are two), each with streams
                s1 and s2, in the crossed pattern of two groups issued in opposite orders: process p
                signals the peer on s1 then waits on s1 for the peer's s1 signal, and the same on s2;
                process 0 issues s1 first (behind a sleep kernel), process 1 issues s2 first. Each
                wait needs only the peer's *same* stream. Independent streams: all finish.

Signals are written by a kernel (as the ipc kernels do) or by cuStreamWriteValue32 (--signal).
A wait still pending after --bound seconds is released by the host writing the awaited word, and
the scenario is reported as blocked. Output: one JSON line per scenario.
  usage: python bench/ipc_stream_waits.py [--bound 3] [--signal kernel|memop|both]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing as mp
import time


def _driver():
    cuda = ctypes.CDLL("libcuda.so.1")
    wait = cuda.cuStreamWaitValue32_v2
    wait.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
    write = cuda.cuStreamWriteValue32_v2
    write.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
    return wait, write


def _signal(cp, write, how: str, stream, addr: int) -> None:
    """Writes 1 into the int32 at device address addr, enqueued on stream."""
    if how == "memop":
        assert write(stream.ptr, addr, 1, 0) == 0
        return
    mem = cp.cuda.UnownedMemory(addr, 4, owner=None)
    view = cp.ndarray((1,), dtype=cp.int32, memptr=cp.cuda.MemoryPointer(mem, 0))
    with stream:
        view.fill(1)


def _sleep(cp, stream, cycles: int) -> None:
    k = cp.RawKernel(
        r"""extern "C" __global__ void spin(long long c) {
          long long t = clock64(); while (clock64() - t < c) {} }""",
        "spin",
    )
    with stream:
        k((1,), (1,), (cp.int64(cycles),))


def _finish(cp, streams: dict, words, bound: float) -> dict:
    """Waits for every stream up to bound seconds; then releases the words and reports."""
    t0 = time.monotonic()
    done = {}
    while time.monotonic() - t0 < bound and len(done) < len(streams):
        for name, s in streams.items():
            if name not in done and s.done:
                done[name] = round((time.monotonic() - t0) * 1e3, 3)
    blocked = sorted(set(streams) - set(done))
    if blocked:
        # Released by host-to-device copies (a copy engine), not by a kernel that could queue
        # behind the blocked work.
        import numpy as np

        rel = cp.cuda.Stream(non_blocking=True)
        for w in words:
            ones = cp.cuda.alloc_pinned_memory(w.nbytes)
            np.frombuffer(ones, dtype=np.int32, count=w.size)[:] = 1
            cp.cuda.runtime.memcpyAsync(
                w.data.ptr, ones.ptr, w.nbytes, cp.cuda.runtime.memcpyHostToDevice, rel.ptr
            )
        rel.synchronize()
    for s in streams.values():
        s.synchronize()
    return {"finished_ms": done, "blocked": blocked}


def one_process(how: str, bound: float) -> dict:
    import cupy as cp

    wait, write = _driver()
    word = cp.zeros(1, dtype=cp.int32)
    s1, s2 = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)
    cp.cuda.Device().synchronize()
    assert wait(s1.ptr, word.data.ptr, 1, 0) == 0
    _signal(cp, write, how, s2, word.data.ptr)
    r = _finish(cp, {"s1": s1, "s2": s2}, [word], bound)
    return {"scenario": "one-process", "signal": how, **r}


def _two_process_child(p: int, how: str, bound: float, conn, results, barrier, device: int) -> None:
    """conn: this child's end of a pipe to the other child (handles); results: a queue."""
    import cupy as cp

    try:
        cp.cuda.Device(device).use()
        wait, write = _driver()
        words = cp.zeros(64, dtype=cp.int32)  # [0]: signal of s1, [32]: signal of s2 (own words)
        conn.send(cp.cuda.runtime.ipcGetMemHandle(words.data.ptr))
        peer = cp.cuda.runtime.ipcOpenMemHandle(conn.recv())
        s1, s2 = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)
        cp.cuda.Device().synchronize()
        barrier.wait()
        order = [(s1, 0), (s2, 32 * 4)] if p == 0 else [(s2, 32 * 4), (s1, 0)]
        for k, (s, off) in enumerate(order):
            if k == 0:
                _sleep(cp, s, 2_000_000)  # about a millisecond: the first-issued stream starts late
            _signal(cp, write, how, s, peer + off)
            assert wait(s.ptr, words.data.ptr + off, 1, 0) == 0
        r = _finish(cp, {"s1": s1, "s2": s2}, [words], bound)
        barrier.wait()  # the peer no longer needs our words
        cp.cuda.runtime.ipcCloseMemHandle(peer)
        results.put({"scenario": "two-process", "signal": how, "process": p, "device": device, **r})
    except Exception as e:  # reported, not hidden
        results.put({"scenario": "two-process", "signal": how, "process": p, "error": repr(e)})


def two_process(how: str, bound: float) -> list[dict]:
    import cupy as cp

    ndev = cp.cuda.runtime.getDeviceCount()
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()  # one duplex pipe between the two children
    results = ctx.Queue()
    barrier = ctx.Barrier(2)
    procs = [
        ctx.Process(target=_two_process_child, args=(p, how, bound, conn, results, barrier, p % ndev))
        for p, conn in ((0, a), (1, b))
    ]
    for pr in procs:
        pr.start()
    out = sorted((results.get(timeout=bound * 4 + 60) for _ in procs), key=lambda r: r["process"])
    for pr in procs:
        pr.join(timeout=bound * 4 + 30)
    return out


def _run_isolated(fn, args, bound: float) -> list[dict]:
    """Runs one scenario in its own process, so that a scenario that hangs past its release is
    reported (as hung) instead of stopping the probe."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_isolated_child, args=(fn, args, q))
    p.start()
    try:
        out = q.get(timeout=bound * 4 + 60)
    except Exception:
        p.kill()
        return [{"scenario": fn.__name__, "args": list(args), "hung": True}]
    p.join(timeout=30)
    return out if isinstance(out, list) else [out]


def _isolated_child(fn, args, q) -> None:
    try:
        q.put(fn(*args))
    except Exception as e:
        q.put({"scenario": fn.__name__, "args": list(args), "error": repr(e)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bound", type=float, default=3.0, help="seconds before a wait counts as blocked")
    ap.add_argument("--signal", choices=["kernel", "memop", "both"], default="both")
    args = ap.parse_args()
    hows = ["kernel", "memop"] if args.signal == "both" else [args.signal]
    for fn in (one_process, two_process):
        for how in hows:
            for r in _run_isolated(fn, (how, args.bound), args.bound):
                print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
