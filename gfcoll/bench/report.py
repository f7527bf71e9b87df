"""Output of gfcoll-bench, on rank 0: the aligned table on stdout (printed as the sweep goes, like
nccl-tests), the JSON document, results.md, and PNG plots (matplotlib, Agg backend).

The JSON document (``schema`` "gfcoll-bench/1"): ``environment`` (host, cards, driver, CUDA,
NCCL, torch, gfcoll build, git commit, date, command line), ``options``, ``formation`` (rows of
gfcoll.bench.formation), ``rows`` (one per collective, group and size: ``gfcoll`` and ``baseline``
entries with time_us, algbw_gbs, busbw_gbs, wrong, graph, error, host_us (host time per call of
eager CUDA rows timed back to back, else null); ``ratio`` = baseline time / gfcoll time), ``check``
and ``gfcoll_errors``.
"""

from __future__ import annotations

import json
import math
import os

_TIME_W, _BW_W, _WRONG_W = 11, 12, 7


def has_host_column(transport: str, graph: bool, timing: str | None) -> bool:
    """Whether the rows carry the host time per call: eager CUDA rows timed back to back."""
    return transport == "nccl" and not graph and timing == "back-to-back"


def fmt_time(us: float | None) -> str:
    """Microseconds, in the unit that reads best: '2.10 us', '217.3 ms', '1.02 s'."""
    if us is None or not math.isfinite(us):
        return "n/a"
    if us < 1e3:
        return f"{us:.2f} us"
    if us < 1e6:
        return f"{us / 1e3:.2f} ms"
    return f"{us / 1e6:.3f} s"


def fmt_bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            v = n / scale
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.2f} {unit}"
    return f"{n} B"


def _num(v, width: int, digits: int = 2) -> str:
    if v is None:
        return "n/a".rjust(width)
    if isinstance(v, int):
        return str(v).rjust(width)
    return f"{v:.{digits}f}".rjust(width)


class TablePrinter:
    """nccl-tests-style table: one section per (collective, group), one line per size."""

    def __init__(self, backend: str, opts):
        self.backend = backend
        self.opts = opts
        self.baseline = opts.baseline
        self.host = has_host_column(opts.transport, opts.graph, opts.timing)
        self._errors_seen: set[str] = set()

    def preamble(self, env: dict) -> None:
        o = self.opts
        print(f"# gfcoll-bench  world {env.get('world_size')}  transport {o.transport}", end="")
        print(
            f"  baseline {self.backend if o.baseline else 'off'}  dtype {str(o.dtype).removeprefix('torch.')}",
            end="",
        )
        print(
            f"  op {o.redop}  warmup {o.warmup}  iters {o.iters}  graph {'on' if o.graph else 'off'}", end=""
        )
        print(f"  timing {'graph replay' if o.graph else o.timing}", end="")
        print(f"  check {'on' if o.check else 'off'}")
        print(f"# hosts {', '.join(env.get('hostnames', []))}  cards {', '.join(env.get('cards', []))}")
        print(
            f"# torch {env.get('torch')}  cuda {env.get('cuda')}  nccl {env.get('nccl')}  "
            f"driver {env.get('driver_version')}  gfcoll {env.get('gfcoll')} commit {env.get('git_commit')}"
        )
        print(f"# {env.get('date')}  {env.get('command')}", flush=True)

    def formation(self, rows: list[dict]) -> None:
        print("#")
        print("# Group formation: median [p10, p90] over repetitions; a repetition is the slowest member")
        width = max(len(r["label"]) for r in rows) + 2
        print(f"# {'method'.ljust(width)}{'group'.ljust(16)}{'median':>12}{'p10':>12}{'p90':>12}  reps")
        for r in rows:
            label = r["label"] + (f" [{r['backend']}]" if r["backend"] in ("gloo",) else "")
            group = str(r["group"]).replace(" ", "") if r["group"] else "-"
            head = f"  {label.ljust(width)}{group.ljust(16)}"
            if r["status"] != "ok":
                print(f"{head}{'n/a':>12}  ({r['reason']})")
                continue
            print(
                f"{head}{fmt_time(r['median_us']):>12}{fmt_time(r['p10_us']):>12}{fmt_time(r['p90_us']):>12}"
                f"  {r['reps']}"
            )
        for line in first_op_lines(rows):
            print(f"# {line}")
        print(flush=True)

    def section(self, op: str, ranks) -> None:
        o = self.opts
        from .ops import OPS  # noqa: PLC0415

        redop = f" {o.redop}" if OPS[op].reduces else ""
        print(f"# {op}  group {list(ranks)} (n={len(ranks)})  {str(o.dtype).removeprefix('torch.')}{redop}")
        impl_w = _TIME_W * (2 if self.host else 1) + 2 * _BW_W + _WRONG_W
        line = f"# {'':>12} {'':>11} {'gfcoll'.center(impl_w)}"
        if self.baseline:
            line += f" {('torch ' + self.backend).center(impl_w)}"
        print(line.rstrip())
        cols = (
            f"{'time(us)':>{_TIME_W}}{'algbw(GB/s)':>{_BW_W}}{'busbw(GB/s)':>{_BW_W}}{'#wrong':>{_WRONG_W}}"
            + (f"{'host(us)':>{_TIME_W}}" if self.host else "")
        )
        line = f"# {'size(B)':>12} {'count':>11} {cols}"
        if self.baseline:
            line += f" {cols}{'ratio':>8}"
        print(line.rstrip(), flush=True)

    def _impl(self, e: dict | None) -> str:
        host = f"{'':>{_TIME_W}}" if self.host else ""
        if e is None or e["time_us"] is None:
            text = "error" if e and e.get("error") else "n/a"
            return f"{text:>{_TIME_W}}{'':>{2 * _BW_W}}{'':>{_WRONG_W}}{host}"
        wrong = "-" if e["wrong"] is None else str(e["wrong"])
        if self.host:
            host = _num(e.get("host_us"), _TIME_W)
        return (
            f"{_num(e['time_us'], _TIME_W)}{_num(e['algbw_gbs'], _BW_W)}{_num(e['busbw_gbs'], _BW_W)}"
            f"{wrong:>{_WRONG_W}}{host}"
        )

    def row(self, row: dict) -> None:
        line = f"  {row['bytes']:>12} {row['count']:>11} {self._impl(row['gfcoll'])}"
        if self.baseline:
            line += f" {self._impl(row['baseline'])}{_num(row['ratio'], 8)}"
        print(line.rstrip(), flush=True)
        for impl in ("gfcoll", "baseline"):
            e = row.get(impl)
            for key in ("error", "graph_fallback"):
                msg = e.get(key) if e else None
                if msg and (impl, msg) not in self._errors_seen:
                    self._errors_seen.add((impl, msg))
                    print(f"#   {impl} {key.replace('_', ' ')}: {msg}", flush=True)

    def summary(self, doc: dict) -> None:
        rows = doc["rows"]
        print("#")
        for impl in ("gfcoll", "baseline"):
            vals = [r[impl]["busbw_gbs"] for r in rows if r.get(impl) and r[impl]["busbw_gbs"] is not None]
            if vals:
                print(f"# Avg bus bandwidth ({impl}): {sum(vals) / len(vals):.3f} GB/s over {len(vals)} rows")
        check = doc["check"]
        if check["enabled"]:
            verdict = "passed" if check["passed"] else "FAILED"
            print(f"# Check: {verdict} ({check['wrong']} wrong elements)")
        if doc["gfcoll_errors"]:
            print(f"# gfcoll errors: {doc['gfcoll_errors']} rows failed")
        print(flush=True)


# -- files ---------------------------------------------------------------------------------------
def _ensure_parent(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)


def _clean(obj):
    """JSON has no NaN/inf: they become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def write_json(path: str, doc: dict) -> None:
    _ensure_parent(path)
    with open(path, "w") as f:
        json.dump(_clean(doc), f, indent=1, sort_keys=False)
        f.write("\n")


_TIMING_TEXT = {
    "back-to-back": "per operation, the median over windows of `iters` operations issued back to back "
    "(each window timed whole and divided, as nccl-tests does)",
    "per-op": "the median over iterations, each timed alone",
    "graph replay": "per operation, the median over replays of a CUDA graph of `iters` operations",
}


def write_markdown(path: str, doc: dict) -> None:
    env, opts = doc["environment"], doc["options"]
    base = "baseline" if opts["baseline"] else None
    host = has_host_column(opts["transport"], opts["graph"], opts.get("timing"))
    lines = [
        "# gfcoll-bench results",
        "",
        f"- date: {env.get('date')}; command: `{env.get('command')}`",
        f"- hosts: {', '.join(env.get('hostnames', []))}; cards: {', '.join(env.get('cards', []))}; "
        f"driver {env.get('driver_version')}",
        f"- torch {env.get('torch')}, CUDA {env.get('cuda')}, NCCL {env.get('nccl')}, gfcoll {env.get('gfcoll')} "
        f"(commit {env.get('git_commit')}{', dirty' if env.get('git_dirty') else ''})",
        f"- world {env.get('world_size')}, transport {opts['transport']}, baseline: {env.get('baseline')}, "
        f"dtype {opts['dtype']}, op {opts['redop']}, warmup {opts['warmup']}, iters {opts['iters']}, "
        f"graph {opts['graph']}, check {opts['check']}, timing {opts.get('timing', 'per-op')}",
        "- time: " + _TIMING_TEXT.get(opts.get("timing", "per-op"), "") + "; the slowest member's; busbw per "
        "nccl-tests; ratio = baseline time / gfcoll time (> 1: gfcoll faster)"
        + ("; host: host time per call (first call to last return of a window, no wait)" if host else ""),
        "",
    ]
    if doc["formation"]:
        lines += [
            "## Group formation",
            "",
            "| method | backend | group | median | p10 | p90 | reps |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for r in doc["formation"]:
            if r["status"] == "ok":
                cells = [
                    fmt_time(r["median_us"]),
                    fmt_time(r["p10_us"]),
                    fmt_time(r["p90_us"]),
                    str(r["reps"]),
                ]
            else:
                cells = [f"n/a ({r['reason']})", "", "", "0"]
            lines.append(
                f"| {r['label']} | {r['backend'] or '-'} | {r['group'] or '-'} | " + " | ".join(cells) + " |"
            )
        lines.append("")
        lines += [f"- {line}" for line in first_op_lines(doc["formation"])]
        lines.append("")
    ops = list(dict.fromkeys(r["op"] for r in doc["rows"]))
    for op in ops:
        lines += [f"## {op}", ""]
        head = "| group | size | gfcoll time (us) | gfcoll busbw (GB/s) |"
        rule = "| --- | ---: | ---: | ---: |"
        if host:
            head += " gfcoll host (us) |"
            rule += " ---: |"
        if base:
            head += " baseline time (us) | baseline busbw (GB/s) |"
            rule += " ---: | ---: |"
            if host:
                head += " baseline host (us) |"
                rule += " ---: |"
            head += " ratio |"
            rule += " ---: |"
        if opts["check"]:
            head += " check |"
            rule += " --- |"
        lines += [head, rule]
        notes: dict[tuple, str] = {}
        for r in (r for r in doc["rows"] if r["op"] == op):
            g, b = r["gfcoll"], r["baseline"]
            cells = [str(r["group"]), fmt_bytes(r["bytes"]), _md_num(g["time_us"]), _md_num(g["busbw_gbs"])]
            if host:
                cells.append(_md_num(g.get("host_us")))
            if base:
                cells += [_md_num(b and b["time_us"]), _md_num(b and b["busbw_gbs"])]
                if host:
                    cells.append(_md_num(b and b.get("host_us")))
                cells.append(_md_num(r["ratio"]))
            if opts["check"]:
                cells.append(" / ".join(_md_check(e) for e in (g, b) if e))
            lines.append("| " + " | ".join(cells) + " |")
            for impl, e in (("gfcoll", g), ("baseline", b)):
                for key in ("error", "graph_fallback"):
                    if e and e.get(key) and (impl, key, e[key]) not in notes:
                        notes[(impl, key, e[key])] = f"- {impl} {key.replace('_', ' ')}: {e[key]}"
        lines += ["", *notes.values(), ""] if notes else [""]
    _ensure_parent(path)
    with open(path, "w") as f:
        f.write("\n".join(lines))


def first_op_ratios(forms: list[dict]) -> list[dict]:
    """Per rank set: the first operation on a never-used group against the steady state (the
    gfcoll.first_op and gfcoll.steady_op rows): ``first_us`` (the set's first use), ``median_us``
    (of every new member order), ``steady_us``, and their ratios."""
    out = []
    steady = {tuple(sorted(r["group"])): r for r in forms if r["method"] == "gfcoll.steady_op"}
    for r in forms:
        s = steady.get(tuple(sorted(r["group"])))
        if r["method"] != "gfcoll.first_op" or r["status"] != "ok" or not s or s["status"] != "ok":
            continue
        first, med, base = r["samples_us"][0], r["median_us"], s["median_us"]
        out.append({
            "group": r["group"], "first_us": first, "median_us": med, "steady_us": base,
            "first_ratio": first / base if base else None, "median_ratio": med / base if base else None,
        })  # fmt: skip
    return out


def first_op_lines(forms: list[dict]) -> list[str]:
    return [
        f"group {q['group']}: first operation on it {fmt_time(q['first_us'])} "
        f"({q['first_ratio']:.2f}x steady {fmt_time(q['steady_us'])}); median over new member orders "
        f"{fmt_time(q['median_us'])} ({q['median_ratio']:.2f}x)"
        for q in first_op_ratios(forms)
        if q["steady_us"]
    ]


def _md_check(e: dict) -> str:
    if e.get("error"):
        return "error"
    if e["wrong"] is None:
        return "-"
    return "ok" if e["wrong"] == 0 else f"{e['wrong']} wrong"


def _md_num(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.2f}"


def write_plots(directory: str, doc: dict) -> list[str]:
    """One PNG per collective (latency and busbw against size, gfcoll solid and the baseline
    dashed, one colour per group) and formation.png (log scale). Returns the paths written."""
    import matplotlib  # noqa: PLC0415 - optional dependency, checked by the CLI

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    os.makedirs(directory, exist_ok=True)
    written = []
    backend = doc["environment"].get("baseline") or "baseline"
    base_name = "torch " + ("nccl" if doc["options"]["transport"] == "nccl" else "gloo")
    for op in dict.fromkeys(r["op"] for r in doc["rows"]):
        rows = [r for r in doc["rows"] if r["op"] == op]
        fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(13, 5))
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for k, group in enumerate(dict.fromkeys(tuple(r["group"]) for r in rows)):
            color = colors[k % len(colors)]
            grows = sorted((r for r in rows if tuple(r["group"]) == group), key=lambda r: r["bytes"])
            for impl, style, name in (("gfcoll", "-o", "gfcoll"), ("baseline", "--x", base_name)):
                pts = [(r["bytes"], r[impl]) for r in grows if r.get(impl) and r[impl]["time_us"]]
                if not pts:
                    continue
                xs = [p[0] for p in pts]
                label = f"{name} {list(group)}"
                ax_t.plot(xs, [p[1]["time_us"] for p in pts], style, color=color, label=label, ms=4)
                ax_b.plot(xs, [p[1]["busbw_gbs"] for p in pts], style, color=color, label=label, ms=4)
        for ax, ylabel in ((ax_t, "latency (us)"), (ax_b, "bus bandwidth (GB/s)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("size (bytes)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.set_yscale("log")
        ax_t.legend(fontsize=7)
        fig.suptitle(f"{op} ({doc['options']['dtype']}): gfcoll vs {backend}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(directory, f"{op}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    forms = [r for r in doc["formation"] if r["status"] == "ok"]
    if forms:
        fig, ax = plt.subplots(figsize=(10, 0.35 * len(forms) + 1.5))
        labels = [f"{r['label']} {r['group']}" for r in forms]
        med = [r["median_us"] for r in forms]
        err = [[r["median_us"] - r["p10_us"] for r in forms], [r["p90_us"] - r["median_us"] for r in forms]]
        colors = ["tab:green" if r["method"].startswith("gfcoll.") else "tab:blue" for r in forms]
        ax.barh(range(len(forms)), med, xerr=err, color=colors, capsize=3)
        ax.set_yticks(range(len(forms)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("time to a usable group (us, log scale; median, bars p10-p90)")
        ax.set_title(
            f"Group formation: gfcoll.group (green) vs new communicators (blue), world of {doc['environment'].get('world_size')} ranks",
            fontsize=10,
        )
        ax.grid(True, axis="x", which="both", alpha=0.3)
        fig.tight_layout()
        path = os.path.join(directory, "formation.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
