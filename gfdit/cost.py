"""Cost models: how long a task takes on a group of a given sequence-parallel (SP) degree.

Note [Cost model]
~~~~~~~~~~~~~~~~~
The scheduler, the policies and the simulator ask a `CostModel` for estimates; workers report what
tasks really took and the scheduler feeds it back through `observe`. `AnalyticCostModel` is the default:

  step(d) = c0 + (a*N + b*N^2) / d + comm(d)          (seconds per denoising step, N tokens, degree d)
  comm(d) = 4 * layers * (lat0 + lat1*(d-1) + (N/d) * hidden * 2 B * (d-1)/d / bw)   d > 1, else 0

N is the self-attention sequence (latent patches, plus the text tokens for MMDiT models); c0 is the
per-step cost that does not shrink with more ranks (kernel launches, small ops); a*N is the linear
part (projections, MLPs), b*N^2 attention; comm is Ulysses' four all-to-alls per attention layer
(q, k, v in, output back) of bf16 activations, whose latency term grows with the degree.
The per-model c0, a, b of the full-size presets are fitted at import from the one-H100 per-step
measurements in `MEASURED_STEP_S` (DESIGN.md section 2): an exact 3x3 solve for flux-dev (3 sizes);
for Wan (2 sizes each) c0 is fixed to flux-dev's launch cost per transformer block times the block
count and a, b are solved exactly. The tiny presets, the stage costs (encode, VAE decode, finalize)
and the communication constants are assumptions, not measurements: the online correction fixes them.

The floor. A step cannot be faster than the host can issue it: an eager flux-dev step needs ~65 ms of
host time on an H200 however small the image (bench/results/2026-12-01-h200/step_speed), and sequence
parallelism divides the GPU work by d but not the host work, which grows by the SP processors'
collective calls (num_layers x collectives_per_layer gfcoll calls of host_per_collective_s each). So

  step(N, d) = max(host(d), gpu(N, d)),   gpu = the formula above,
  host(1) = host_step_s,   host(d > 1) = host_step_s + num_layers * collectives_per_layer * host_per_collective_s

(host_step_s = 0, the built-in profiles' default: no floor until one is measured). From DENOISE
measurements (profiled with `set_observed`, or observed online) the model learns, per model (`StepFit`):
  - the GPU scale s = min over measurements of t / gpu(N, d): t = max(F, s * gpu) >= s * gpu, with
    equality at every GPU-bound measurement, so the minimum is s once one measurement is GPU-bound;
  - the floors: a measurement above its GPU estimate (t > (1 + kFloorTolerance) s gpu) is host-bound,
    so t is the floor of its class (SP1, or SP > 1: per-rank host work does not depend on d);
    a class without a host-bound measurement takes the other class's floor -/+ the collective calls'
    host cost, capped by its own smallest measurement.
An unmeasured DENOISE key is then max(floor(d), s * gpu(N, d)): right for unprofiled sizes on both sides
of the host/GPU crossover, where one factor times the formula is not. The simulator uses the same model.

Online correction: `observe` keeps, per (kind, model, width, height, frames, degree), an exponential
moving average (EMA) of the observed seconds (per step for DENOISE) and, per (kind, model), an EMA of
observed / analytic. An estimate is the EMA for that exact key when there is one, else the analytic
estimate scaled by the per-model factor.

Note [Batched step cost]
~~~~~~~~~~~~~~~~~~~~~~~~
A batched step runs B requests of one model and shape through one forward (Note [Batched steps] in
gfdit/models/batch.py). What is paid once per forward and what per request:

  gpu(N, d, B) = c0 + B * (a*N + b*N^2) / d + comm(d, B)
  comm(d, B)   = 4 * layers * (lat0 + lat1*(d-1) + B * (N/d) * hidden * 2 B * (d-1)/d / bw)   d > 1
  step(N, d, B) = max(host(d), gpu(N, d, B))

c0 (launch-bound small ops) and the host floor are paid once per batched step (one forward issues the
same kernels whatever B); the compute and the all-to-all bytes grow with B; attention stays per
request (N^2 per row, not (B*N)^2), and the all-to-alls' latency is paid once. So small, host-bound
steps batch almost for free and large, compute-bound ones gain nothing: the analytic default.

The per-batch-size factor: batch_step_time = step_time(N, d) * factor(N, d, B), where
factor = estimate(N, d, B) / estimate(N, d, 1) with estimate the fitted model (max(floor(d), s * gpu)
once DENOISE measurements exist, Note [Cost model]) or the analytic one above, times a per-(model, B)
correction learned from profiled batched steps (`set_observed_batch`, from `gfdit profile
--batch-sizes`): the mean of measured / predicted over the profiled keys of that batch size. A profiled
key itself is estimated by its measurement, and `observe_batch` (a batched chunk the workers ran)
keeps an exponential moving average per exact key, as `observe` does. B = 1 is exactly step_time. The base CostModel, which knows
nothing of batching, charges B times a step (batching never pays): the safe side for deadlines.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from gfdit.request import Request
from gfdit.tasks import Task, TaskKind

__all__ = [
    "ModelProfile",
    "MODEL_PROFILES",
    "MEASURED_STEP_S",
    "register_model",
    "get_profile",
    "state_dim_size",
    "state_bytes_per_index",
    "valid_sp_degrees",
    "CostModel",
    "AnalyticCostModel",
    "StepFit",
    "kFloorTolerance",
]


@dataclass(frozen=True)
class ModelProfile:
    """Shape and cost constants of one model preset (what the scheduler needs, no weights)."""

    name: str  # preset name, e.g. "flux-dev"
    video: bool  # True for video models (Wan): requests may give num_frames
    num_heads: int  # attention heads; a Ulysses SP degree must divide it
    num_layers: int  # transformer blocks with one self-attention each
    hidden: int  # model width: bf16 elements per token in Ulysses' all-to-alls
    text_tokens: int  # text tokens joined into the self-attention sequence (MMDiT); 0: cross-attention
    vae_spatial: int = 8  # pixels per latent pixel along height and width
    vae_temporal: int = 4  # video: latent frames = (frames - 1) // vae_temporal + 1
    patch: int = 2  # latent pixels per token along height and width
    latent_channels: int = 16  # channels of the VAE latent
    step_fixed_s: float = 0.0  # c0: per-step seconds that do not shrink with the SP degree
    step_linear_s: float = 0.0  # a: seconds per token per step at degree 1
    step_quadratic_s: float = 0.0  # b: seconds per token^2 per step at degree 1 (attention)
    encode_s: float = 0.0  # ENCODE seconds (text encoders + initial noise), any size
    decode_s_per_mpx: float = 0.0  # DECODE seconds per million output pixels (all frames), one rank
    decode_serial_fraction: float = 0.1  # part of DECODE that does not shrink with more ranks
    finalize_s_per_mpx: float = 0.0  # FINALIZE seconds per million output pixels (image/video encode)
    host_step_s: float = 0.0  # host seconds to issue one step at SP1 (the floor; 0: unknown, no floor)
    collectives_per_layer: int = (
        3  # gfcoll calls per attention layer under SP (Ulysses: 2 all_to_all + 1 gather)
    )
    # Host seconds per gfcoll call: 19-32 us measured on an H200 for a one-member group (issue 12).
    host_per_collective_s: float = 25e-6

    def host_time(self, d: int) -> float:
        """host(d) of Note [Cost model] (0 when host_step_s is unknown)."""
        if self.host_step_s <= 0:
            return 0.0
        return self.host_step_s + (
            self.num_layers * self.collectives_per_layer * self.host_per_collective_s if d > 1 else 0.0
        )

    def latent_frames(self, frames: int | None) -> int:
        if frames is None or not self.video:
            return 1
        return (frames - 1) // self.vae_temporal + 1

    def image_tokens(self, width: int, height: int, frames: int | None) -> int:
        """Latent patches: the tokens of the state that SP shards (text tokens excluded)."""
        step = self.vae_spatial * self.patch
        return (height // step) * (width // step) * self.latent_frames(frames)

    def seq_len(self, width: int, height: int, frames: int | None) -> int:
        """The self-attention sequence length."""
        return self.image_tokens(width, height, frames) + self.text_tokens

    @property
    def state_bytes_per_token(self) -> int:
        """Bytes of the fp32 latent per token (the state carried between DENOISE chunks)."""
        return self.latent_channels * self.patch * self.patch * 4


# One H100, diffusers 0.42.1, torch 2.11, bf16 eager, random weights (DESIGN.md section 2):
# (width, height, frames) -> seconds per denoising step.
MEASURED_STEP_S: dict[str, dict[tuple[int, int, int | None], float]] = {
    "flux-dev": {(512, 512, None): 0.087, (1024, 1024, None): 0.185, (2048, 2048, None): 0.882},
    "wan2.1-1.3b": {(832, 480, 81): 0.653, (1280, 720, 81): 2.53},
    "wan2.1-14b": {(832, 480, 81): 3.40, (1280, 720, 81): 12.7},
}


def _solve(rows: list[list[float]], rhs: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting for a small dense system."""
    n = len(rows)
    aug = [list(r) + [y] for r, y in zip(rows, rhs, strict=True)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(aug[r][col]))
        aug[col], aug[piv] = aug[piv], aug[col]
        for r in range(n):
            if r != col:
                f = aug[r][col] / aug[col][col]
                aug[r] = [x - f * y for x, y in zip(aug[r], aug[col], strict=True)]
    return [aug[i][n] / aug[i][i] for i in range(n)]


def _fit_step(profile: ModelProfile, fixed_s: float | None = None) -> ModelProfile:
    """Fit c0, a, b of `profile` exactly through its MEASURED_STEP_S points (see Note [Cost model])."""
    points = [(profile.seq_len(w, h, f), t) for (w, h, f), t in MEASURED_STEP_S[profile.name].items()]
    if fixed_s is None:
        c0, a, b = _solve([[1.0, n, n * n] for n, _ in points], [t for _, t in points])
    else:
        c0 = fixed_s
        a, b = _solve([[n, n * n] for n, _ in points], [t - c0 for _, t in points])
    if min(c0, a, b) < 0:
        raise AssertionError(f"step fit of {profile.name} is not physical: c0={c0} a={a} b={b}")
    return replace(profile, step_fixed_s=c0, step_linear_s=a, step_quadratic_s=b)


def _builtin_profiles() -> dict[str, ModelProfile]:
    # Stage constants are assumptions (not measured): T5-XXL-class text encoding ~30 ms on an H100;
    # Flux VAE decode ~0.1 s per megapixel; Wan's 3D VAE ~0.15 s per megapixel-frame; PNG/MP4 encode
    # ~50 megapixels/s on one CPU core.
    flux = _fit_step(
        ModelProfile(
            "flux-dev", video=False, num_heads=24, num_layers=57, hidden=3072, text_tokens=512,
            encode_s=0.03, decode_s_per_mpx=0.1, finalize_s_per_mpx=0.02,
        )
    )  # fmt: skip
    launch_per_layer = flux.step_fixed_s / flux.num_layers

    def wan(name: str, heads: int, layers: int, hidden: int) -> ModelProfile:
        base = ModelProfile(
            name, video=True, num_heads=heads, num_layers=layers, hidden=hidden, text_tokens=0,
            encode_s=0.03, decode_s_per_mpx=0.15, finalize_s_per_mpx=0.02,
        )  # fmt: skip
        return _fit_step(base, fixed_s=launch_per_layer * layers)

    # Tiny presets run on CPU; their constants are rough guesses for a few-millisecond step.
    tiny_flux = ModelProfile(
        "tiny-flux", video=False, num_heads=4, num_layers=4, hidden=256, text_tokens=64,
        step_fixed_s=0.005, step_linear_s=4e-5, step_quadratic_s=1e-8,
        encode_s=0.005, decode_s_per_mpx=0.5, finalize_s_per_mpx=0.05,
    )  # fmt: skip
    tiny_wan = ModelProfile(
        "tiny-wan", video=True, num_heads=4, num_layers=2, hidden=128, text_tokens=0,
        step_fixed_s=0.005, step_linear_s=3e-5, step_quadratic_s=1e-8,
        encode_s=0.005, decode_s_per_mpx=0.5, finalize_s_per_mpx=0.05,
    )  # fmt: skip
    # Qwen-Image (MMDiT, 60 double-stream blocks of width 3072): flux-dev's per-token constants scaled by
    # the block count (an assumption until profiled); its text tokens vary per prompt, 128 taken as typical.
    # True CFG runs the transformer twice per step: the step constants cover both passes.
    qwen_layers = 60

    def scaled(v: float) -> float:
        return 2 * v * qwen_layers / flux.num_layers

    qwen = ModelProfile(
        "qwen-image", video=False, num_heads=24, num_layers=qwen_layers, hidden=3072, text_tokens=128,
        step_fixed_s=scaled(flux.step_fixed_s), step_linear_s=scaled(flux.step_linear_s),
        step_quadratic_s=scaled(flux.step_quadratic_s),
        encode_s=0.05, decode_s_per_mpx=0.1, finalize_s_per_mpx=0.02,
    )  # fmt: skip
    tiny_qwen = replace(tiny_flux, name="tiny-qwen-image", num_layers=2, hidden=64, text_tokens=16)
    wan_13 = wan("wan2.1-1.3b", heads=12, layers=30, hidden=1536)
    wan_14 = wan("wan2.1-14b", heads=40, layers=40, hidden=5120)
    # Wan2.2: A14B runs one 14B expert per step, each Wan2.1-14B's architecture: its step costs. TI2V-5B
    # (an assumption until profiled): Wan2.1-1.3B's per-token constants scaled by the parameter ratio
    # (5.0 / 1.42 B) for the linear part and the head ratio (24 / 12) for attention; its 16x VAE gives
    # 48-channel latents, a quarter of the tokens per pixel.
    a14b = replace(wan_14, name="wan2.2-t2v-a14b")
    ti2v = replace(
        wan_13, name="wan2.2-ti2v-5b", num_heads=24, hidden=3072, vae_spatial=16, latent_channels=48,
        step_linear_s=wan_13.step_linear_s * 5.0 / 1.42, step_quadratic_s=wan_13.step_quadratic_s * 2,
    )  # fmt: skip
    tiny_wan22 = replace(tiny_wan, name="tiny-wan2.2")
    tiny_ti2v = replace(tiny_wan, name="tiny-wan2.2-ti2v", vae_spatial=16, latent_channels=48)
    profiles = [tiny_flux, tiny_wan, tiny_qwen, tiny_wan22, tiny_ti2v, flux, wan_13, wan_14, qwen, a14b, ti2v]
    return {p.name: p for p in profiles}


MODEL_PROFILES: dict[str, ModelProfile] = _builtin_profiles()


def register_model(profile: ModelProfile) -> None:
    """Add or replace a model profile (e.g. from `gfdit profile` or a model loaded from disk)."""
    MODEL_PROFILES[profile.name] = profile


def get_profile(model: str) -> ModelProfile:
    """The profile of `model`; ValueError naming the known presets if there is none."""
    try:
        return MODEL_PROFILES[model]
    except KeyError:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(sorted(MODEL_PROFILES))}") from None


def state_dim_size(request: Request) -> int:
    """Size of the split dimension of the request's state: its latent tokens."""
    return get_profile(request.model).image_tokens(request.width, request.height, request.num_frames)


def state_bytes_per_index(request: Request, kind: TaskKind) -> float:
    """Bytes per index of the split dimension of the state a task of `kind` starts from: the fp32
    latent before DECODE; for FINALIZE the decoded uint8 RGB pixels (spread over the same indices)."""
    profile = get_profile(request.model)
    if kind is TaskKind.FINALIZE:
        return 3 * request.num_pixels / max(1, state_dim_size(request))
    return float(profile.state_bytes_per_token)


def valid_sp_degrees(request: Request, max_degree: int) -> tuple[int, ...]:
    """SP degrees in [1, max_degree] that divide the heads, the latent tokens and the text tokens."""
    p = get_profile(request.model)
    tokens = p.image_tokens(request.width, request.height, request.num_frames)
    return tuple(
        d
        for d in range(1, max_degree + 1)
        if p.num_heads % d == 0 and tokens % d == 0 and p.text_tokens % d == 0
    )


class CostModel(abc.ABC):
    """Estimates of task durations in seconds. Implementations must be pure Python and cheap: policies
    call them many times per scheduling decision. `frames` is None for images."""

    @abc.abstractmethod
    def step_time(self, model: str, width: int, height: int, frames: int | None, sp_degree: int) -> float:
        """Seconds of one denoising step on a group of `sp_degree` ranks."""

    @abc.abstractmethod
    def stage_time(
        self, kind: TaskKind, model: str, width: int, height: int, frames: int | None, sp_degree: int
    ) -> float:
        """Seconds of an ENCODE, DECODE or FINALIZE task on `sp_degree` ranks (DENOISE: one step)."""

    @abc.abstractmethod
    def reshard_time(self, num_bytes: int) -> float:
        """Seconds to move `num_bytes` of state between ranks (0 for 0 bytes)."""

    @abc.abstractmethod
    def observe(
        self,
        kind: TaskKind,
        model: str,
        width: int,
        height: int,
        frames: int | None,
        sp_degree: int,
        seconds: float,
        num_steps: int = 1,
    ) -> None:
        """Learn from a measured task: `seconds` for the whole task, `num_steps` steps if DENOISE."""

    # Derived estimates, written once against the abstract methods.

    def task_time(self, task: Task, request: Request, sp_degree: int, num_steps: int | None = None) -> float:
        """Seconds of `task` (DENOISE: `num_steps` steps, default the task's own) on `sp_degree` ranks."""
        r = request
        if task.kind is TaskKind.DENOISE:
            steps = task.num_steps if num_steps is None else num_steps
            return steps * self.step_time(r.model, r.width, r.height, r.num_frames, sp_degree)
        return self.stage_time(task.kind, r.model, r.width, r.height, r.num_frames, sp_degree)

    def remaining_time(
        self, request: Request, head: Task, sp_degree: int, remaining_steps: int, stage_degree: int = 1
    ) -> float:
        """Seconds from `head` to the end of the trajectory with DENOISE at `sp_degree` and the other
        stages at `stage_degree`; `remaining_steps` denoising steps are still to run."""
        r = request
        order = [TaskKind.ENCODE, TaskKind.DENOISE, TaskKind.DECODE, TaskKind.FINALIZE]
        total = 0.0
        for kind in order[order.index(head.kind) :]:
            if kind is TaskKind.DENOISE:
                total += remaining_steps * self.step_time(r.model, r.width, r.height, r.num_frames, sp_degree)
            else:
                total += self.stage_time(kind, r.model, r.width, r.height, r.num_frames, stage_degree)
        return total

    def standalone_time(self, request: Request, sp_degree: int = 1) -> float:
        """Seconds of the whole request alone on `sp_degree` ranks (stages on one rank)."""
        head = Task(request.request_id, TaskKind.ENCODE)
        return self.remaining_time(request, head, sp_degree, request.num_inference_steps)

    # Batched steps (Note [Batched step cost]).

    def batch_step_time(
        self, model: str, width: int, height: int, frames: int | None, sp_degree: int, batch: int
    ) -> float:
        """Seconds of one denoising step of `batch` requests of this shape together on `sp_degree`
        ranks. This default knows nothing of batching: `batch` separate steps."""
        _check_batch(batch)
        return batch * self.step_time(model, width, height, frames, sp_degree)

    def observe_batch(
        self,
        model: str,
        width: int,
        height: int,
        frames: int | None,
        sp_degree: int,
        batch: int,
        seconds: float,
        num_steps: int = 1,
    ) -> None:
        """Learn from a measured batched chunk: `seconds` for `num_steps` steps of `batch` requests
        together throughout (members that all ran the same steps). This default ignores it."""
        _check_batch(batch)

    def batch_chunk_time(
        self, model: str, width: int, height: int, frames: int | None, sp_degree: int, steps: Sequence[int]
    ) -> float:
        """Seconds of a batched DENOISE chunk whose member k runs steps[k] steps (Note [Batched steps]:
        the batch runs in lockstep and shrinks as members finish, so step j is a batched step of the
        members with steps[k] > j)."""
        if not steps or any(not isinstance(n, int) or n < 0 for n in steps):
            raise ValueError(f"steps must be a non-empty list of integers >= 0, got {list(steps)!r}")
        total, done = 0.0, 0
        for j, n in enumerate(sorted(steps)):
            batch = len(steps) - j  # members still running over steps [done, n)
            if n > done:
                total += (n - done) * self.batch_step_time(model, width, height, frames, sp_degree, batch)
                done = n
        return total


_Key = tuple[TaskKind, str, int, int, "int | None", int]


def _check_batch(batch: int) -> None:
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")


# A measurement more than this above its GPU estimate is host-bound (Note [Cost model]: the floor).
kFloorTolerance = 0.1


@dataclass(frozen=True)
class StepFit:
    """What the cost model learned of one model's steps from DENOISE measurements (Note [Cost model])."""

    gpu_scale: float  # s: measured / analytic GPU time of the GPU-bound steps
    floor_sp1: float | None  # host floor of an SP1 step (seconds), None if unknown
    floor_sp: float | None  # host floor of an SP > 1 step, None if unknown
    num_points: int  # measurements the fit used

    def floor(self, d: int) -> float:
        f = self.floor_sp1 if d == 1 else self.floor_sp
        return 0.0 if f is None else f


class AnalyticCostModel(CostModel):
    """The analytic model of Note [Cost model], corrected online by `observe`.

    Communication constants are assumptions (not measured): an all-to-all over d ranks costs
    `a2a_latency_s + a2a_latency_per_peer_s * (d - 1)` plus its bytes at `a2a_bandwidth` bytes/s per
    rank (Ulysses); a reshard costs `p2p_latency_s` plus its bytes at `p2p_bandwidth`.
    `ema` is the weight of a new observation.
    """

    def __init__(
        self,
        profiles: dict[str, ModelProfile] | None = None,
        *,
        ema: float = 0.3,
        a2a_latency_s: float = 20e-6,
        a2a_latency_per_peer_s: float = 5e-6,
        a2a_bandwidth: float = 150e9,
        p2p_latency_s: float = 20e-6,
        p2p_bandwidth: float = 100e9,
    ) -> None:
        if not 0.0 < ema <= 1.0:
            raise ValueError(f"ema must be in (0, 1], got {ema}")
        self._profiles = profiles
        self.ema = ema
        self.a2a_latency_s = a2a_latency_s
        self.a2a_latency_per_peer_s = a2a_latency_per_peer_s
        self.a2a_bandwidth = a2a_bandwidth
        self.p2p_latency_s = p2p_latency_s
        self.p2p_bandwidth = p2p_bandwidth
        self._observed: dict[_Key, float] = {}
        self._factor: dict[tuple[TaskKind, str], float] = {}
        self._profiled: dict[tuple[TaskKind, str], tuple[int, float]] = {}  # count, sum of ratios
        self._fits: dict[str, StepFit] = {}  # model -> fit of its DENOISE measurements (Note [Cost model])
        # Note [Batched step cost]: profiled batched steps, (model, w, h, frames, d, batch) -> seconds,
        # and per (model, batch) the count and sum of measured / predicted.
        self._batch_observed: dict[tuple[str, int, int, int | None, int, int], float] = {}
        self._batch_corr: dict[tuple[str, int], tuple[int, float]] = {}

    def profile(self, model: str) -> ModelProfile:
        if self._profiles is not None:
            if model not in self._profiles:
                raise ValueError(f"unknown model {model!r}; known: {', '.join(sorted(self._profiles))}")
            return self._profiles[model]
        return get_profile(model)

    @staticmethod
    def _check_degree(sp_degree: int) -> None:
        if not isinstance(sp_degree, int) or sp_degree < 1:
            raise ValueError(f"sp_degree must be a positive integer, got {sp_degree!r}")

    def analytic_step_time(self, model: str, width: int, height: int, frames: int | None, d: int) -> float:
        """The uncorrected formula of Note [Cost model]: max(host(d), gpu(N, d))."""
        return max(self.profile(model).host_time(d), self.analytic_gpu_time(model, width, height, frames, d))

    def analytic_gpu_time(self, model: str, width: int, height: int, frames: int | None, d: int) -> float:
        """gpu(N, d) of Note [Cost model]: compute, plus Ulysses' all-to-alls for d > 1."""
        self._check_degree(d)
        p = self.profile(model)
        n = p.seq_len(width, height, frames)
        compute = p.step_fixed_s + (p.step_linear_s * n + p.step_quadratic_s * n * n) / d
        if d == 1:
            return compute
        a2a_bytes = (n / d) * p.hidden * 2 * (d - 1) / d
        latency = self.a2a_latency_s + self.a2a_latency_per_peer_s * (d - 1)
        comm = 4 * p.num_layers * (latency + a2a_bytes / self.a2a_bandwidth)
        return compute + comm

    def step_fit(self, model: str) -> StepFit | None:
        """The fit of `model`'s DENOISE measurements, or None before any (Note [Cost model])."""
        return self._fits.get(model)

    def _refit(self, model: str) -> None:
        p = self.profile(model)
        points = []  # (degree, seconds per step, analytic gpu seconds)
        for (kind, m, w, h, f, d), t in self._observed.items():
            if kind is TaskKind.DENOISE and m == model:
                g = self.analytic_gpu_time(m, w, h, f, d)
                if g > 0:
                    points.append((d, t, g))
        if not points:
            self._fits.pop(model, None)
            return
        scale = min(t / g for _, t, g in points)
        host_bound: dict[bool, list[float]] = {False: [], True: []}  # key: SP > 1
        smallest: dict[bool, float] = {}
        for d, t, g in points:
            sp = d > 1
            smallest[sp] = min(smallest.get(sp, math.inf), t)
            if t > (1 + kFloorTolerance) * scale * g:
                host_bound[sp].append(t)
        floors = {sp: (sum(ts) / len(ts) if ts else None) for sp, ts in host_bound.items()}
        calls = p.num_layers * p.collectives_per_layer * p.host_per_collective_s
        if floors[True] is None and floors[False] is not None:
            floors[True] = min(floors[False] + calls, smallest.get(True, math.inf))
        if floors[False] is None and floors[True] is not None:
            floors[False] = min(max(0.0, floors[True] - calls), smallest.get(False, math.inf))
        self._fits[model] = StepFit(scale, floors[False], floors[True], len(points))

    def _fitted_step_time(
        self, fit: StepFit, model: str, width: int, height: int, frames: int | None, d: int
    ) -> float:
        return max(fit.floor(d), fit.gpu_scale * self.analytic_gpu_time(model, width, height, frames, d))

    def analytic_stage_time(
        self, kind: TaskKind, model: str, width: int, height: int, frames: int | None, d: int
    ) -> float:
        self._check_degree(d)
        if kind is TaskKind.DENOISE:
            return self.analytic_step_time(model, width, height, frames, d)
        p = self.profile(model)
        mpx = width * height * (frames or 1) / 1e6
        if kind is TaskKind.ENCODE:
            return p.encode_s
        if kind is TaskKind.DECODE:
            serial = p.decode_serial_fraction
            return p.decode_s_per_mpx * mpx * (serial + (1.0 - serial) / d)
        return p.finalize_s_per_mpx * mpx

    def _estimate(
        self, kind: TaskKind, model: str, width: int, height: int, frames: int | None, d: int
    ) -> float:
        seen = self._observed.get((kind, model, width, height, frames, d))
        if seen is not None:
            return seen
        if kind is TaskKind.DENOISE:
            fit = self._fits.get(model)
            if fit is not None:
                return self._fitted_step_time(fit, model, width, height, frames, d)
        analytic = self.analytic_stage_time(kind, model, width, height, frames, d)
        return analytic * self._factor.get((kind, model), 1.0)

    def step_time(self, model: str, width: int, height: int, frames: int | None, sp_degree: int) -> float:
        return self._estimate(TaskKind.DENOISE, model, width, height, frames, sp_degree)

    def stage_time(
        self, kind: TaskKind, model: str, width: int, height: int, frames: int | None, sp_degree: int
    ) -> float:
        return self._estimate(kind, model, width, height, frames, sp_degree)

    def reshard_time(self, num_bytes: int) -> float:
        if num_bytes < 0:
            raise ValueError(f"num_bytes must be >= 0, got {num_bytes}")
        return 0.0 if num_bytes == 0 else self.p2p_latency_s + num_bytes / self.p2p_bandwidth

    def observe(
        self,
        kind: TaskKind,
        model: str,
        width: int,
        height: int,
        frames: int | None,
        sp_degree: int,
        seconds: float,
        num_steps: int = 1,
    ) -> None:
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"observed seconds must be finite and >= 0, got {seconds}")
        if kind is TaskKind.DENOISE:
            if num_steps < 1:
                raise ValueError(f"a DENOISE observation needs num_steps >= 1, got {num_steps}")
            seconds = seconds / num_steps
        key = (kind, model, width, height, frames, sp_degree)
        old = self._observed.get(key)
        self._observed[key] = seconds if old is None else (1 - self.ema) * old + self.ema * seconds
        if kind is TaskKind.DENOISE:
            self._refit(model)
        analytic = self.analytic_stage_time(kind, model, width, height, frames, sp_degree)
        if analytic > 0:
            ratio = seconds / analytic
            fkey = (kind, model)
            f = self._factor.get(fkey)
            self._factor[fkey] = ratio if f is None else (1 - self.ema) * f + self.ema * ratio

    def set_observed(
        self,
        kind: TaskKind,
        model: str,
        width: int,
        height: int,
        frames: int | None,
        sp_degree: int,
        seconds: float,
    ) -> None:
        """Take `seconds` (per step for DENOISE) as the estimate of exactly this key: a profiled
        measurement (gfdit.profile). Its measured/analytic ratio joins the running mean that is the
        kind's factor for keys not measured. Online observations (`observe`) refine both later."""
        self._check_degree(sp_degree)
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"profiled seconds must be finite and >= 0, got {seconds}")
        self._observed[(kind, model, width, height, frames, sp_degree)] = seconds
        if kind is TaskKind.DENOISE:
            self._refit(model)
        analytic = self.analytic_stage_time(kind, model, width, height, frames, sp_degree)
        if analytic > 0:
            fkey = (kind, model)
            n, total = self._profiled.get(fkey, (0, 0.0))
            self._profiled[fkey] = (n + 1, total + seconds / analytic)
            self._factor[fkey] = (total + seconds / analytic) / (n + 1)

    def factor(self, kind: TaskKind, model: str) -> float:
        """The learned observed/analytic factor of (kind, model) (1.0 before any observation)."""
        return self._factor.get((kind, model), 1.0)

    # -- batched steps (Note [Batched step cost]) -------------------------------------------------------

    def analytic_batch_gpu_time(
        self, model: str, width: int, height: int, frames: int | None, d: int, batch: int
    ) -> float:
        """gpu(N, d, B) of Note [Batched step cost]; batch 1 is analytic_gpu_time."""
        self._check_degree(d)
        _check_batch(batch)
        p = self.profile(model)
        n = p.seq_len(width, height, frames)
        compute = p.step_fixed_s + batch * (p.step_linear_s * n + p.step_quadratic_s * n * n) / d
        if d == 1:
            return compute
        a2a_bytes = batch * (n / d) * p.hidden * 2 * (d - 1) / d
        latency = self.a2a_latency_s + self.a2a_latency_per_peer_s * (d - 1)
        return compute + 4 * p.num_layers * (latency + a2a_bytes / self.a2a_bandwidth)

    def _batch_model_time(
        self, model: str, width: int, height: int, frames: int | None, d: int, batch: int
    ) -> float:
        gpu = self.analytic_batch_gpu_time(model, width, height, frames, d, batch)
        fit = self._fits.get(model)
        if fit is not None:
            return max(fit.floor(d), fit.gpu_scale * gpu)
        return max(self.profile(model).host_time(d), gpu)

    def analytic_batch_factor(
        self, model: str, width: int, height: int, frames: int | None, d: int, batch: int
    ) -> float:
        """estimate(N, d, B) / estimate(N, d, 1) of the fitted (else analytic) model, uncorrected."""
        one = self._batch_model_time(model, width, height, frames, d, 1)
        if one <= 0:
            return float(batch)
        return self._batch_model_time(model, width, height, frames, d, batch) / one

    def batch_correction(self, model: str, batch: int) -> float:
        """The learned measured / predicted ratio of `model`'s batched steps of size `batch` (1.0 before
        any profiled batched step of that size)."""
        n, total = self._batch_corr.get((model, batch), (0, 0.0))
        return total / n if n else 1.0

    def batch_factor(
        self, model: str, width: int, height: int, frames: int | None, d: int, batch: int
    ) -> float:
        """batch_step_time / step_time for this key (Note [Batched step cost])."""
        _check_batch(batch)
        if batch == 1:
            return 1.0
        factor = self.analytic_batch_factor(model, width, height, frames, d, batch)
        return factor * self.batch_correction(model, batch)

    def batch_step_time(
        self, model: str, width: int, height: int, frames: int | None, sp_degree: int, batch: int
    ) -> float:
        self._check_degree(sp_degree)
        _check_batch(batch)
        if batch == 1:
            return self.step_time(model, width, height, frames, sp_degree)
        seen = self._batch_observed.get((model, width, height, frames, sp_degree, batch))
        if seen is not None:
            return seen
        step = self.step_time(model, width, height, frames, sp_degree)
        return step * self.batch_factor(model, width, height, frames, sp_degree, batch)

    def set_observed_batch(
        self,
        model: str,
        width: int,
        height: int,
        frames: int | None,
        sp_degree: int,
        batch: int,
        seconds: float,
    ) -> None:
        """Take `seconds` per batched step of `batch` requests as the estimate of exactly this key (a
        profiled measurement, gfdit.profile --batch-sizes); its measured / predicted ratio joins the
        (model, batch) correction for unmeasured keys. Load the batch-1 measurements first: the
        prediction is step_time x the analytic batch factor. Batch 1 is set_observed(DENOISE, ...)."""
        self._check_degree(sp_degree)
        _check_batch(batch)
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"profiled seconds must be finite and >= 0, got {seconds}")
        if batch == 1:
            self.set_observed(TaskKind.DENOISE, model, width, height, frames, sp_degree, seconds)
            return
        self._batch_observed[(model, width, height, frames, sp_degree, batch)] = seconds
        step = self.step_time(model, width, height, frames, sp_degree)
        predicted = step * self.analytic_batch_factor(model, width, height, frames, sp_degree, batch)
        if predicted > 0:
            n, total = self._batch_corr.get((model, batch), (0, 0.0))
            self._batch_corr[(model, batch)] = (n + 1, total + seconds / predicted)

    def observe_batch(
        self,
        model: str,
        width: int,
        height: int,
        frames: int | None,
        sp_degree: int,
        batch: int,
        seconds: float,
        num_steps: int = 1,
    ) -> None:
        """An exponential moving average per exact batched key, like `observe` (batch 1 is observe)."""
        self._check_degree(sp_degree)
        _check_batch(batch)
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"observed seconds must be finite and >= 0, got {seconds}")
        if num_steps < 1:
            raise ValueError(f"a batched observation needs num_steps >= 1, got {num_steps}")
        if batch == 1:
            self.observe(TaskKind.DENOISE, model, width, height, frames, sp_degree, seconds, num_steps)
            return
        key = (model, width, height, frames, sp_degree, batch)
        per_step = seconds / num_steps
        old = self._batch_observed.get(key)
        self._batch_observed[key] = per_step if old is None else (1 - self.ema) * old + self.ema * per_step
