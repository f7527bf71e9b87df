"""Runs a function on N freshly spawned ranks, each with its own gfcoll world (tests only).

``run_ranks(fn, n, *args)`` starts n processes (spawn) with torchrun's environment on a free port,
calls ``fn(world, *args)`` on each, and returns the results in rank order. Any rank's exception
fails the call with every rank's traceback; a hang fails it at ``timeout``. Children that outlive
the call are killed.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, size, port, args, results, env, device, init, torch_dist):
    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(size),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
    )
    os.environ.update(env or {})
    import faulthandler
    import signal

    # A hung rank's Python stacks, on request of the parent (run_ranks, at its timeout).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        import torch

        torch.set_num_threads(1)
        if not init:
            results.put((rank, "ok", fn(None, *args)))
            return
        if torch_dist:
            # torch.distributed first: gfcoll then bootstraps through its store (tests compare the two).
            import torch.distributed as dist

            kw = {"device_id": torch.device("cuda", rank)} if torch_dist == "nccl" else {}
            if torch_dist == "nccl":
                torch.cuda.set_device(rank)
            dist.init_process_group(torch_dist, rank=rank, world_size=size, **kw)
        import gfcoll

        world = gfcoll.init(device=device)
        try:
            out = fn(world, *args)
        except BaseException:
            # Said now, not only through the queue: a close() that then hangs would hide it.
            import sys

            print(
                f"[rank {rank}] failed before close():\n{traceback.format_exc()}", file=sys.stderr, flush=True
            )
            raise
        finally:
            world.close()
            if torch_dist:
                import torch.distributed as dist

                dist.destroy_process_group()
        results.put((rank, "ok", out))
    except BaseException:  # report everything, including assertion errors, to the parent
        results.put((rank, "err", traceback.format_exc()))


def _dump_stacks(procs) -> None:
    """Asks each live process for its Python stacks (faulthandler on SIGUSR1, written to its stderr),
    and its native ones where the crash tracer is preloaded, then gives them a few seconds."""
    import signal
    import time

    # With tests/gpu/diag/segv_trace.so preloaded, SIGUSR2 makes every thread print its native stack
    # too (without it SIGUSR2 would end the process, so it is sent only then).
    native = "segv_trace" in os.environ.get("LD_PRELOAD", "")
    for p in procs:
        if p.is_alive():
            os.kill(p.pid, signal.SIGUSR1)
            if native:
                os.kill(p.pid, signal.SIGUSR2)
    # The dump is written synchronously by the signal handler; give the children's stderr a moment
    # to reach the terminal (bounded: the processes are killed right after).
    end = time.monotonic() + 3.0
    while time.monotonic() < end and any(p.is_alive() for p in procs):
        time.sleep(0.1)


def run_ranks(
    fn, n, *args, timeout=240.0, env=None, device="cpu", init=True, expect_exit=None, torch_dist=None
):
    """expect_exit: ranks that are expected to die without reporting (killed-peer tests).
    torch_dist: a torch.distributed backend to initialise before gfcoll (e.g. "nccl"), or None."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_child, args=(fn, r, n, port, args, results, env, device, init, torch_dist), daemon=True
        )
        for r in range(n)
    ]
    for p in procs:
        p.start()
    expect_exit = set(expect_exit or ())
    out, errors = {}, []
    try:
        import time

        deadline = time.monotonic() + timeout
        while len(out) + len(errors) < n - len(expect_exit):
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(n)) - set(out) - expect_exit)
                _dump_stacks([procs[r] for r in missing])
                raise AssertionError(
                    f"ranks {missing} did not finish within {timeout} s (their Python stacks: stderr)"
                )
            try:
                rank, status, value = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [
                    r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in expect_exit
                ]
                if dead and results.empty():
                    raise AssertionError(
                        f"ranks {dead} exited with codes {[procs[r].exitcode for r in dead]}"
                    ) from None
                continue
            if status == "ok":
                out[rank] = value
            else:
                errors.append(f"--- rank {rank} ---\n{value}")
        if errors:
            raise AssertionError("\n".join(errors))
        return [out.get(r) for r in range(n)]
    finally:
        for p in procs:
            p.join(timeout=10)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
