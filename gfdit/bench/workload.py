"""Workloads for `gfdit bench`: request classes, (piecewise-)Poisson arrivals, deadlines, and the
JSON-lines trace file that `gfdit bench run` replays.

A trace is reproducible from its spec: one seeded random.Random draws, in order, every arrival gap,
then for each request its class, its seed and its prompt. Deadlines are relative to arrival:
`slo_s = alpha * standalone_s(class)`, where standalone_s is the request's latency alone on one rank,
from gfdit.cost.AnalyticCostModel or measured by calibration requests against a server
(`calibrate`).

Per class, a workload may set its own alpha, a priority and the preemptible flag (the named mixes of
gfdit.bench.mixes do); they travel in the trace and with each request to the server. Arrivals are
piecewise-Poisson (`phases`) or a two-state MMPP (`Mmpp`, bursts). `rate_for_load` derives the mean
rate from a target load rho = sum of standalone one-rank seconds / (world size * window).

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
    "Mmpp",
    "WorkloadSpec",
    "TraceRecord",
    "default_classes",
    "parse_class",
    "parse_phases",
    "poisson_arrivals",
    "mmpp_arrivals",
    "parse_mmpp",
    "rate_for_load",
    "offered_load",
    "analytic_standalone",
    "generate",
    "write_trace",
    "read_trace",
    "trace_classes",
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
    priority: int = 0  # sent with each request; larger is more important
    alpha: float | None = None  # this class's deadline factor; None: the workload's alpha
    preemptible: bool = False  # sent with each request: policies may pause or demote it

    def __post_init__(self) -> None:
        if not self.name or not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ValueError(f"class name must be letters, digits, _ . or -, got {self.name!r}")
        if self.width < 1 or self.height < 1 or self.num_inference_steps < 1:
            raise ValueError(f"class {self.name}: sizes and steps must be positive")
        if self.num_frames is not None and self.num_frames < 1:
            raise ValueError(f"class {self.name}: frames must be positive, got {self.num_frames}")
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise ValueError(f"class {self.name}: weight must be > 0, got {self.weight}")
        if self.alpha is not None and not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"class {self.name}: alpha must be > 0, got {self.alpha}")


@dataclass(frozen=True)
class Phase:
    """Poisson arrivals at `rate` requests/s from `start_s` until the next phase (or the end)."""

    start_s: float  # seconds from the start of the trace
    rate: float  # requests per second (0: none)


@dataclass(frozen=True)
class Mmpp:
    """A two-state Markov-modulated Poisson process (bursty arrivals): Poisson at `rate_low` in the low
    state and `rate_high` in the high state; each state lasts an exponential time of the given mean,
    then the process switches. It starts in the low state. Mean rate:
    (rate_low * mean_low_s + rate_high * mean_high_s) / (mean_low_s + mean_high_s)."""

    rate_low: float  # requests/s in the low state
    rate_high: float  # requests/s in the high state (the burst)
    mean_low_s: float  # mean seconds in the low state
    mean_high_s: float  # mean seconds in the high state

    def __post_init__(self) -> None:
        if not all(math.isfinite(x) and x >= 0 for x in (self.rate_low, self.rate_high)):
            raise ValueError(f"MMPP rates must be finite and >= 0, got {self.rate_low}, {self.rate_high}")
        if not all(math.isfinite(x) and x > 0 for x in (self.mean_low_s, self.mean_high_s)):
            raise ValueError("MMPP mean state durations must be > 0")
        if self.mean_rate <= 0:
            raise ValueError("MMPP needs a positive rate in at least one state")

    @property
    def mean_rate(self) -> float:
        """The long-run arrival rate, requests/s."""
        total = self.mean_low_s + self.mean_high_s
        return (self.rate_low * self.mean_low_s + self.rate_high * self.mean_high_s) / total

    def scaled(self, mean_rate: float) -> Mmpp:
        """The same burst shape with both rates scaled to the long-run rate `mean_rate`."""
        f = mean_rate / self.mean_rate
        return Mmpp(self.rate_low * f, self.rate_high * f, self.mean_low_s, self.mean_high_s)


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
    mmpp: Mmpp | None = None  # bursty arrivals instead of `phases` (which then only record the mean rate)
    mix: str | None = None  # the named mix the classes came from (gfdit.bench.mixes), if any
    target_load: float | None = None  # the load the rate was derived from (see `rate_for_load`), if any
    world_size: int | None = None  # the ranks that load refers to

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

    @property
    def mean_rate(self) -> float:
        """Expected arrivals per second over [0, duration_s)."""
        if self.mmpp is not None:
            return self.mmpp.mean_rate
        total = 0.0
        for i, p in enumerate(self.phases):
            end = min(
                self.phases[i + 1].start_s if i + 1 < len(self.phases) else self.duration_s, self.duration_s
            )
            total += p.rate * max(0.0, end - p.start_s)
        return total / self.duration_s

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["standalone_s"] = dict(self.standalone_s) if self.standalone_s is not None else None
        d["mean_rate"] = self.mean_rate
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
    priority: int = 0  # its class's priority (larger is more important)
    preemptible: bool = False  # its class may be paused or demoted at chunk boundaries

    def to_request(self) -> Request:
        """The engine request this line stands for (arrival and deadline on the trace's clock)."""
        return Request(
            self.request_id, self.model, self.prompt, width=self.width, height=self.height,
            num_frames=self.num_frames, num_inference_steps=self.num_inference_steps, seed=self.seed,
            arrival_s=self.arrival_s, deadline_s=self.deadline_s, priority=self.priority,
            preemptible=self.preemptible, slo_class=self.cls,
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


def mmpp_arrivals(mmpp: Mmpp, duration_s: float, rng: random.Random) -> list[float]:
    """Arrival times in [0, duration_s) of the two-state MMPP `mmpp`, starting in the low state. Each
    state's sojourn is drawn first, then its Poisson arrivals up to the switch (memorylessness makes
    the restart at a switch exact)."""
    out: list[float] = []
    t, high = 0.0, False
    while t < duration_s:
        end = min(duration_s, t + rng.expovariate(1.0 / (mmpp.mean_high_s if high else mmpp.mean_low_s)))
        rate = mmpp.rate_high if high else mmpp.rate_low
        a = t
        while rate > 0:
            a += rng.expovariate(rate)
            if a >= end:
                break
            out.append(a)
        t, high = end, not high
    return out


def parse_mmpp(text: str) -> Mmpp:
    """'RATE_LOW,RATE_HIGH,MEAN_LOW_S,MEAN_HIGH_S' -> Mmpp, e.g. '0.2,2,60,10'."""
    try:
        values = [float(x) for x in text.split(",")]
        if len(values) != 4:
            raise ValueError(text)
        return Mmpp(*values)
    except ValueError as e:
        raise ValueError(
            f"--mmpp {text!r}: expected RATE_LOW,RATE_HIGH,MEAN_LOW_S,MEAN_HIGH_S ({e})"
        ) from None


def rate_for_load(
    target_load: float, world_size: int, classes: Sequence[RequestClass], standalone_s: Mapping[str, float]
) -> float:
    """The mean arrival rate (requests/s) that offers `target_load` to `world_size` ranks.

    Load is rho = sum of the requests' standalone one-rank seconds / (world_size * window), so the
    rate is rho * world_size / E[standalone seconds of a request], the expectation over the class
    weights."""
    if not (target_load > 0 and math.isfinite(target_load)):
        raise ValueError(f"target load must be > 0, got {target_load}")
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    total = sum(c.weight for c in classes)
    work = sum(c.weight / total * standalone_s[c.name] for c in classes)
    if not work > 0:
        raise ValueError("the classes' standalone latencies must be > 0 to derive a rate from a load")
    return target_load * world_size / work


def offered_load(records: Sequence[TraceRecord], world_size: int, window_s: float) -> float:
    """The load a trace really offers: sum of its standalone seconds / (world_size * window_s)."""
    return sum(r.standalone_s for r in records) / (world_size * window_s)


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
    if spec.mmpp is not None:
        arrivals = mmpp_arrivals(spec.mmpp, spec.duration_s, rng)
    else:
        arrivals = poisson_arrivals(spec.phases, spec.duration_s, rng)
    weights = [c.weight for c in spec.classes]
    kind = "video" if p.is_video else "image"
    out = []
    for i, t in enumerate(arrivals):
        c = rng.choices(spec.classes, weights)[0]
        seed = rng.randrange(2**31)
        prompt = kPrompts[rng.randrange(len(kPrompts))]
        slo = (c.alpha if c.alpha is not None else spec.alpha) * standalone[c.name]
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
                priority=c.priority,
                preemptible=c.preemptible,
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


def trace_classes(meta: dict) -> tuple[RequestClass, ...]:
    """The request classes a trace's meta line names (what `gfdit bench gen` generated from)."""
    return tuple(
        RequestClass(
            c["name"], c["width"], c["height"], c["num_frames"], c["num_inference_steps"], c["weight"]
        )
        for c in meta.get("spec", {}).get("classes", [])
    )


def read_trace(path: str) -> tuple[dict, list[TraceRecord]]:
    """(meta, records) of a trace file; ValueError naming the line if one is malformed."""
    meta: dict = {}
    records = []
    fields = dataclasses.fields(TraceRecord)
    names = {f.name for f in fields}
    required = {f.name for f in fields if f.default is dataclasses.MISSING}
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
            if not required <= set(obj) <= names:  # traces written before priority/preemptible lack them
                raise ValueError(f"{path}:{n}: expected the fields {sorted(names)}, got {sorted(obj)}")
            records.append(TraceRecord(**obj))
    records.sort(key=lambda r: r.arrival_s)
    return meta, records
