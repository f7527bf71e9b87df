"""Per-step time of a DiT on one GPU: eager vs eager + CUDA graph vs regional torch.compile vs compiled +
CUDA graph, side by side in one run; the compiled + graph-replayed step checked against eager; and the
per-step breakdown (gfdit.breakdown) of the eager and the fastest path at SP1.

    python bench/step_speed.py --model flux-dev --sizes 256,512,1024 --out DIR
    python bench/step_speed.py --model wan2.1-1.3b --sizes 832x480x81 --modes eager,regional+graph --out DIR

Random weights in the preset's dtype (bf16), transformer only, synthetic text conditioning of the
encoder's shapes. For each mode and size: `--warmup` steps (compilation, graph capture), then `--reps`
runs of `--steps` steps through DiTModel.denoise (the runtime's path, Euler update included); per-step
time = the median run's wall time / steps, host time = the time until denoise returned (no wait).
Eager modes run first, then the model is compiled (regional, static shapes) and the compiled modes run.
Writes DIR/step_speed.json, DIR/step_speed.md, DIR/breakdown.json, DIR/breakdown.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

import torch

from gfdit.breakdown import step_breakdown, synthetic_cond, to_markdown
from gfdit.models import load_model
from gfdit.models.compile import compile_model
from gfdit.request import Request
from gfdit.runtime.graphs import StepGraphs

kModes = ("eager", "eager+graph", "regional", "regional+graph")


def _size(text: str) -> tuple[int, int, int | None]:
    parts = [int(p) for p in text.split("x")]
    if len(parts) == 1:
        return parts[0], parts[0], None
    return parts[0], parts[1], parts[2] if len(parts) > 2 else None


def _timed(model, req, cond, x, first: int, steps: int, reps: int) -> dict:
    n = x.shape[1]
    walls, hosts = [], []
    for r in range(reps):
        start = first + r * steps
        _sync(model.device)
        t0 = time.perf_counter()
        model.denoise(x, (0, n), cond, start, start + steps, req)
        hosts.append(time.perf_counter() - t0)
        _sync(model.device)
        walls.append(time.perf_counter() - t0)
    k = walls.index(statistics.median(walls)) if reps % 2 else 0
    return {"step_ms": statistics.median(walls) * 1e3 / steps, "host_ms": hosts[k] * 1e3 / steps,
            "runs_ms": [w * 1e3 / steps for w in walls]}  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="flux-dev")
    p.add_argument("--sizes", default="256,512,1024", help="WIDTH[xHEIGHT[xFRAMES]], comma-separated")
    p.add_argument("--modes", default=",".join(kModes))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--breakdown-steps", type=int, default=3)
    p.add_argument("--out", required=True)
    p.add_argument("--tag", default="", help="file name suffix (several models in one directory)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke test (no graphs)")
    p.add_argument("--fp32-reference", action="store_true",
                   help="also compare every mode's velocity with an eager float32 forward of the same weights "
                        "(the transformer upcast in place, then cast back: bf16 -> fp32 -> bf16 is exact)")  # fmt: skip
    args = p.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    bad = set(modes) - set(kModes)
    if bad:
        p.error(f"--modes: unknown {sorted(bad)}; choose from {kModes}")
    os.makedirs(args.out, exist_ok=True)
    device = torch.device(args.device)
    if device.type == "cpu" and any(m.endswith("+graph") for m in modes):
        p.error("--modes: CUDA graphs need --device cuda")
    t0 = time.perf_counter()
    model = load_model(args.model, device=device, components=("transformer",))
    load_s = time.perf_counter() - t0
    sizes = [_size(s) for s in args.sizes.split(",")]
    per_size = args.warmup + args.steps * args.reps + 2 * args.breakdown_steps + 1 + 4
    reqs, conds, x0s, refs = {}, {}, {}, {}
    for w, h, f in sizes:
        req = Request(f"b{w}x{h}", model.preset.name, "a lighthouse at dusk", width=w, height=h, num_frames=f,
                      num_inference_steps=4 * per_size, seed=1)  # fmt: skip
        model.validate(req)
        reqs[(w, h, f)] = req
        conds[(w, h, f)] = synthetic_cond(model, req)
        x0s[(w, h, f)] = model.init_latents(req).to(device)
    commit = os.environ.get("GFDIT_COMMIT", "")  # set where the tree is a copy without its .git
    if not commit:
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True
            ).stdout.strip()
        except OSError:
            pass
    env = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": args.model,
        "dtype": str(model.dtype),
        "load_s": load_s,
        "commit": commit,
        "command": "python bench/step_speed.py " + " ".join(sys.argv[1:]),
    }
    rows, breakdowns, checks = [], [], []

    def save() -> None:
        with open(os.path.join(args.out, f"step_speed{args.tag}.json"), "w") as fh:
            json.dump({"environment": env, "steps": rows, "checks": checks}, fh, indent=2)
        with open(os.path.join(args.out, f"breakdown{args.tag}.json"), "w") as fh:
            json.dump({"environment": env, "rows": breakdowns}, fh, indent=2)
        with open(os.path.join(args.out, f"breakdown{args.tag}.md"), "w") as fh:
            fh.write(to_markdown(breakdowns, f"Per-step breakdown, {args.model}, {env['card']}"))
        with open(os.path.join(args.out, f"step_speed{args.tag}.md"), "w") as fh:
            fh.write(_markdown(env, rows, checks, modes))

    def velocity(key):
        req, cond, x = reqs[key], conds[key], x0s[key]
        sched = model.timesteps(req)
        ctx = model.prepare(cond, req, None)
        with torch.no_grad():
            if model.step_graphs is not None:
                model.step_graphs.velocity(model, x, sched.timesteps[0], ctx, None)  # capture (or hit)
                return model.step_graphs.velocity(model, x, sched.timesteps[0], ctx, None).clone()
            return model.velocity(x, sched.timesteps[0], ctx, None).clone()

    fp32_refs = {}
    if args.fp32_reference:
        saved = model.dtype
        model.step_graphs = None
        model.transformer.float()
        model.dtype = torch.float32
        for key in sizes:
            fp32_refs[key] = velocity(key).float()
        model.transformer.to(saved)
        model.dtype = saved
        _sync(device)

    for mode in modes:
        compiled, graphs = mode.startswith("regional"), mode.endswith("+graph")
        if compiled and model.compile_mode == "off":
            compile_model(model, "regional", dynamic=False)
        if not compiled and model.compile_mode != "off":
            print(f"skipping {mode}: eager modes must come before compiled ones", flush=True)
            continue
        model.step_graphs = StepGraphs(device) if graphs else None
        for key in sizes:
            req, cond, x = reqs[key], conds[key], x0s[key]
            n = x.shape[1]
            tw = time.perf_counter()
            model.denoise(x, (0, n), cond, 0, args.warmup, req)
            _sync(device)
            warm_s = time.perf_counter() - tw
            r = _timed(model, req, cond, x, args.warmup, args.steps, args.reps)
            row = {"mode": mode, "width": key[0], "height": key[1], "frames": key[2], "tokens": n,
                   "warmup_s": warm_s, **r}  # fmt: skip
            if graphs:
                row["graph_pool"] = model.step_graphs.stats()
            rows.append(row)
            print(f"{args.model} {key} {mode}: {r['step_ms']:.1f} ms/step (host {r['host_ms']:.1f} ms), "
                  f"warm-up {warm_s:.1f} s", flush=True)  # fmt: skip
            v = velocity(key)
            check = {"mode": mode, "width": key[0], "height": key[1], "frames": key[2]}
            if mode == "eager":
                refs[key] = v
            elif key in refs:
                check["rel_l2_vs_eager"] = _rel_l2(v, refs[key])
            if key in fp32_refs:
                check["rel_l2_vs_fp32"] = _rel_l2(v, fp32_refs[key])
            if len(check) > 4:
                checks.append(check)
                print(f"  {mode}: relative L2 " + ", ".join(f"{k[7:]} {check[k]:.2e}" for k in check if
                                                           k.startswith("rel_l2")), flush=True)  # fmt: skip
            if mode in ("eager", "regional+graph"):
                first = args.warmup + args.steps * args.reps
                b = step_breakdown(model, req, cond, x, (0, n), None, steps=args.breakdown_steps, start=first)
                b["mode"] = mode
                breakdowns.append(b)
            save()
        if graphs:
            model.step_graphs.clear()
            model.step_graphs = None
            torch.cuda.empty_cache()
    save()
    print(open(os.path.join(args.out, f"step_speed{args.tag}.md")).read(), flush=True)


def _markdown(env, rows, checks, modes) -> str:
    lines = [f"# Per-step time, {env['model']} ({env['dtype']}), {env['card']}", "",
             f"- date {env['date']}; commit {env['commit']}; torch {env['torch']}",
             f"- command: `{env['command']}`", "",
             "| size | tokens | " + " | ".join(f"{m} ms" for m in modes) + " | best speed-up |",
             "|---|---:|" + "---:|" * len(modes) + "---:|"]  # fmt: skip
    keys = []
    for r in rows:
        k = (r["width"], r["height"], r["frames"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        by_mode = {r["mode"]: r for r in rows if (r["width"], r["height"], r["frames"]) == k}
        cells = [f"{by_mode[m]['step_ms']:.1f}" if m in by_mode else "—" for m in modes]
        eager = by_mode.get("eager", {}).get("step_ms")
        best = min(r["step_ms"] for r in by_mode.values())
        tokens = next(iter(by_mode.values()))["tokens"]
        size = "x".join(str(v) for v in k if v is not None)
        lines.append(
            f"| {size} | {tokens} | " + " | ".join(cells) + f" | {eager / best:.2f}x |" if eager else ""
        )
    lines += ["", "Host ms per step (time until denoise returned, no wait):", "",
              "| size | " + " | ".join(modes) + " |", "|---|" + "---:|" * len(modes)]  # fmt: skip
    for k in keys:
        by_mode = {r["mode"]: r for r in rows if (r["width"], r["height"], r["frames"]) == k}
        size = "x".join(str(v) for v in k if v is not None)
        lines.append(
            f"| {size} | "
            + " | ".join(f"{by_mode[m]['host_ms']:.1f}" if m in by_mode else "—" for m in modes)
            + " |"
        )
    lines += ["", "Correctness (one step's velocity, relative L2 against eager bf16 and against eager fp32 of the "
              "same weights where measured):", ""]  # fmt: skip

    def cell(c, k):
        return f"{c[k]:.2e}" if k in c else "—"

    lines += [f"- {c['mode']} {c['width']}x{c['height']}: vs eager {cell(c, 'rel_l2_vs_eager')}, "
              f"vs fp32 {cell(c, 'rel_l2_vs_fp32')}" for c in checks]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
