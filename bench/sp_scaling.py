"""SP step scaling from `gfdit profile` outputs: per model and size, the DENOISE step at every degree
under each profile's mode (eager, or compiled + CUDA graphs), and each degree's speed-up over the
compiled + graph SP1 step, with the SP scaling targets checked.

    python bench/sp_scaling.py PROFILE.json [PROFILE.json ...] --out scaling.md [--json scaling.json]

A profile's mode is its `compile` and `cuda_graphs` fields ("eager" when both are off). The
speed-up's base is the SP1 step of the same model and size in the fastest mode profiled (compiled +
graphs where present): "SP4 at 1024² >= 3.0x its compiled SP1 step" compares like with like.
Targets (flux-dev): SP4 at 1024² >= 3.0x, SP4 at 2048² >= 3.6x, SP2 at 512² >= 1.5x.
"""

from __future__ import annotations

import argparse
import json
import sys

kTargets = {("flux-dev", 1024, 1024, None, 4): 3.0, ("flux-dev", 2048, 2048, None, 4): 3.6,
            ("flux-dev", 512, 512, None, 2): 1.5}  # fmt: skip
kModeRank = {"eager": 0, "graphs": 1, "compiled": 2, "compiled + graphs": 3}


def mode_of(profile: dict) -> str:
    compiled = profile.get("compile", "off") not in ("off", None)
    graphs = bool(profile.get("cuda_graphs"))
    return {(False, False): "eager", (False, True): "graphs", (True, False): "compiled"}.get(
        (compiled, graphs), "compiled + graphs"
    )


def steps(profile: dict) -> dict[tuple, float]:
    """(width, height, frames, degree) -> seconds per DENOISE step (batch of one, no CFG split)."""
    out = {}
    for o in profile["observations"]:
        if o["kind"] == "DENOISE" and o.get("batch", 1) == 1 and not o.get("cfg"):
            out[(o["width"], o["height"], o["frames"], o["degree"])] = o["seconds"]
    return out


def table(profiles: list[dict]) -> list[dict]:
    """One row per (model, size, mode, degree): step seconds, speed-up over the base SP1 step, and
    the target where one applies."""
    rows = []
    for model in dict.fromkeys(p["model"] for p in profiles):
        mine = sorted((p for p in profiles if p["model"] == model), key=lambda p: kModeRank[mode_of(p)])
        measured = [(mode_of(p), p, steps(p)) for p in mine]
        shapes = sorted({k[:3] for _, _, s in measured for k in s}, key=lambda k: (k[2] or 0, k[0] * k[1]))
        for shape in shapes:
            base_mode, base = next(
                ((m, s[(*shape, 1)]) for m, _, s in reversed(measured) if (*shape, 1) in s), (None, None)
            )
            for mode, p, s in measured:
                for (w, h, f, d), sec in sorted(s.items()):
                    if (w, h, f) != shape:
                        continue
                    # the targets compare compiled steps with the compiled SP1 step
                    compiled = mode == base_mode and base_mode.startswith("compiled")
                    target = kTargets.get((model, w, h, f, d)) if compiled else None
                    speedup = base / sec if base else None
                    rows.append({
                        "model": model, "width": w, "height": h, "frames": f, "mode": mode, "degree": d,
                        "step_s": sec, "base_mode": base_mode, "speedup": speedup,
                        "efficiency": speedup / d if speedup else None, "card": p.get("card"),
                        "world_size": p.get("world_size"),
                        "target": target,
                        "met": (speedup >= target) if target and speedup else None,
                    })  # fmt: skip
    return rows


def render(rows: list[dict], paths: list[str], profiles: list[dict]) -> str:
    lines = ["# SP step scaling", ""]
    for path, p in zip(paths, profiles, strict=True):
        lines.append(
            f"- `{path}`: {p['model']} on {p.get('world_size')} x {p.get('card')}, {mode_of(p)}, "
            f"{p.get('date')}, `{p.get('command')}`"
        )
    lines += ["", "Speed-up: the compiled + graph (fastest profiled) SP1 step of the same size / this step.", "",
              "| model | size | mode | SP | step (ms) | speed-up | efficiency | target |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
    for r in rows:
        size = f"{r['width']}x{r['height']}" + (f"x{r['frames']}" if r["frames"] else "")
        target = "" if r["target"] is None else f">= {r['target']}x: {'met' if r['met'] else '**missed**'}"
        sp = "n/a" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        eff = "n/a" if r["efficiency"] is None else f"{r['efficiency']:.2f}"
        lines.append(
            f"| {r['model']} | {size} | {r['mode']} | {r['degree']} | {r['step_s'] * 1e3:.1f} | {sp} | {eff} | {target} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("profiles", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--json")
    args = p.parse_args(argv)
    profiles = []
    for path in args.profiles:
        with open(path) as f:
            doc = json.load(f)
        if doc.get("format") != "gfdit-profile/1":
            print(f"{path}: not a gfdit profile (format {doc.get('format')!r})", file=sys.stderr)
            return 2
        profiles.append(doc)
    rows = table(profiles)
    with open(args.out, "w") as f:
        f.write(render(rows, args.profiles, profiles))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    targets = [r for r in rows if r["target"] is not None]
    print(f"{sum(1 for r in targets if r['met'])} of {len(targets)} scaling targets met; {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
