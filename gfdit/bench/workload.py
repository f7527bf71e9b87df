"""Workloads for `gfdit bench`: request classes, (piecewise-)Poisson arrivals, deadlines, and the
JSON-lines trace file that `gfdit bench run` replays.

A trace is reproducible from its spec: one seeded random.Random draws, in order, every arrival gap,
then for each request its class, its seed and its prompt. Deadlines are relative to arrival:
`slo_s = alpha * standalone_s(class)`, where standalone_s is the request's latency alone on one rank,
from gfdit.cost.AnalyticCostModel or measured by calibration requests against a server
(`calibrate`).

Trace file: the first line is {"meta": {spec, counts}}, then one request per line
(`TraceRecord` fields); arrival_s and deadline_s are seconds from the start of the replay.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gfdit.cost import AnalyticCostModel, CostModel
from gfdit.models.presets import get_preset
from gfdit.request import Request

__all__ = [
    "RequestClass",
    "Phase",
    "WorkloadSpec",
    "TraceRecord",
    "default_classes",
    "parse_class",
    "parse_phases",
    "poisson_arrivals",
    "analytic_standalone",
    "generate",
    "write_trace",
    "read_trace",
    "kPrompts",
]

kPrompts = (
    "a red fox in the snow",
    "a lighthouse on a cliff at dusk",
    "an astronaut riding a horse",
    "a bowl of ramen, studio lighting",
    "a watercolor painting of a city street in the rain",
    "a macro photo of a dragonfly",
    "a cozy cabin in a pine forest",
    "a robot reading a newspaper in a cafe",
)


@dataclass(frozen=True)
class RequestClass:
    """One kind of request in a workload (e.g. S, M, L)."""

    name: str  # label in traces and reports
    width: int  # pixels
    height: int  # pixels
    num_frames: int | None  # video frames; None for images
    num_inference_steps: int  # denoising steps
    weight: float  # relative frequency (normalised over the classes)

    def __post_init__(self) -> None:
        if not self.name or not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ValueError(f"class name must be letters, digits, _ . or -, got {self.name!r}")
        if self.width < 1 or self.height < 1 or self.num_inference_steps < 1:
            raise ValueError(f"class {self.name}: sizes and steps must be positive")
        if self.num_frames is not None and self.num_frames < 1:
            raise ValueError(f"class {self.name}: frames must be positive, got {self.num_frames}")
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise ValueError(f"class {self.name}: weight must be > 0, got {self.weight}")


@dataclass(frozen=True)
class Phase:
    """Poisson arrivals at `rate` requests/s from `start_s` until the next phase (or the end)."""

    start_s: float  # seconds from the start of the trace
    rate: float  # requests per second (0: none)


@dataclass(frozen=True)
class WorkloadSpec:
    """Everything a trace is generated from."""

    model: str  # served model preset
    duration_s: float  # arrivals fall in [0, duration_s)
    phases: tuple[Phase, ...]  # ascending start_s, the first at 0
    classes: tuple[RequestClass, ...]  # request mix
    alpha: float  # deadline = arrival + alpha * standalone latency of the request's class
    seed: int  # seed of every random draw
    standalone_s: Mapping[str, float] | None = None  # class -> measured standalone seconds; None: analytic
    slo_source: str = "analytic"  # "analytic" (AnalyticCostModel), "profiled" or "calibrated" (standalone_s)

    def __post_init__(self) -> None:
        if not (self.duration_s > 0 and math.isfinite(self.duration_s)):
            raise ValueError(f"duration must be > 0, got {self.duration_s}")
        if not self.phases or self.phases[0].start_s != 0:
            raise ValueError("phases must start at 0")
        starts = [p.start_s for p in self.phases]
        if starts != sorted(starts) or len(set(starts)) != len(starts):
            raise ValueError(f"phase starts must increase, got {starts}")
        if any(p.rate < 0 or not math.isfinite(p.rate) for p in self.phases):
            raise ValueError("phase rates must be finite and >= 0")
        if not self.classes:
            raise ValueError("a workload needs at least one request class")
        if len({c.name for c in self.classes}) != len(self.classes):
            raise ValueError("class names must be unique")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"alpha must be > 0, got {self.alpha}")

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["standalone_s"] = dict(self.standalone_s) if self.standalone_s is not None else None
        return d


@dataclass(frozen=True)
class TraceRecord:
    """One request of a trace (a line of the trace file)."""

    request_id: str  # "r000042"
    arrival_s: float  # seconds from the start of the replay
    cls: str  # its RequestClass name
    kind: str  # "image" or "video"
    model: str  # model preset
    prompt: str  # text prompt
    width: int  # pixels
    height: int  # pixels
    num_frames: int | None  # video frames
    num_inference_steps: int  # denoising steps
    seed: int  # noise seed
    standalone_s: float  # estimated latency alone on one rank
    slo_s: float  # alpha * standalone_s: latency target
    deadline_s: float  # arrival_s + slo_s

    def to_request(self) -> Request:
        """The engine request this line stands for (arrival and deadline on the trace's clock)."""
        return Request(
            self.request_id, self.model, self.prompt, width=self.width, height=self.height,
            num_frames=self.num_frames, num_inference_steps=self.num_inference_steps, seed=self.seed,
            arrival_s=self.arrival_s, deadline_s=self.deadline_s,
        )  # fmt: skip


def default_classes(model: str) -> tuple[RequestClass, ...]:
    """S / M / L for `model` (weights 0.5 / 0.3 / 0.2): images at the smallest size, a middle one and
    the largest; video at the preset's largest size with few, middle and most frames."""
    p = get_preset(model)
    m = p.size_multiple
    lo = max(p.min_width, p.min_height)
    hi = min(p.max_width, p.max_height)
    mid = max(lo, (lo + hi) // 2 // m * m)
    steps = p.default_steps
    if not p.is_video:
        sizes = (lo, mid, hi)
        return tuple(
            RequestClass(name, s, s, None, steps, w)
            for name, s, w in zip("SML", sizes, (0.5, 0.3, 0.2), strict=True)
        )
    k_max = (p.max_frames - 1) // p.frame_step
    frames = (p.frame_step + 1, p.frame_step * max(1, k_max // 2) + 1, p.max_frames)
    side = mid
    return tuple(
        RequestClass(name, side, side, f, steps, w)
        for name, f, w in zip("SML", frames, (0.5, 0.3, 0.2), strict=True)
    )


def parse_class(text: str) -> RequestClass:
    """'NAME:size=WxH,steps=N,weight=W[,frames=F]' -> RequestClass, e.g. 'S:size=64x64,steps=4,weight=0.5'
    (weight defaults to 1)."""
    name, sep, rest = text.partition(":")
    if not sep:
        raise ValueError(f"class {text!r}: expected NAME:size=WxH,steps=N,weight=W[,frames=F]")
    fields: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key.strip() not in ("size", "steps", "weight", "frames"):
            raise ValueError(f"class {text!r}: unknown or malformed item {item!r}")
        fields[key.strip()] = value.strip()
    if "size" not in fields or "steps" not in fields:
        raise ValueError(f"class {text!r}: size and steps are required")
    size = re.fullmatch(r"([0-9]+)x([0-9]+)", fields["size"])
    if size is None:
        raise ValueError(f"class {text!r}: size must be WxH, got {fields['size']!r}")
    try:
        return RequestClass(
            name.strip(),
            int(size.group(1)),
            int(size.group(2)),
            int(fields["frames"]) if "frames" in fields else None,
            int(fields["steps"]),
            float(fields.get("weight", "1")),
        )
    except ValueError as e:
        raise ValueError(f"class {text!r}: {e}") from None


def parse_phases(text: str) -> tuple[Phase, ...]:
    """'RATE' (one phase) or 'START:RATE,START:RATE,...' (piecewise, the first START 0)."""
    text = text.strip()
    try:
        if ":" not in text:
            return (Phase(0.0, float(text)),)
        phases = []
        for item in filter(None, (s.strip() for s in text.split(","))):
            start, _, rate = item.partition(":")
            phases.append(Phase(float(start), float(rate)))
        return tuple(phases)
    except ValueError:
        raise ValueError(f"phases {text!r}: expected RATE or START:RATE,START:RATE,...") from None


def poisson_arrivals(phases: Sequence[Phase], duration_s: float, rng: random.Random) -> list[float]:
    """Arrival times in [0, duration_s) of a Poisson process whose rate is piecewise constant. Each
    phase draws exponential gaps at its own rate from its start (memorylessness makes the restart
    at a boundary exact)."""
    out: list[float] = []
    for i, phase in enumerate(phases):
        end = phases[i + 1].start_s if i + 1 < len(phases) else duration_s
        end = min(end, duration_s)
        if phase.rate <= 0 or phase.start_s >= end:
            continue
        t = phase.start_s
        while True:
            t += rng.expovariate(phase.rate)
            if t >= end:
                break
            out.append(t)
    return out


def _request(model: str, cls: RequestClass) -> Request:
    return Request(
        f"standalone-{cls.name}", model, "x", width=cls.width, height=cls.height,
        num_frames=cls.num_frames, num_inference_steps=cls.num_inference_steps, seed=0,
    )  # fmt: skip


def analytic_standalone(model: str, classes: Sequence[RequestClass], cost: CostModel | None = None) -> dict:
    """class name -> seconds of a request of that class alone on one rank (cost model estimate)."""
    cost = cost or AnalyticCostModel()
    return {c.name: cost.standalone_time(_request(model, c), sp_degree=1) for c in classes}


def generate(spec: WorkloadSpec) -> list[TraceRecord]:
    """The trace of `spec` (deterministic in spec.seed)."""
    p = get_preset(spec.model)
    for c in spec.classes:
        if (c.num_frames is not None) != p.is_video:
            what = "needs frames" if p.is_video else "is an image model: no frames"
            raise ValueError(f"class {c.name}: {spec.model} {what}")
    standalone = dict(spec.standalone_s) if spec.standalone_s is not None else None
    if standalone is None:
        standalone = analytic_standalone(spec.model, spec.classes)
    missing = [c.name for c in spec.classes if c.name not in standalone]
    if missing:
        raise ValueError(f"no standalone latency for classes {missing}")
    rng = random.Random(spec.seed)
    arrivals = poisson_arrivals(spec.phases, spec.duration_s, rng)
    weights = [c.weight for c in spec.classes]
    kind = "video" if p.is_video else "image"
    out = []
    for i, t in enumerate(arrivals):
        c = rng.choices(spec.classes, weights)[0]
        seed = rng.randrange(2**31)
        prompt = kPrompts[rng.randrange(len(kPrompts))]
        slo = spec.alpha * standalone[c.name]
        out.append(
            TraceRecord(
                request_id=f"r{i:06d}",
                arrival_s=round(t, 6),
                cls=c.name,
                kind=kind,
                model=spec.model,
                prompt=prompt,
                width=c.width,
                height=c.height,
                num_frames=c.num_frames,
                num_inference_steps=c.num_inference_steps,
                seed=seed,
                standalone_s=standalone[c.name],
                slo_s=slo,
                deadline_s=round(t, 6) + slo,
            )  # fmt: skip
        )
    return out


def write_trace(path: str, spec: WorkloadSpec, records: Sequence[TraceRecord]) -> None:
    counts: dict[str, int] = {}
    for r in records:
        counts[r.cls] = counts.get(r.cls, 0) + 1
    meta = {"spec": spec.to_json(), "num_requests": len(records), "per_class": counts}
    with open(path, "w") as f:
        f.write(json.dumps({"meta": meta}) + "\n")
        for r in records:
            f.write(json.dumps(dataclasses.asdict(r)) + "\n")


def read_trace(path: str) -> tuple[dict, list[TraceRecord]]:
    """(meta, records) of a trace file; ValueError naming the line if one is malformed."""
    meta: dict = {}
    records = []
    names = {f.name for f in dataclasses.fields(TraceRecord)}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON: {e}") from None
            if "meta" in obj:
                meta = obj["meta"]
                continue
            if set(obj) != names:
                raise ValueError(f"{path}:{n}: expected the fields {sorted(names)}, got {sorted(obj)}")
            records.append(TraceRecord(**obj))
    records.sort(key=lambda r: r.arrival_s)
    return meta, records
