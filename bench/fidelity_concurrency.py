"""How one-rank denoising steps slow down when k processes share the CPU cores (the simulator's
processor-sharing assumption, Note [Simulated execution] in gfdit.simexec: max(1, k / cores)).
    OMP_NUM_THREADS=1 python bench/fidelity_concurrency.py --model tiny-flux --sizes 32,144,256 \
        --procs 1,2,3,4 --seconds 3 --out OUT.json
For each size and k, k processes (each its own model, one intra-op thread, like the server's ranks)
denoise one-rank steps at once for `--seconds` after a warm-up; per process the mean step time over
that window; reported: their mean, its ratio to k = 1, and the ideal ratio max(1, k / cores).
"""

import argparse
import json
import multiprocessing as mp
import os
import time

kWarmupSteps = 3


def _worker(model_name: str, size: int, seconds: float, start, out) -> None:
    import torch

    torch.set_num_threads(1)
    from gfdit.models import load_model
    from gfdit.request import Request

    model = load_model(model_name, device=torch.device("cpu"))
    steps = 50  # a request's steps; the window cycles through them
    req = Request("c", model_name, "a photo of a lighthouse at dusk", width=size, height=size,
                  num_inference_steps=steps, seed=1)  # fmt: skip
    cond = model.encode(req)
    x = model.init_latents(req)
    seq = x.shape[1]
    for step in range(kWarmupSteps):
        x = model.denoise(x, (0, seq), cond, step, step + 1, req, group=None)
    start.wait()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        i = (kWarmupSteps + n) % steps
        x = model.denoise(x, (0, seq), cond, i, i + 1, req, group=None)
        n += 1
    out.put((time.perf_counter() - t0) / n)


def measure(model: str, size: int, k: int, seconds: float) -> float:
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(k), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(model, size, seconds, start, out)) for _ in range(k)]
    for p in procs:
        p.start()
    per = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    return sum(per) / len(per)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-flux")
    ap.add_argument("--sizes", default="32,144,256")
    ap.add_argument("--procs", default="1,2,3,4")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--cores", type=int, default=os.cpu_count())
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        base = None
        for k in (int(x) for x in args.procs.split(",")):
            step = measure(args.model, size, k, args.seconds)
            base = step if base is None else base
            row = {"size": size, "procs": k, "step_s": step, "ratio": step / base,
                   "ideal_ratio": max(1.0, k / args.cores)}  # fmt: skip
            rows.append(row)
            print(
                f"{size}x{size} k={k}: {step * 1e3:.2f} ms/step, x{row['ratio']:.2f} (ideal x{row['ideal_ratio']:.2f})"
            )
    with open(args.out, "w") as f:
        json.dump(
            {"model": args.model, "cores": args.cores, "seconds": args.seconds, "rows": rows}, f, indent=1
        )


if __name__ == "__main__":
    main()
