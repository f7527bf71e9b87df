"""The embedded-default demo: ``torchrun --nproc-per-node 4 -m gfcoll.demo``.

Plays what the serving runtime does with gfcoll: a "request" moves between groups of different
sizes and rank orders at every chunk boundary (SP4 -> SP2 -> SP1 -> SP2 on other ranks), each
group formed on the spot with no communication, and checks every result. Rank 0 prints a report.
"""

from __future__ import annotations

import argparse
import time

import torch

import gfcoll


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--numel", type=int, default=1 << 16, help="elements per rank per operation")
    args = parser.parse_args(argv)

    world = gfcoll.init(device=args.device)
    rank, size = world.rank, world.size
    dev = world.device
    lines = []
    try:
        # 1. Group formation: any ordered subset, no communication.
        t0 = time.perf_counter()
        reps = 20000
        for _ in range(reps):
            world.group(list(range(size)))
        form_us = (time.perf_counter() - t0) / reps * 1e6
        lines.append(f"world of {size} ranks on {dev}; transports {world.transports()}")
        lines.append(f"world.group() of {size} ranks: {form_us:.2f} us per call (no communication)")

        # 2. An elastic trajectory: each chunk runs on a different group.
        chunks = [list(range(size)), list(range(size))[: max(1, size // 2)], [0], list(range(size))[::-1][:2]]
        state = torch.full((args.numel,), 1.0, device=dev)
        for step, ranks in enumerate(chunks):
            g = world.group(ranks)
            t0 = time.perf_counter()
            if g.rank >= 0:
                t = state.clone()
                g.all_reduce(t, op="avg")
                gathered = torch.empty(g.size * args.numel, device=dev)
                g.all_gather(gathered, t)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                ok = bool(torch.all(gathered == 1.0))
                if not ok:
                    raise RuntimeError(f"chunk {step}: wrong result on rank {rank}")
            ms = (time.perf_counter() - t0) * 1e3
            what = f"{ms:.2f} ms, checked" if g.rank >= 0 else "rank 0 not a member (free for other work)"
            lines.append(
                f"chunk {step}: group {ranks} all_reduce + all_gather of {args.numel} floats: {what}"
            )

        # 3. Overlapping groups at the same time: {0,1} and {1,2} in flight on rank 1.
        if size >= 3:
            a, b = world.group([0, 1]), world.group([1, 2])
            works = [
                g.all_reduce(torch.full((1024,), float(rank), device=dev), async_op=True)
                for g in (a, b)
                if g.rank >= 0
            ]
            for w in works:
                w.wait()
            lines.append("overlapping groups [0, 1] and [1, 2] ran concurrently (async), no deadlock")

        # 4. A reshard: rank 0's slice moves to rank size-1, point to point.
        if size >= 2:
            dst = size - 1
            if rank == 0:
                world.send(torch.arange(8, dtype=torch.int64, device=dev), dst)
            elif rank == dst:
                got = torch.empty(8, dtype=torch.int64, device=dev)
                world.recv(got, 0)
                assert torch.equal(got.cpu(), torch.arange(8))
            lines.append(f"point to point: rank 0 -> rank {dst} slice moved and checked")
        world.group(list(range(size))).barrier()
    finally:
        world.close()
    if rank == 0:
        print("\n".join(["gfcoll demo"] + ["  " + s for s in lines] + ["  all checks passed"]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
