"""Per-step time of a DiT under Ulysses SP over gfcoll groups, and the time of state migrations.

    torchrun --nproc-per-node 4 bench/dit_steps.py --model flux-dev --sizes 512,1024,2048 \
        --degrees 1,2,4 --json OUT.json

Every rank loads the model (random bf16 weights, on its GPU). For each size and degree d, the
group [0..d-1] denoises `--steps` steps after one warm-up step (the other ranks wait); the time of
a step is the median over steps, each step's time the slowest member's. Then the latent of a
1024-token-per-rank-ish request is moved between layouts with the worker's reshard (the runtime's
own code path) and each migration timed (median of `--reps`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import datetime, timezone

import torch

import gfcoll
from gfdit.layout import Layout, plan_reshard
from gfdit.models import load_model
from gfdit.profile import cuda_sync, max_over_world, step_times, sync
from gfdit.request import Request
from gfdit.runtime.worker import Held, Worker


def migrations(world, model, size: int, reps: int) -> list[dict]:
    req = Request("m", model.preset.name, "x", width=size, height=size, num_inference_steps=2, seed=3)
    seq, c = model.seq_len(req), model.token_dim
    worker = Worker(world, model)
    full = torch.randn(1, seq, c, generator=torch.Generator().manual_seed(0)).to(world.device)
    rows = []
    cases = [((0, 1, 2, 3), (0, 1)), ((0, 1), (0, 1, 2, 3)), ((0,), (0, 1, 2, 3)), ((0, 1, 2, 3), (3,)),
             ((0, 1), (2, 3)), ((0, 1, 2, 3), (3, 2, 1, 0))]  # fmt: skip
    for src, dst in cases:
        if max(src + dst) >= world.size:
            continue
        plan = plan_reshard(Layout.sharded(src, 1), Layout.sharded(dst, 1), seq)
        cmd = {
            "kind": "DENOISE", "dim_size": seq, "token_dim": c, "latent_dtype": "float32",
            "transfers": [(t.src_rank, t.dst_rank, t.start, t.stop) for t in plan.transfers],
            "local": [(t.src_rank, t.dst_rank, t.start, t.stop) for t in plan.local],
        }  # fmt: skip
        times = []
        for _ in range(reps + 1):
            held = Held()
            if world.rank in src:
                i = src.index(world.rank)
                held.lo, held.hi = i * seq // len(src), (i + 1) * seq // len(src)
                held.latents = full[:, held.lo : held.hi].contiguous()
            sync(world)
            t0 = time.perf_counter()
            worker.reshard(cmd, held, dst, world.rank in dst)
            cuda_sync(world)
            times.append(max_over_world(world, time.perf_counter() - t0))
            if world.rank in dst:
                j = dst.index(world.rank)
                lo, hi = j * seq // len(dst), (j + 1) * seq // len(dst)
                assert torch.equal(held.latents, full[:, lo:hi]), f"reshard {src}->{dst} moved wrong data"
        rows.append({
            "size": size, "from": list(src), "to": list(dst), "bytes_moved": plan.bytes_moved(4 * c),
            "bytes_kept": plan.bytes_kept(4 * c), "median_s": statistics.median(times[1:]),
        })  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="flux-dev")
    p.add_argument("--sizes", default="512,1024,2048")
    p.add_argument("--degrees", default="1,2,4")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = p.parse_args()
    world = gfcoll.init(device=args.device)
    t0 = time.perf_counter()
    model = load_model(args.model, device=world.device)
    load_s = time.perf_counter() - t0
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        for d in (int(x) for x in args.degrees.split(",")):
            if d <= world.size:
                rows.append({"size": size, **step_times(world, model, size, size, d, args.steps)})
                if world.rank == 0:
                    r = rows[-1]
                    print(
                        f"{args.model} {size}x{size} ({r['tokens']} tokens) SP{d}: {r['step_s'] * 1e3:.1f} ms/step",
                        flush=True,
                    )
    mig = [
        m
        for size in (int(s) for s in args.sizes.split(","))
        for m in migrations(world, model, size, args.reps)
    ]
    if world.rank == 0:
        for m in mig:
            print(f"reshard {m['size']}^2 {m['from']} -> {m['to']}: {m['bytes_moved'] / 2**20:.2f} MiB moved, "
                  f"{m['bytes_kept'] / 2**20:.2f} MiB kept, {m['median_s'] * 1e3:.3f} ms")  # fmt: skip
        if args.json:
            env = {
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "card": torch.cuda.get_device_name(world.device) if world.device.type == "cuda" else "cpu",
                "world_size": world.size,
                "torch": torch.__version__,
                "model": args.model,
                "dtype": str(model.dtype),
                "load_s": load_s,
                "command": f"torchrun --nproc-per-node {world.size} bench/dit_steps.py " + " ".join(
                    f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "json"),
            }  # fmt: skip
            with open(args.json, "w") as f:
                json.dump({"environment": env, "steps": rows, "migrations": mig}, f, indent=2)
    world.close()


if __name__ == "__main__":
    main()
