"""Cost of forming a gfcoll group: ``world.group(ranks)``, timed with timeit over many calls.

    torchrun --nproc-per-node 8 bench/group_formation.py [--json PATH]

Runs on the CPU (group formation does no communication and touches no device). Rank 0 times
groups of 2, 4 and 8 ranks, in order and shuffled; every rank must join init and close.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import subprocess
import timeit
from datetime import datetime, timezone

import torch

import gfcoll


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write the results here (rank 0)")
    parser.add_argument("--number", type=int, default=20000, help="calls per timing")
    parser.add_argument("--repeat", type=int, default=15, help="timings; the median is reported")
    args = parser.parse_args()
    world = gfcoll.init(device="cpu")
    rows = []
    if world.rank == 0:
        rng = random.Random(0)
        for k in (2, 4, 8):
            if k > world.size:
                continue
            for shape, ranks in (("ordered", list(range(k))), ("shuffled", rng.sample(range(world.size), k))):
                times = timeit.repeat(lambda r=ranks: world.group(r), number=args.number, repeat=args.repeat)
                per_call = sorted(t / args.number * 1e6 for t in times)
                rows.append(
                    {
                        "group_size": k,
                        "shape": shape,
                        "ranks": ranks,
                        "median_us": statistics.median(per_call),
                        "min_us": per_call[0],
                        "max_us": per_call[-1],
                    }
                )
        print(f"world.group() cost, world of {world.size} ranks ({args.repeat} x {args.number} calls):")
        print(f"{'size':>5} {'shape':>9} {'median us':>10} {'min us':>8} {'max us':>8}")
        for r in rows:
            print(
                f"{r['group_size']:>5} {r['shape']:>9} {r['median_us']:>10.2f} {r['min_us']:>8.2f} {r['max_us']:>8.2f}"
            )
        if args.json:
            try:
                commit = subprocess.run(
                    ["git", "rev-parse", "HEAD"], capture_output=True, text=True
                ).stdout.strip()
            except OSError:
                commit = None
            env = {
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "host": platform.node(),
                "cpu": platform.processor() or platform.machine(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "commit": commit,
                "world_size": world.size,
                "command": f"torchrun --nproc-per-node {world.size} bench/group_formation.py",
            }
            with open(args.json, "w") as f:
                json.dump({"environment": env, "rows": rows}, f, indent=2)
    world.group(list(range(world.size))).barrier()
    world.close()


if __name__ == "__main__":
    main()
