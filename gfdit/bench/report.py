"""The report of `gfdit bench report`: runs (one per policy, say) side by side.

Per run, overall and per request class: requests, completed, failed, rejected, throughput
(completed requests per second of the run's makespan: first send to last result), mean / P50 / P99
latency of the completed requests, and SLO attainment (requests that completed within their SLO,
over all requests: a failure or a refusal misses it). Per run also the batch sizes of its DENOISE
chunks (`chunk_batch_size`: request-chunks, mean, max, share batched, histogram by size), from the
server's gfdit_chunk_batch_size histogram as `gfdit bench run` scraped it before and after the run
(gfdit.bench.batches: the responses carry no per-request batch sizes, so it is per run, not per
class). Writes report.json, report.md (a table per metric group, runs as columns) and PNG plots
(latency CDF, SLO attainment and P99 latency per class, throughput).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import numpy as np

from . import batches

__all__ = ["load_run", "summarize", "build_report"]


def load_run(run_dir: str) -> tuple[dict, list[dict]]:
    """(run.json, results.jsonl rows) of a `gfdit bench run` output directory."""
    with open(os.path.join(run_dir, "run.json")) as f:
        meta = json.load(f)
    rows = []
    with open(os.path.join(run_dir, "results.jsonl")) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    return meta, rows


def _stats(rows: Sequence[dict]) -> dict:
    n = len(rows)
    done = [r for r in rows if r["status"] == "completed"]
    lat = np.array([r["latency_s"] for r in done], dtype=float)
    if rows:
        first = min(r["sent_s"] for r in rows)
        ends = [r["sent_s"] + r["latency_s"] for r in done]
        makespan = (max(ends) - first) if ends else 0.0
    else:
        makespan = 0.0

    def pct(q: float) -> float | None:
        return float(np.percentile(lat, q)) if lat.size else None

    return {
        "requests": n,
        "completed": len(done),
        "failed": sum(r["status"] in ("failed", "error") for r in rows),
        "rejected": sum(r["status"] == "rejected" for r in rows),
        "makespan_s": makespan,
        "throughput_rps": len(done) / makespan if makespan > 0 else None,
        "latency_mean_s": float(lat.mean()) if lat.size else None,
        "latency_p50_s": pct(50),
        "latency_p99_s": pct(99),
        "slo_attainment": (sum(bool(r["met_slo"]) for r in rows) / n) if n else None,
    }


def summarize(rows: Sequence[dict]) -> dict:
    """{"all": stats, "classes": {class: stats}} of one run's rows."""
    classes = sorted({r["cls"] for r in rows})
    return {"all": _stats(rows), "classes": {c: _stats([r for r in rows if r["cls"] == c]) for c in classes}}


_COLUMNS = (
    ("requests", "requests", "{:d}"),
    ("completed", "completed", "{:d}"),
    ("failed", "failed", "{:d}"),
    ("rejected", "rejected", "{:d}"),
    ("throughput_rps", "throughput (req/s)", "{:.3f}"),
    ("latency_mean_s", "mean latency (s)", "{:.3f}"),
    ("latency_p50_s", "P50 latency (s)", "{:.3f}"),
    ("latency_p99_s", "P99 latency (s)", "{:.3f}"),
    ("slo_attainment", "SLO attainment", "{:.1%}"),
)


def _class_order(runs: list[dict]) -> list[str]:
    """Classes in the order their traces define them (S, M, L), then any others by name."""
    order: list[str] = []
    for r in runs:
        spec = (r["meta"].get("trace_meta") or {}).get("spec") or {}
        for c in spec.get("classes", []):
            if c.get("name") not in order:
                order.append(c["name"])
    seen = {c for r in runs for c in r["summary"]["classes"]}
    return [c for c in order if c in seen] + sorted(seen - set(order))


def _fmt(value, pattern: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return pattern.format(value)


def _markdown(runs: list[dict]) -> str:
    labels = [r["label"] for r in runs]
    lines = ["# gfdit bench report", ""]
    for r in runs:
        m = r["meta"]
        lines.append(
            f"- **{r['label']}**: model {m.get('model')}, policy `{m.get('policy')}`, "
            f"{m.get('world_size')} ranks, {m.get('num_requests')} requests, "
            f"trace `{os.path.basename(m.get('trace', ''))}`, "
            f"max send lag {m.get('max_send_lag_s', 0.0):.3f} s"
        )
    groups = ["all", *_class_order(runs)]
    for group in groups:
        lines += ["", f"## {'all requests' if group == 'all' else 'class ' + group}", ""]
        lines.append("| metric | " + " | ".join(labels) + " |")
        lines.append("| --- | " + " | ".join("---:" for _ in labels) + " |")
        for key, title, pattern in _COLUMNS:
            cells = []
            for r in runs:
                s = r["summary"]["all"] if group == "all" else r["summary"]["classes"].get(group)
                cells.append(_fmt(s.get(key) if s else None, pattern))
            lines.append(f"| {title} | " + " | ".join(cells) + " |")
    lines += _batch_markdown(runs)
    return "\n".join(lines) + "\n"


def _batch_markdown(runs: list[dict]) -> list[str]:
    """The chunk batch-size table: one column per run, a row per statistic and per size bucket."""
    lines = ["", "## chunk batch sizes", ""]
    lines.append(
        "Requests per batch of each DENOISE chunk (1: alone), one sample per request's chunk, from the "
        "server's gfdit_chunk_batch_size histogram scraped before and after the run."
    )
    lines += ["", "| metric | " + " | ".join(r["label"] for r in runs) + " |"]
    lines.append("| --- | " + " | ".join("---:" for _ in runs) + " |")
    stats = [r["chunk_batch_size"] for r in runs]

    def row(title: str, cell) -> None:
        lines.append(f"| {title} | " + " | ".join("-" if s is None else cell(s) for s in stats) + " |")

    row("request-chunks", lambda s: str(s["chunks"]))
    row("mean batch size", lambda s: _fmt(s["mean"], "{:.2f}"))
    row("max batch size", _max_cell)
    row("batched (size >= 2)", lambda s: _fmt(s["batched_share"], "{:.1%}"))
    sizes: list[str] = []
    for s in stats:
        for k in (s or {}).get("histogram", {}):
            if k not in sizes:
                sizes.append(k)
    sizes.sort(key=_size_order)
    for k in sizes:
        row(f"size {k}", lambda s, k=k: str(s["histogram"].get(k, 0)))
    for r in runs:
        if r["chunk_batch_size"] is None:
            why = r["meta"].get("chunk_batch_size_error") or "the run predates batch sizes"
            lines.append(f"\n{r['label']}: no batch sizes ({why}).")
    return lines


def _max_cell(s: dict) -> str:
    if not s["chunks"]:
        return "-"
    if s["max"] is None:  # the +Inf bucket
        return next(reversed(s["histogram"]))
    return str(s["max"]) if s["max_exact"] else f"<= {s['max']}"


def _size_order(label: str) -> float:
    """'3' -> 3, '5-6' -> 5, '>32' -> 33."""
    return float(label[1:]) + 1 if label.startswith(">") else float(label.split("-")[0])


def _plots(runs: list[dict], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    labels = [r["label"] for r in runs]
    classes = _class_order(runs)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        lat = np.sort([row["latency_s"] for row in r["rows"] if row["status"] == "completed"])
        if lat.size:
            ax.step(lat, np.arange(1, lat.size + 1) / len(r["rows"]), where="post", label=r["label"])
    ax.set_xlabel("latency (s)")
    ax.set_ylabel("fraction of requests completed")
    ax.set_title("Latency CDF")
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(_save(fig, out_dir, "latency_cdf.png"))

    for key, title, fname, scale in (
        ("slo_attainment", "SLO attainment (%)", "slo_attainment.png", 100.0),
        ("latency_p99_s", "P99 latency (s)", "latency_p99.png", 1.0),
    ):
        fig, ax = plt.subplots(figsize=(8, 4))
        groups = ["all", *classes]
        width = 0.8 / max(1, len(runs))
        for i, r in enumerate(runs):
            values = []
            for g in groups:
                s = r["summary"]["all"] if g == "all" else r["summary"]["classes"].get(g, {})
                v = s.get(key)
                values.append(np.nan if v is None else v * scale)
            ax.bar(np.arange(len(groups)) + i * width, values, width, label=r["label"])
        ax.set_xticks(np.arange(len(groups)) + width * (len(runs) - 1) / 2, groups)
        ax.set_ylabel(title)
        ax.set_title(f"{title} per class")
        ax.grid(axis="y", alpha=0.3)
        if key == "slo_attainment":
            ax.set_ylim(0, 100)
        # Beside the axes, not over the bars (a full bar reaches the top of the axes).
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
        written.append(_save(fig, out_dir, fname))

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(labels, [r["summary"]["all"]["throughput_rps"] or 0.0 for r in runs])
    ax.set_ylabel("completed requests / s")
    ax.set_title("Throughput")
    ax.grid(axis="y", alpha=0.3)
    written.append(_save(fig, out_dir, "throughput.png"))
    return written


def _save(fig, out_dir: str, name: str) -> str:
    import matplotlib.pyplot as plt

    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_report(run_dirs: Sequence[str], out_dir: str, labels: Sequence[str] | None = None) -> dict:
    """Summarizes the runs and writes report.json, report.md and the plots under out_dir. Labels
    default to each run's label (its policy); duplicates get a #2, #3 suffix."""
    if not run_dirs:
        raise ValueError("no runs to report")
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs")
    runs, seen = [], {}
    for i, d in enumerate(run_dirs):
        meta, rows = load_run(d)
        label = (
            labels[i] if labels is not None else meta.get("label") or os.path.basename(os.path.normpath(d))
        )
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            label = f"{label} #{seen[label]}"
        runs.append(
            {
                "label": label,
                "dir": os.path.abspath(d),
                "meta": meta,
                "rows": rows,
                "summary": summarize(rows),
                "chunk_batch_size": batches.stats(meta.get("chunk_batch_size")),
            }
        )
    os.makedirs(out_dir, exist_ok=True)
    report = {
        "runs": [{k: r[k] for k in ("label", "dir", "meta", "summary", "chunk_batch_size")} for r in runs],
    }
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(_markdown(runs))
    report["plots"] = [os.path.basename(p) for p in _plots(runs, out_dir)]
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report
