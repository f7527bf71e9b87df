"""A run's images against the same requests served alone.

    gfdit bench run --url URL --trace T --out runs/batched --save-images
    gfdit bench alone --url URL --run runs/batched --sample 20 --max-mean-diff 2

Batching (Note [Batched steps]) and elastic groups must not change what a request gets. `alone`
reads a `gfdit bench run --save-images` directory (results.jsonl, images/, and the trace its run.json
names), picks up to `sample` completed image requests spread evenly over the trace, sends each again
to the (otherwise idle) server one at a time, waiting for each, and compares the two images: the mean
and the largest absolute difference of their uint8 pixels. The result goes to RUN/alone.json; a
request over `max_mean_diff` (in 1/255 units) is named there.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass

import httpx
import numpy as np

from .client import auth_headers, error_text, request_body, response_png
from .workload import read_trace

__all__ = ["ImageDiff", "compare_alone", "image_diff"]


@dataclass
class ImageDiff:
    request_id: str
    cls: str
    mean_abs_diff: float  # mean |a - b| over every pixel and channel, uint8 units (x/255)
    max_abs_diff: int


def _pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def image_diff(a_png: bytes, b_png: bytes) -> tuple[float, int]:
    """(mean, max) absolute difference of two PNG images' uint8 pixels. ValueError if their sizes
    differ."""
    a, b = _pixels(a_png), _pixels(b_png)
    if a.shape != b.shape:
        raise ValueError(f"images of different sizes: {a.shape} vs {b.shape}")
    d = np.abs(a - b)
    return float(d.mean()), int(d.max())


def compare_alone(
    url: str, run_dir: str, *, sample: int = 20, max_mean_diff: float = 2.0, timeout_s: float = 600.0,
    api_key: str | None = None,
) -> dict:  # fmt: skip
    """Runs the comparison (module docstring) and writes RUN/alone.json; returns its content."""
    if sample < 1:
        raise ValueError(f"sample must be >= 1, got {sample}")
    with open(os.path.join(run_dir, "run.json")) as f:
        run = json.load(f)
    _, records = read_trace(run["trace"])
    by_id = {r.request_id: r for r in records}
    images = os.path.join(run_dir, "images")
    done = []
    with open(os.path.join(run_dir, "results.jsonl")) as f:
        for line in f:
            o = json.loads(line)
            rec = by_id.get(o["request_id"])
            if (o["status"] == "completed" and rec is not None and rec.kind == "image"
                    and os.path.isfile(os.path.join(images, f"{o['request_id']}.png"))):  # fmt: skip
                done.append(rec)
    if not done:
        raise ValueError(f"{run_dir}: no completed image request with a saved image (run with --save-images)")
    step = max(1, len(done) // sample)
    picked = done[::step][:sample]
    diffs: list[ImageDiff] = []
    with httpx.Client(base_url=url, timeout=timeout_s, headers=auth_headers(api_key)) as client:
        for rec in picked:
            r = client.post("/v1/images/generations", json=request_body(rec))
            if r.status_code != 200:
                raise RuntimeError(f"{rec.request_id} alone: HTTP {r.status_code}: {error_text(r)}")
            alone = response_png(r.json())
            with open(os.path.join(images, f"{rec.request_id}.png"), "rb") as f:
                mean, worst = image_diff(f.read(), alone)
            diffs.append(ImageDiff(rec.request_id, rec.cls, mean, worst))
    over = [d.request_id for d in diffs if d.mean_abs_diff > max_mean_diff]
    out = {
        "run": os.path.abspath(run_dir),
        "label": run.get("label"),
        "url": url,
        "sample": len(diffs),
        "max_mean_diff": max_mean_diff,
        "largest_mean_abs_diff": max(d.mean_abs_diff for d in diffs),
        "largest_max_abs_diff": max(d.max_abs_diff for d in diffs),
        "over": over,
        "images": [asdict(d) for d in diffs],
    }
    with open(os.path.join(run_dir, "alone.json"), "w") as f:
        json.dump(out, f, indent=2)
    return out
