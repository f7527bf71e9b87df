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
count and a, b are solved exactly. The tiny presets, the stage costs (encode, VAE decode)
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

Graph-replayed steps (`graph_steps=True`; the Engine sets it when its steps replay from CUDA graphs,
Note [Step graphs]): c0 is the eager launch cost, which a step replayed as one graph does not pay, so
c0 = 0. On one H100 compiled + graph flux-dev steps took 23.3 / 40.2 / 130.1 ms at 256² / 512² /
1024² (bench/results/2026-12-06-h100-s8/numerics) where the formula without c0 gives 17.8 / 37.6 /
135.6 ms, and batched steps saved at most 11.2 % per member (Note [Choosing batches]) where the
eager c0 promised 27 % (1024²) to 57 % (512²): without c0 a batch of B costs B steps and is never formed unless
measured batched steps (`gfdit profile --batch-sizes`) say otherwise.

Online correction: `observe` keeps, per (kind, model, width, height, frames, degree), an exponential
moving average (EMA) of the observed seconds (per step for DENOISE) and, per (kind, model), an EMA of
observed / analytic. An estimate is the EMA for that exact key when there is one, else the analytic
estimate scaled by the per-model factor.
DECODE runs on one rank (the group's first member gathers the latent and decodes), so its estimate
does not shrink with the degree.

Note [One model registry]
~~~~~~~~~~~~~~~~~~~~~~~~~
gfdit.models.presets is the one registry of models. A ModelProfile here holds only cost constants
and its preset; heads, blocks, width, text tokens, the latent tokens S (`ModelPreset.seq_len`) and
the valid SP degrees (`ModelPreset.valid_sp_degrees`: d divides S and the heads) are the preset's,
read by the models (gfdit.models.base), the scheduler and this module alike. N, the self-attention
length of the formula above, is S plus the text tokens joined into it (`attention_len`). A preset
without built-in cost constants gets its family's, scaled by blocks x width^2 (`get_profile`).

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

Note [CFG-parallel step cost]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A step of a request with true CFG computes two predictions (Wan: a batch of 2; Qwen-Image: two
passes), and step_time(N, d) (profiled or fitted on such steps) is the cost of both. CFG-parallel on
2k ranks (Note [CFG-parallel] in gfdit/models/base.py) runs one prediction per half of k ranks, then
each pair all-gathers its predictions:

  cfg_step(N, k) = step_time(N, k) * branch(N, k) + exchange(k)
  branch(N, k)   = estimate(N, k, 1/2) / estimate(N, k, 1)     (the batched form with B = 1/2: half the
                   compute and all-to-all bytes; c0 and the host floor paid in full)
  exchange(k)    = a2a_latency_s + (S/k) * token_dim * 4 B / a2a_bandwidth

with estimate the fitted model (max(floor, s * gpu)) or the analytic one, times a per-model
correction: the mean measured / predicted ratio of the profiled CFG-parallel steps (`gfdit profile
--cfg`, `set_observed_cfg`), whose own keys are estimated by their measurement. A CFG-parallel chunk
the workers ran (`observe_cfg`) keeps an exponential moving average per exact key, which then is the
estimate. The base CostModel charges step_time(N, k): CFG-parallel never pays there, so a policy with
cfg=auto keeps plain SP.
"""

from __future__ import annotations

import abc
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from gfdit.models.presets import ModelPreset, get_preset
from gfdit.request import Request
from gfdit.tasks import Task, TaskKind

__all__ = [
    "ModelProfile",
    "MODEL_PROFILES",
    "MEASURED_STEP_S",
    "register_model",
    "get_profile",
    "derive_profile",
    "state_dim_size",
    "state_bytes_per_index",
    "valid_sp_degrees",
    "CostModel",
    "AnalyticCostModel",
    "StepFit",
    "kFloorTolerance",
    "kProfileFormat",
    "read_profile",
    "apply_profile",
]


@dataclass(frozen=True)
class ModelProfile:
    """Cost constants of one model preset. Its shapes (heads, blocks, width, text tokens, latent
    tokens, valid degrees) are the preset's own (Note [One model registry])."""

    preset: ModelPreset  # the model: every shape comes from here
    step_fixed_s: float = 0.0  # c0: per-step seconds that do not shrink with the SP degree
    step_linear_s: float = 0.0  # a: seconds per token per step at degree 1
    step_quadratic_s: float = 0.0  # b: seconds per token^2 per step at degree 1 (attention)
    encode_s: float = 0.0  # ENCODE seconds (text encoders + initial noise), any size
    decode_s_per_mpx: float = 0.0  # DECODE seconds per million output pixels (all frames), on one rank
    host_step_s: float = 0.0  # host seconds to issue one step at SP1 (the floor; 0: unknown, no floor)
    collectives_per_layer: int = (
        3  # gfcoll calls per attention layer under SP (Ulysses: 2 all_to_all + 1 gather)
    )
    # Host seconds per gfcoll call: 19-32 us measured on an H200 for a one-member group (issue 12).
    host_per_collective_s: float = 25e-6

    # -- shapes, from the preset -------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.preset.name

    @property
    def video(self) -> bool:
        """True for video models: requests may give num_frames."""
        return self.preset.is_video

    @property
    def num_heads(self) -> int:
        return self.preset.num_heads

    @property
    def num_layers(self) -> int:
        """Transformer blocks with one self-attention each."""
        return self.preset.num_blocks

    @property
    def hidden(self) -> int:
        return self.preset.hidden

    @property
    def text_tokens(self) -> int:
        return self.preset.text_tokens

    def host_time(self, d: int) -> float:
        """host(d) of Note [Cost model] (0 when host_step_s is unknown)."""
        if self.host_step_s <= 0:
            return 0.0
        return self.host_step_s + (
            self.num_layers * self.collectives_per_layer * self.host_per_collective_s if d > 1 else 0.0
        )

    def seq_len(self, width: int, height: int, frames: int | None) -> int:
        """S: the latent tokens, which SP shards (ModelPreset.seq_len, the one definition)."""
        return self.preset.seq_len(width, height, frames)

    def attention_len(self, width: int, height: int, frames: int | None) -> int:
        """N of Note [Cost model]: the self-attention sequence, S plus the joined text tokens."""
        return self.seq_len(width, height, frames) + self.text_tokens

    @property
    def state_bytes_per_token(self) -> int:
        """Bytes of the fp32 latent per token (the state carried between DENOISE chunks)."""
        return self.preset.token_dim * 4


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
    points = [(profile.attention_len(w, h, f), t) for (w, h, f), t in MEASURED_STEP_S[profile.name].items()]
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
    flux = _fit_step(ModelProfile(get_preset("flux-dev"), encode_s=0.03, decode_s_per_mpx=0.1))
    launch_per_layer = flux.step_fixed_s / flux.num_layers

    def wan(name: str) -> ModelProfile:
        base = ModelProfile(get_preset(name), encode_s=0.03, decode_s_per_mpx=0.15)
        return _fit_step(base, fixed_s=launch_per_layer * base.num_layers)

    # Tiny presets run on CPU; their constants are rough guesses for a few-millisecond step.
    tiny = dict(step_fixed_s=0.005, encode_s=0.005, decode_s_per_mpx=0.5)
    tiny_flux = ModelProfile(get_preset("tiny-flux"), step_linear_s=4e-5, step_quadratic_s=1e-8, **tiny)
    tiny_wan = ModelProfile(get_preset("tiny-wan"), step_linear_s=3e-5, step_quadratic_s=1e-8, **tiny)
    # Qwen-Image (MMDiT, 60 double-stream blocks of width 3072): flux-dev's per-token constants scaled by
    # the block count (an assumption until profiled). True CFG runs the transformer twice per step: the
    # step constants cover both passes.
    qwen_preset = get_preset("qwen-image")

    def scaled(v: float) -> float:
        return 2 * v * qwen_preset.num_blocks / flux.num_layers

    qwen = ModelProfile(
        qwen_preset,
        step_fixed_s=scaled(flux.step_fixed_s), step_linear_s=scaled(flux.step_linear_s),
        step_quadratic_s=scaled(flux.step_quadratic_s), encode_s=0.05, decode_s_per_mpx=0.1,
    )  # fmt: skip
    tiny_qwen = replace(tiny_flux, preset=get_preset("tiny-qwen-image"))
    wan_13 = wan("wan2.1-1.3b")
    wan_14 = wan("wan2.1-14b")
    # Wan2.2: A14B runs one 14B expert per step, each Wan2.1-14B's architecture: its step costs. TI2V-5B
    # (an assumption until profiled): Wan2.1-1.3B's per-token constants scaled by the parameter ratio
    # (5.0 / 1.42 B) for the linear part and the head ratio (24 / 12) for attention.
    a14b = replace(wan_14, preset=get_preset("wan2.2-t2v-a14b"))
    ti2v = replace(
        wan_13, preset=get_preset("wan2.2-ti2v-5b"),
        step_linear_s=wan_13.step_linear_s * 5.0 / 1.42, step_quadratic_s=wan_13.step_quadratic_s * 2,
    )  # fmt: skip
    tiny_wan22 = replace(tiny_wan, preset=get_preset("tiny-wan2.2"))
    tiny_ti2v = replace(tiny_wan, preset=get_preset("tiny-wan2.2-ti2v"))
    profiles = [tiny_flux, tiny_wan, tiny_qwen, tiny_wan22, tiny_ti2v, flux, wan_13, wan_14, qwen, a14b, ti2v]
    return {p.name: p for p in profiles}


def derive_profile(preset: ModelPreset) -> ModelProfile:
    """The cost profile of a preset without built-in constants (an assumption until profiled):
    the built-in profile of its family scaled by blocks x width^2 (the per-token work of a block
    grows with the square of the width)."""
    ref = MODEL_PROFILES["wan2.1-14b" if preset.is_video else "flux-dev"]
    if preset.name.startswith("tiny-"):
        ref = MODEL_PROFILES["tiny-wan" if preset.is_video else "tiny-flux"]
    k = (preset.num_blocks * preset.hidden**2) / (ref.num_layers * ref.hidden**2)
    return replace(
        ref,
        preset=preset,
        step_fixed_s=ref.step_fixed_s * preset.num_blocks / ref.num_layers,
        step_linear_s=ref.step_linear_s * k,
        step_quadratic_s=ref.step_quadratic_s
        * preset.num_blocks
        * preset.hidden
        / (ref.num_layers * ref.hidden),
    )


MODEL_PROFILES: dict[str, ModelProfile] = _builtin_profiles()


def register_model(profile: ModelProfile) -> None:
    """Add or replace the cost profile of a preset (e.g. from `gfdit profile`)."""
    MODEL_PROFILES[profile.name] = profile


def get_profile(model: str) -> ModelProfile:
    """The cost profile of preset `model` (derived from its family's when it has none built in);
    ValueError naming the known presets if there is no such preset."""
    p = MODEL_PROFILES.get(model)
    if p is None:
        p = derive_profile(get_preset(model))  # ValueError for an unknown name
        MODEL_PROFILES[model] = p
    return p


def state_dim_size(request: Request) -> int:
    """Size of the split dimension of the request's state: its latent tokens (ModelPreset.seq_len)."""
    return get_preset(request.model).seq_len(request.width, request.height, request.num_frames)


def state_bytes_per_index(request: Request, kind: TaskKind) -> float:
    """Bytes per index of the split dimension of the state a task of `kind` starts from: the fp32
    latent (every task that moves state moves the latent)."""
    return float(get_profile(request.model).state_bytes_per_token)


def valid_sp_degrees(request: Request, max_degree: int) -> tuple[int, ...]:
    """SP degrees in [1, max_degree] the preset allows (ModelPreset.valid_sp_degrees, the one rule)."""
    return get_preset(request.model).valid_sp_degrees(
        request.width, request.height, request.num_frames, max_degree
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
        """Seconds of an ENCODE or DECODE task on `sp_degree` ranks (DENOISE: one step)."""

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

    def task_time(
        self, task: Task, request: Request, sp_degree: int, num_steps: int | None = None, *, cfg: bool = False
    ) -> float:
        """Seconds of `task` (DENOISE: `num_steps` steps, default the task's own) on `sp_degree` ranks;
        with `cfg`, a CFG-parallel DENOISE chunk on `sp_degree` = 2k ranks (Note [CFG-parallel step cost])."""
        r = request
        if task.kind is TaskKind.DENOISE:
            steps = task.num_steps if num_steps is None else num_steps
            if cfg:
                if sp_degree % 2:
                    raise ValueError(f"a CFG-parallel chunk needs an even group, got {sp_degree} ranks")
                return steps * self.cfg_step_time(r.model, r.width, r.height, r.num_frames, sp_degree // 2)
            return steps * self.step_time(r.model, r.width, r.height, r.num_frames, sp_degree)
        if cfg:
            raise ValueError(f"only DENOISE chunks run CFG-parallel, not {task.kind.name}")
        return self.stage_time(task.kind, r.model, r.width, r.height, r.num_frames, sp_degree)

    def remaining_time(
        self, request: Request, head: Task, sp_degree: int, remaining_steps: int, stage_degree: int = 1
    ) -> float:
        """Seconds from `head` to the end of the trajectory with DENOISE at `sp_degree` and the other
        stages at `stage_degree`; `remaining_steps` denoising steps are still to run."""
        r = request
        order = [TaskKind.ENCODE, TaskKind.DENOISE, TaskKind.DECODE]
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

    # CFG-parallel steps (Note [CFG-parallel step cost]).

    def cfg_step_time(
        self, model: str, width: int, height: int, frames: int | None, half_degree: int
    ) -> float:
        """Seconds of one CFG-parallel denoising step on 2 x `half_degree` ranks. This default knows
        nothing of CFG-parallel: a plain step on one half."""
        return self.step_time(model, width, height, frames, half_degree)

    def observe_cfg(
        self,
        model: str,
        width: int,
        height: int,
        frames: int | None,
        half_degree: int,
        seconds: float,
        num_steps: int = 1,
    ) -> None:
        """Learn from a measured CFG-parallel chunk of `num_steps` steps. This default checks it and
        ignores it."""
        if not math.isfinite(seconds) or seconds < 0 or num_steps < 1:
            raise ValueError(
                f"a CFG-parallel observation needs seconds >= 0 and num_steps >= 1, got {seconds}, {num_steps}"
            )

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
        graph_steps: bool = False,
    ) -> None:
        if not 0.0 < ema <= 1.0:
            raise ValueError(f"ema must be in (0, 1], got {ema}")
        self._profiles = profiles
        # Steps replay from CUDA graphs (Note [Cost model], "Graph-replayed steps"): no c0.
        self.graph_steps = bool(graph_steps)
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
        # Note [CFG-parallel step cost]: observed CFG-parallel steps, (model, w, h, frames, k) -> seconds
        self._cfg_observed: dict[tuple[str, int, int, int | None, int], float] = {}
        self._cfg_corr: dict[str, tuple[int, float]] = {}  # model -> count, sum of measured / predicted

    def _fixed_s(self, p: ModelProfile) -> float:
        """c0 of Note [Cost model]: the eager launch cost per step, none when steps replay as graphs."""
        return 0.0 if self.graph_steps else p.step_fixed_s

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
        n = p.attention_len(width, height, frames)
        compute = self._fixed_s(p) + (p.step_linear_s * n + p.step_quadratic_s * n * n) / d
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
            # One rank decodes (the others send it their slices: gfdit.runtime.worker): no speed-up
            # with d, only the gather of the latent, which reshard_time-like costs keep small.
            return p.decode_s_per_mpx * mpx
        raise ValueError(f"no stage time for {kind}")

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
        return self._scaled_gpu_time(model, width, height, frames, d, batch)

    def _scaled_gpu_time(
        self, model: str, width: int, height: int, frames: int | None, d: int, batch: float
    ) -> float:
        p = self.profile(model)
        n = p.attention_len(width, height, frames)
        compute = self._fixed_s(p) + batch * (p.step_linear_s * n + p.step_quadratic_s * n * n) / d
        if d == 1:
            return compute
        a2a_bytes = batch * (n / d) * p.hidden * 2 * (d - 1) / d
        latency = self.a2a_latency_s + self.a2a_latency_per_peer_s * (d - 1)
        return compute + 4 * p.num_layers * (latency + a2a_bytes / self.a2a_bandwidth)

    def _batch_model_time(
        self, model: str, width: int, height: int, frames: int | None, d: int, batch: float
    ) -> float:
        gpu = self._scaled_gpu_time(model, width, height, frames, d, batch)
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

    # -- CFG-parallel steps (Note [CFG-parallel step cost]) -------------------------------------------

    def cfg_branch_factor(self, model: str, width: int, height: int, frames: int | None, k: int) -> float:
        """branch(N, k) of Note [CFG-parallel step cost]: one prediction's share of a step of both."""
        both = self._batch_model_time(model, width, height, frames, k, 1)
        if both <= 0:
            return 0.5
        return self._batch_model_time(model, width, height, frames, k, 0.5) / both

    def cfg_exchange_time(self, model: str, width: int, height: int, frames: int | None, k: int) -> float:
        """exchange(k) of Note [CFG-parallel step cost]: the pair's all-gather of its predictions."""
        p = self.profile(model)
        tokens = p.seq_len(width, height, frames) / k
        return self.a2a_latency_s + tokens * p.state_bytes_per_token / self.a2a_bandwidth

    def cfg_step_time(
        self, model: str, width: int, height: int, frames: int | None, half_degree: int
    ) -> float:
        self._check_degree(half_degree)
        seen = self._cfg_observed.get((model, width, height, frames, half_degree))
        if seen is not None:
            return seen
        return self.cfg_predicted_time(model, width, height, frames, half_degree) * self.cfg_correction(model)

    def cfg_predicted_time(self, model: str, width: int, height: int, frames: int | None, k: int) -> float:
        """cfg_step(N, k) of Note [CFG-parallel step cost] before the profiled correction."""
        step = self.step_time(model, width, height, frames, k)
        return step * self.cfg_branch_factor(model, width, height, frames, k) + self.cfg_exchange_time(
            model, width, height, frames, k
        )

    def set_observed_cfg(
        self, model: str, width: int, height: int, frames: int | None, half_degree: int, seconds: float
    ) -> None:
        """Take `seconds` per CFG-parallel step on 2 x `half_degree` ranks as the estimate of exactly
        this key (a profiled measurement, gfdit profile --cfg); its measured / predicted ratio joins the
        per-model correction of unmeasured keys. Load the plain steps first (the prediction uses them)."""
        self._check_degree(half_degree)
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"profiled seconds must be finite and >= 0, got {seconds}")
        self._cfg_observed[(model, width, height, frames, half_degree)] = seconds
        predicted = self.cfg_predicted_time(model, width, height, frames, half_degree)
        if predicted > 0:
            n, total = self._cfg_corr.get(model, (0, 0.0))
            self._cfg_corr[model] = (n + 1, total + seconds / predicted)

    def cfg_correction(self, model: str) -> float:
        """The mean measured / predicted ratio of `model`'s profiled CFG-parallel steps (1.0 before any)."""
        n, total = self._cfg_corr.get(model, (0, 0.0))
        return total / n if n else 1.0

    def observe_cfg(
        self,
        model: str,
        width: int,
        height: int,
        frames: int | None,
        half_degree: int,
        seconds: float,
        num_steps: int = 1,
    ) -> None:
        """An exponential moving average per exact key, like `observe`."""
        self._check_degree(half_degree)
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"observed seconds must be finite and >= 0, got {seconds}")
        if num_steps < 1:
            raise ValueError(f"a CFG-parallel observation needs num_steps >= 1, got {num_steps}")
        key = (model, width, height, frames, half_degree)
        per_step = seconds / num_steps
        old = self._cfg_observed.get(key)
        self._cfg_observed[key] = per_step if old is None else (1 - self.ema) * old + self.ema * per_step


# -- cost profiles (written by `gfdit profile`) ------------------------------------------------------------

kProfileFormat = "gfdit-profile/1"
kProfileKinds = ("ENCODE", "DENOISE", "DECODE")


def read_profile(path: str, model: str | None = None) -> dict:
    """The profile at `path`, checked; ValueError naming the problem (wrong format or model, bad rows)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise ValueError(f"cost profile {path!r}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"cost profile {path!r} is not JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != kProfileFormat:
        raise ValueError(
            f"cost profile {path!r}: expected format {kProfileFormat!r} (written by `gfdit profile`)"
        )
    if model is not None and data.get("model") != model:
        raise ValueError(f"cost profile {path!r} is for model {data.get('model')!r}, not {model!r}")
    rows = data.get("observations")
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"cost profile {path!r} has no observations")
    for i, r in enumerate(rows):
        ok = (
            isinstance(r, dict) and r.get("kind") in kProfileKinds
            and all(isinstance(r.get(k), int) and r[k] > 0 for k in ("width", "height", "degree"))
            and (r.get("frames") is None or (isinstance(r["frames"], int) and r["frames"] > 0))
            and isinstance(r.get("seconds"), int | float) and r["seconds"] >= 0
        )  # fmt: skip
        if not ok:
            raise ValueError(f"cost profile {path!r}: observation {i} is malformed: {r!r}")
    batched = data.get("batch_observations", [])
    if not isinstance(batched, list):
        raise ValueError(f"cost profile {path!r}: batch_observations must be a list")
    for i, r in enumerate(batched):
        ok = (
            isinstance(r, dict) and r.get("kind") == "DENOISE"
            and all(isinstance(r.get(k), int) and r[k] > 0 for k in ("width", "height", "degree", "batch"))
            and (r.get("frames") is None or (isinstance(r["frames"], int) and r["frames"] > 0))
            and isinstance(r.get("seconds"), int | float) and r["seconds"] >= 0
        )  # fmt: skip
        if not ok:
            raise ValueError(f"cost profile {path!r}: batch observation {i} is malformed: {r!r}")
    cfg = data.get("cfg_observations", [])
    if not isinstance(cfg, list):
        raise ValueError(f"cost profile {path!r}: cfg_observations must be a list")
    for i, r in enumerate(cfg):
        ok = (
            isinstance(r, dict) and r.get("kind") == "DENOISE"
            and all(isinstance(r.get(k), int) and r[k] > 0 for k in ("width", "height", "degree", "half_degree"))
            and r["degree"] == 2 * r["half_degree"]
            and (r.get("frames") is None or (isinstance(r["frames"], int) and r["frames"] > 0))
            and isinstance(r.get("seconds"), int | float) and r["seconds"] >= 0
        )  # fmt: skip
        if not ok:
            raise ValueError(f"cost profile {path!r}: CFG-parallel observation {i} is malformed: {r!r}")
    return data


def apply_profile(cost_model, profile: dict) -> None:
    """Load a profile's observations into `cost_model` (an AnalyticCostModel): each measured key
    becomes exactly the measurement, and each kind's measured/analytic factor their mean."""
    model = profile["model"]
    for r in profile["observations"]:
        kind = TaskKind[r["kind"]]
        args = (kind, model, r["width"], r["height"], r["frames"], r["degree"])
        cost_model.set_observed(*args, float(r["seconds"]))
    # Batched steps after every batch-1 step: their correction is relative to step_time.
    for r in profile.get("batch_observations", []):
        args = (model, r["width"], r["height"], r["frames"], r["degree"], r["batch"])
        cost_model.set_observed_batch(*args, float(r["seconds"]))
    for r in profile.get("cfg_observations", []):
        args = (model, r["width"], r["height"], r["frames"], r["half_degree"])
        cost_model.set_observed_cfg(*args, float(r["seconds"]))
