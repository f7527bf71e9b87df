"""The table of issue 15's one-GPU figures from `bench/model_figures.sh` profiles.

    python bench/model_figures.py DIR [--out DIR/figures.md]

For every profile JSON in DIR (one model each, one rank): per size, the DENOISE step time, ENCODE and
DECODE times, and a request at the preset's default step count (ENCODE + steps x step + DECODE:
the one-rank latency of a request alone, queueing excluded), with the memory the rank held (model
loaded; peak while denoising that size). Numbers are quoted as measured (ms to 0.1, s to 0.01).
"""

from __future__ import annotations

import argparse
import glob
import json
import os

from gfdit.models.presets import get_preset


def _rows(profile: dict) -> list[dict]:
    preset = get_preset(profile["model"])
    obs = profile["observations"]
    peak = {(m["width"], m["height"], m["frames"]): m["peak_gib"]
            for m in profile.get("memory", {}).get("peak_steps", []) if m["degree"] == 1}  # fmt: skip
    out = []
    for o in obs:
        if o["kind"] != "DENOISE" or o["degree"] != 1:
            continue
        key = (o["width"], o["height"], o["frames"])
        stage = {x["kind"]: x["seconds"] for x in obs if (x["width"], x["height"], x["frames"]) == key}
        steps = preset.default_steps
        request_s = stage.get("ENCODE", 0.0) + steps * o["seconds"] + stage.get("DECODE", 0.0)
        out.append({
            "model": profile["model"], "size": f"{o['width']}x{o['height']}" + (f"x{o['frames']}" if o["frames"] else ""),
            "mode": "eager" if profile.get("compile") == "off" and not profile.get("cuda_graphs") else
                    f"compile {profile.get('compile')}, graphs {'on' if profile.get('cuda_graphs') else 'off'}",
            "step_ms": o["seconds"] * 1e3, "encode_ms": stage.get("ENCODE", float("nan")) * 1e3,
            "decode_ms": stage.get("DECODE", float("nan")) * 1e3, "steps": steps, "request_s": request_s,
            "model_gib": profile.get("memory", {}).get("model_gib"), "peak_gib": peak.get(key),
        })  # fmt: skip
    return out


def _gib(v) -> str:
    return "—" if v is None else f"{v:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    profiles = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(args.dir, "*.json")))]
    if not profiles:
        raise SystemExit(f"no profile JSON in {args.dir}")
    lines = ["| model | size | mode | step ms | encode ms | decode ms | request s (steps) | model GiB | peak GiB |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for prof in profiles:
        for r in _rows(prof):
            lines.append(
                f"| {r['model']} | {r['size']} | {r['mode']} | {r['step_ms']:.1f} | {r['encode_ms']:.1f} | "
                f"{r['decode_ms']:.1f} | {r['request_s']:.2f} ({r['steps']}) | {_gib(r['model_gib'])} | {_gib(r['peak_gib'])} |"
            )
    meta = sorted({(x["card"], x["date"][:10], x["torch"]) for x in profiles})
    lines += ["", "card, date, torch: " + "; ".join(", ".join(m) for m in meta)]
    lines += [f"command: `{x['command']}`" for x in profiles]
    text = "\n".join(lines) + "\n"
    out = args.out or os.path.join(args.dir, "figures.md")
    with open(out, "w") as f:
        f.write(text)
    print(text, end="")


if __name__ == "__main__":
    main()
