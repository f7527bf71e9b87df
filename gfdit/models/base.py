"""The model interface the runtime is written against (`DiTModel`), and `load_model`.

Note [Model state and ranks]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~
- Every rank builds its own copy of a model. Random initialisation seeds each component from a fixed
  per-component seed (kInitSeed and the component's folder name), so all ranks hold identical weights:
  bit-identical on CPU, and on GPUs of the same model (CUDA's RNG kernels depend on the device's
  launch geometry, so do not mix GPU models in one job with random weights). `weights_fingerprint()`
  lets the runtime check this across ranks.
- The latent state is fp32 in packed token form [1, S, C_tok] (Note [Packed tokens] in presets.py),
  whatever the model's dtype; the transformer sees it cast to the model's dtype. Keeping the state fp32
  is a deliberate difference from the diffusers pipelines (which keep it in the model dtype): it is what
  moves between ranks, and it must not lose precision at every rescheduling point.
- Everything a rank computes from a request is deterministic: encode() (eval mode, no dropout),
  init_latents() (CPU generator from request.seed), timesteps() (pure function of the request), and
  denoise() given the same inputs and the same group size.
"""

from __future__ import annotations

import abc
import contextlib
import json
import logging
import os
import time
import zlib
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch

from gfdit.models.presets import ModelPreset, check_request, runs_true_cfg
from gfdit.models.tokenizer import HashTokenizer, HFTokenizer, load_tokenizer

__all__ = ["DiTModel", "kInitSeed", "COMPONENTS", "load_diffusers", "log_loaded", "to_uint8", "torch_dtype"]

log = logging.getLogger("gfdit.models")

kInitSeed = 0x6D_D17  # base seed of random initialisation (any fixed value: ranks must agree)
COMPONENTS = ("text", "transformer", "vae")


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """The torch dtype named `name` ("float32", "bfloat16", ...), or `name` itself if it is one."""
    if isinstance(name, torch.dtype):
        return name
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"unknown floating dtype {name!r}")
    return dt


def _component_seed(name: str) -> int:
    return (kInitSeed + zlib.crc32(name.encode())) % (1 << 62)


@contextlib.contextmanager
def _random_init(device: torch.device, dtype: torch.dtype, name: str):
    """Constructors inside allocate on `device` in `dtype` (no CPU copy first), drawing from a generator
    seeded for component `name`. The caller's RNG state and default dtype are restored afterwards.
    Not thread-safe (default dtype is process-global): load models before starting threads."""
    seed = _component_seed(name)
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    prev = torch.get_default_dtype()
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        for index in devices:  # only the target GPU's generator: other GPUs' states stay untouched
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                yield
        finally:
            torch.set_default_dtype(prev)


def _keep_fp32(model: torch.nn.Module) -> None:
    """Parameters of the model's `_keep_in_fp32_modules` back to fp32, as diffusers' from_pretrained
    keeps them (e.g. Wan's time embedder, norms and modulation tables)."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    if not keep:
        return
    for name, p in model.named_parameters():
        if p.dtype != torch.float32 and any(k in name.split(".") for k in keep):
            p.data = p.data.float()


def _load_kwargs(device: torch.device, diffusers_model: bool) -> dict[str, Any]:
    """from_pretrained keywords. With accelerate installed, weights go straight to the GPU (device_map)
    and diffusers can keep `_keep_in_fp32_modules` in fp32 (it refuses Wan's transformer without
    accelerate); without it, weights load on the CPU and are moved."""
    from diffusers.utils import is_accelerate_available

    if not is_accelerate_available():
        return {"low_cpu_mem_usage": False} if diffusers_model else {}
    kw: dict[str, Any] = {"low_cpu_mem_usage": True} if diffusers_model else {}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        kw["device_map"] = {"": torch.device("cuda", index)}
    return kw


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3] on CPU, as diffusers' VaeImageProcessor.postprocess
    (denormalize, clamp, x255, round)."""
    x = (images.float() / 2 + 0.5).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().contiguous()


class DiTModel(abc.ABC):
    """A DiT model (text encoders, transformer, VAE) behind the interface the runtime uses.

    Attributes: `preset`, `device`, `dtype` (transformer and text encoders), `num_heads`, `token_dim`
    (C_tok), `components` (which of "text", "transformer", "vae" are loaded), and the modules
    `transformer`, `vae`, `text_encoders` (folder -> module), `tokenizers` (encoder folder -> tokenizer).
    Tokenizers are always loaded (validate() counts prompt tokens); a method that needs a component that
    is not loaded raises RuntimeError.
    """

    family: ClassVar[str]
    pipeline_class_name: ClassVar[str]  # the diffusers pipeline of this family (model_index.json)
    transformer_class: ClassVar[type]
    vae_class: ClassVar[type]
    # Set by gfdit.models.compile.compile_model (Note [Compiled steps]) and gfdit.runtime.graphs.
    compile_mode: str = "off"
    step_graphs = None  # a gfdit.runtime.graphs.StepGraphs replaying the transformer forward, or None

    def __init__(
        self,
        preset: ModelPreset,
        *,
        device: torch.device,
        dtype: torch.dtype,
        transformer: torch.nn.Module | None,
        vae: torch.nn.Module | None,
        text_encoders: Mapping[str, torch.nn.Module],
        tokenizers: Mapping[str, HashTokenizer | HFTokenizer],
    ):
        self.preset = preset
        self.device = device
        self.dtype = dtype
        self.transformer = transformer
        self.vae = vae
        self.text_encoders = dict(text_encoders)
        self.tokenizers = dict(tokenizers)
        cfg = dict(transformer.config) if transformer is not None else dict(preset.transformer_config)
        self.num_heads = int(cfg["num_attention_heads"])
        self.head_dim = int(cfg["attention_head_dim"])
        self.token_dim = preset.token_dim
        if transformer is not None:
            for key in ("num_attention_heads", "attention_head_dim"):
                if cfg[key] != preset.transformer_config[key]:
                    log.warning(
                        "%s: loaded transformer has %s=%s, preset says %s",
                        preset.name,
                        key,
                        cfg[key],
                        preset.transformer_config[key],
                    )
            self._install_processors()

    # -- loading -------------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        preset: ModelPreset,
        *,
        device: torch.device,
        dtype: torch.dtype,
        weights: str | os.PathLike | None,
        components: Iterable[str],
    ) -> DiTModel:
        components = tuple(components)
        unknown = set(components) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"unknown components {sorted(unknown)}; choose from {COMPONENTS}")
        if weights is not None:
            _check_weights_dir(cls, preset, os.fspath(weights), components)
        tokenizers, encoders = {}, {}
        for spec in preset.text_encoders:
            tok_dir = None if weights is None else os.path.join(weights, spec.tokenizer_subfolder)
            tokenizers[spec.subfolder] = load_tokenizer(
                spec.tokenizer_class, spec.token_style, spec.vocab_size, spec.max_length, tok_dir
            )
            if "text" in components:
                t0 = time.perf_counter()
                encoders[spec.subfolder] = _load_text_encoder(spec, device, dtype, weights)
                log_loaded(spec.subfolder, encoders[spec.subfolder], device, t0)
        transformer = vae = None
        if "transformer" in components:
            t0 = time.perf_counter()
            transformer = load_diffusers(
                cls.transformer_class, preset.transformer_config, "transformer", device, dtype, weights
            )
            log_loaded("transformer", transformer, device, t0)
        if "vae" in components:
            t0 = time.perf_counter()
            vae_dtype = torch_dtype(preset.vae_dtype) if preset.vae_dtype else dtype
            vae = load_diffusers(cls.vae_class, preset.vae_config, "vae", device, vae_dtype, weights)
            log_loaded("vae", vae, device, t0)
        return cls(
            preset,
            device=device,
            dtype=dtype,
            transformer=transformer,
            vae=vae,
            text_encoders=encoders,
            tokenizers=tokenizers,
        )

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write every loaded component in diffusers layout (model_index.json, transformer/, vae/,
        text_encoder*/, tokenizer*/), loadable with load_model(..., weights=directory)."""
        os.makedirs(directory, exist_ok=True)
        index: dict[str, Any] = {"_class_name": self.pipeline_class_name, "gfdit_preset": self.preset.name}
        if self.transformer is not None:
            self.transformer.save_pretrained(os.path.join(directory, "transformer"))
            index["transformer"] = ["diffusers", type(self.transformer).__name__]
        if self.vae is not None:
            self.vae.save_pretrained(os.path.join(directory, "vae"))
            index["vae"] = ["diffusers", type(self.vae).__name__]
        for spec in self.preset.text_encoders:
            if spec.subfolder in self.text_encoders:
                self.text_encoders[spec.subfolder].save_pretrained(os.path.join(directory, spec.subfolder))
                index[spec.subfolder] = ["transformers", spec.model_class]
            self.tokenizers[spec.subfolder].save_pretrained(os.path.join(directory, spec.tokenizer_subfolder))
        with open(os.path.join(directory, "model_index.json"), "w") as f:
            json.dump(index, f, indent=2)

    def weights_fingerprint(self) -> dict[str, float]:
        """Per loaded component, the float64 sum of all parameters: equal on ranks with equal weights."""
        mods: dict[str, torch.nn.Module] = dict(self.text_encoders)
        if self.transformer is not None:
            mods["transformer"] = self.transformer
        if self.vae is not None:
            mods["vae"] = self.vae
        out = {}
        with torch.no_grad():
            for name, m in mods.items():
                out[name] = float(sum(p.double().sum() for p in m.parameters()))
        return out

    @property
    def components(self) -> tuple[str, ...]:
        have = {"text": bool(self.text_encoders), "transformer": self.transformer is not None}
        have["vae"] = self.vae is not None
        return tuple(c for c in COMPONENTS if have[c])

    def require(self, component: str) -> None:
        """RuntimeError unless `component` ("text", "transformer", "vae") is loaded."""
        if component not in self.components:
            raise RuntimeError(f"{self.preset.name}: the {component!r} component is not loaded")

    # -- request shapes ------------------------------------------------------------------------------
    def validate(self, request) -> None:
        """Raise ValueError naming the field if the request cannot run on this model (see
        gfdit.models.presets.check_request): model name, width/height (multiple of VAE x patch, limits),
        num_inference_steps, num_frames (None for images; 4k+1 and <= max for video), guidance_scale,
        prompt / negative_prompt length in tokens of the sequence encoder."""
        tok = self.tokenizers[self.preset.sequence_encoder.subfolder]
        check_request(self.preset, request, tok.count)

    def token_grid(self, request) -> tuple[int, int, int]:
        """(frames, rows, columns) of the packed token grid; S is their product."""
        return self.preset.token_grid(request.width, request.height, request.num_frames)

    def seq_len(self, request) -> int:
        """S: the number of latent tokens (text tokens excluded): ModelPreset.seq_len."""
        return self.preset.seq_len(request.width, request.height, request.num_frames)

    def valid_sp_degrees(self, request, max_degree: int) -> list[int]:
        """Degrees Ulysses SP can run (ModelPreset.valid_sp_degrees, the one rule); others are
        refused by denoise()."""
        return list(
            self.preset.valid_sp_degrees(request.width, request.height, request.num_frames, max_degree)
        )

    # -- packed tokens -------------------------------------------------------------------------------
    def latent_shape(self, request) -> tuple[int, ...]:
        """Shape of the VAE latent: [1, C, h, w] for images, [1, C, f, h, w] for video."""
        f, h, w = self.token_grid(request)
        pt, ph, pw = self.preset.patch_size
        c = self.preset.latent_channels
        return (1, c, f * pt, h * ph, w * pw) if self.preset.is_video else (1, c, h * ph, w * pw)

    def pack_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latent [B, C, F, H, W] (or [B, C, H, W]) -> tokens [B, S, C*pt*ph*pw] (Note [Packed tokens])."""
        pt, ph, pw = self.preset.patch_size
        x = latents if latents.ndim == 5 else latents.unsqueeze(2)
        b, c, f, h, w = x.shape
        x = x.reshape(b, c, f // pt, pt, h // ph, ph, w // pw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return x.reshape(b, (f // pt) * (h // ph) * (w // pw), c * pt * ph * pw)

    def unpack_latents(self, tokens: torch.Tensor, request) -> torch.Tensor:
        """Inverse of pack_latents for the request's grid."""
        f, h, w = self.token_grid(request)
        pt, ph, pw = self.preset.patch_size
        b, c = tokens.shape[0], self.preset.latent_channels
        x = tokens.reshape(b, f, h, w, c, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
        x = x.reshape(b, c, f * pt, h * ph, w * pw)
        return x if self.preset.is_video else x.squeeze(2)

    def init_latents(self, request) -> torch.Tensor:
        """The initial noise [1, S, C_tok], fp32 on this model's device: torch.randn of the VAE latent's
        shape from a CPU generator seeded with request.seed, then packed. Identical on every rank."""
        if request.seed is None:
            raise ValueError("seed must be set (every rank draws the same noise from it)")
        gen = torch.Generator(device="cpu").manual_seed(int(request.seed))
        noise = torch.randn(self.latent_shape(request), generator=gen, dtype=torch.float32)
        return self.pack_latents(noise).to(self.device)

    # -- denoising -----------------------------------------------------------------------------------
    @abc.abstractmethod
    def timesteps(self, request):
        """A fresh diffusers FlowMatchEulerDiscreteScheduler with set_timesteps done for the request
        (its `.timesteps` has num_inference_steps entries, `.sigmas` one more)."""

    @abc.abstractmethod
    def encode(self, request) -> dict[str, torch.Tensor]:
        """Text conditioning, a flat dict of tensors on this model's device in its dtype."""

    @abc.abstractmethod
    def decode(self, latents_full: torch.Tensor, request) -> torch.Tensor:
        """Full latent [1, S, C_tok] -> uint8 RGB on CPU: [N, H, W, 3] images or [N, F, H, W, 3] video."""

    @abc.abstractmethod
    def _install_processors(self) -> None:
        """Put the sequence-parallel attention processors on the transformer."""

    def prepare(self, cond: Mapping[str, torch.Tensor], request, group) -> dict[str, Any]:
        """The per-request context of the transformer steps (the family's `_prepare` hook)."""
        return self._prepare(cond, request, group)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, ctx: dict[str, Any], group) -> torch.Tensor:
        """One eager transformer step (the family's `_velocity` hook): what gfdit.runtime.graphs
        captures and replays."""
        return self._velocity(x, t, ctx, group)

    @abc.abstractmethod
    def _prepare(self, cond: Mapping[str, torch.Tensor], request, group) -> dict[str, Any]:
        """Per-call inputs of the transformer that do not change between steps."""

    @abc.abstractmethod
    def _velocity(self, x: torch.Tensor, t: torch.Tensor, ctx: dict[str, Any], group) -> torch.Tensor:
        """The guided flow prediction for the local tokens x [1, S/d, C_tok] (fp32) at timestep t."""

    def denoise(
        self,
        latents_local: torch.Tensor,
        token_range: tuple[int, int],
        cond: Mapping[str, torch.Tensor],
        start: int,
        end: int,
        request,
        group=None,
        on_step=None,
        cfg_group=None,
    ) -> torch.Tensor:
        """Run denoising steps [start, end) on this rank's tokens and return the new local slice (fp32).

        latents_local: [1, hi - lo, C_tok], tokens token_range = (lo, hi) of the S latent tokens.
        group: a gfcoll.Group whose members all call denoise together (same request, cond, start, end),
        member i holding slice i of the even split: lo = i * S/d, hi = lo + S/d. Its size d must be in
        valid_sp_degrees(). None or size 1: this rank holds all S tokens and nothing is communicated.
        cond: encode(request) (moved to this device and dtype here if needed).
        Each step: transformer forward with Ulysses SP over the group, guidance (CFG for Wan), then the
        FlowMatch Euler step, elementwise on the local slice given the step's sigmas.
        on_step: called with i + 1 once step i is issued (on CUDA: enqueued on the current stream,
        not necessarily finished), e.g. to report progress.
        cfg_group: CFG-parallel (Note [CFG-parallel]): a 2-member gfcoll.Group pairing this rank with
        the rank that holds the same tokens in the other half; member 0 computes the conditional
        prediction, member 1 the unconditional one, `group` is this rank's half. None: both branches
        here (a batch of 2, or two passes)."""
        self.require("transformer")
        n, d = self.check_slice(request, token_range, group, "denoise")
        if tuple(latents_local.shape) != (1, n, self.token_dim):
            raise ValueError(
                f"denoise: latents_local has shape {tuple(latents_local.shape)}, expected (1, {n}, {self.token_dim})"
            )
        steps = request.num_inference_steps
        if not 0 <= start <= end <= steps:
            raise ValueError(f"denoise: need 0 <= start <= end <= {steps}, got start={start}, end={end}")
        scheduler = self.timesteps(request)
        scheduler.set_begin_index(start)
        x = latents_local.to(device=self.device, dtype=torch.float32)
        sp = group if d > 1 else None
        if sp is not None and self.compile_mode != "off":
            from gfcoll.ops import traceable  # noqa: PLC0415 - registers the gfcoll custom ops

            sp = traceable(sp)  # Note [Traceable groups] in gfcoll/ops.py
        pair = None if cfg_group is None else self._check_cfg_group(cfg_group, request)
        ctx = self._prepare(cond, request, sp)
        graphs = self.step_graphs
        if pair is not None:
            ctx["cfg_pair"] = pair
            graphs = None  # a captured step would bake the pair in: CFG-parallel steps run eagerly
        with torch.no_grad():
            for i in range(start, end):
                t = scheduler.timesteps[i]
                if graphs is not None:  # Note [Step graphs] in gfdit/runtime/graphs.py
                    v = graphs.velocity(self, x, t, ctx, sp)
                else:
                    v = self._velocity(x, t, ctx, sp)
                x = scheduler.step(v.float(), t, x, return_dict=False)[0]
                if on_step is not None:
                    on_step(i + 1)
        return x

    def check_slice(self, request, token_range: tuple[int, int], group, what: str) -> tuple[int, int]:
        """(n, d): this rank's token count and the SP degree for `group` (None: one rank), once the
        degree divides the latent tokens and heads and token_range is this member's slice of the even
        split; otherwise ValueError starting with `what`."""
        s = self.seq_len(request)
        d = 1 if group is None else group.size
        me = 0 if group is None else group.rank
        if me < 0:
            raise ValueError(f"{what}: this rank is not a member of {group!r}")
        if s % d or self.num_heads % d:
            raise ValueError(
                f"{what}: SP degree {d} must divide the {s} latent tokens and the {self.num_heads} heads "
                f"(valid: {self.valid_sp_degrees(request, d)})"
            )
        n = s // d
        lo, hi = (int(v) for v in token_range)
        if (lo, hi) != (me * n, (me + 1) * n):
            raise ValueError(
                f"{what}: member {me} of {d} must hold tokens [{me * n}, {(me + 1) * n}) of {s}, got [{lo}, {hi})"
            )
        return n, d

    def denoise_batch(self, items, token_range, group=None, on_step=None):
        """Several requests of this model and shape denoised as one batch, each at its own step index
        and timestep, each latent a separate tensor in and out: Note [Batched steps] in
        gfdit/models/batch.py (items are gfdit.models.batch.BatchItem)."""
        from gfdit.models.batch import denoise_batch

        return denoise_batch(self, items, token_range, group, on_step)

    def prepare_batch(self, conds, requests, group) -> dict[str, Any]:
        """The context of a batched step of several requests (the family's `_prepare_batch` hook)."""
        return self._prepare_batch(conds, requests, group)

    def _prepare_batch(self, conds, requests, group) -> dict[str, Any]:
        """Like _prepare for a batch of requests of one shape (Note [Batched steps]): the per-call
        inputs of _velocity for x [B, S/d, C_tok] and per-sample timesteps t [B]."""
        raise NotImplementedError(f"{type(self).__name__} has no batched denoising")

    # Note [CFG-parallel]
    # A request with true classifier-free guidance needs two predictions per step, conditional and
    # unconditional. Without CFG-parallel one group computes both (Wan: a batch of 2; Qwen-Image:
    # two passes). With it, a group of 2k ranks is two halves of k: half A computes the conditional
    # prediction, half B the unconditional one, each with Ulysses SP of degree k over its own
    # subgroup and the same even token split, and member i of A is paired with member i of B (a
    # 2-member gfcoll group, the pair, A's member first). After each forward the pair all-gathers its
    # [1, S/k, C] fp32 predictions (S/k x C x 4 bytes per rank and step) and both members combine them
    # identically, so the two halves hold bit-identical copies of the same latent slices: the state
    # is the even split over A, replicated on B. Any two disjoint subgroups may be the halves, and a
    # policy may choose CFG-parallel or plain SP per chunk (the state moves as usual: B's copy is
    # simply not needed by a plain-SP layout). Graph-replayed steps are not used while CFG-parallel
    # (a captured step would bake the pair in); compiled steps are (the pair is a traceable group).
    def uses_cfg(self, request) -> bool:
        """Whether the request runs true classifier-free guidance (two predictions per step)."""
        return runs_true_cfg(self.preset, request)

    def _check_cfg_group(self, cfg_group, request):
        if not self.uses_cfg(request):
            raise ValueError(
                f"denoise: cfg_group given, but {self.preset.name!r} runs no classifier-free guidance for this "
                f"request (guidance_scale {request.guidance_scale}); CFG-parallel needs two predictions per step"
            )
        if cfg_group.size != 2 or cfg_group.rank < 0:
            raise ValueError(
                f"denoise: cfg_group must be a 2-member group holding this rank, got {cfg_group!r}"
            )
        if self.compile_mode != "off":
            from gfcoll.ops import traceable  # noqa: PLC0415 - registers the gfcoll custom ops

            return traceable(cfg_group)
        return cfg_group

    def cfg_exchange(self, mine: torch.Tensor, ctx: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Note [CFG-parallel]: this rank's prediction [1, n, C] (fp32) of its branch in, both out
        (conditional, unconditional), the same on the two members of the pair."""
        pair = ctx["cfg_pair"]
        both = torch.empty((2, *mine.shape[1:]), dtype=mine.dtype, device=mine.device)
        pair.all_gather(both, mine.contiguous())
        return both[0:1], both[1:2]

    # -- helpers for the families --------------------------------------------------------------------
    def _cond(self, cond: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
        if key not in cond:
            raise ValueError(f"cond lacks {key!r} (from encode()); has {sorted(cond)}")
        return cond[key].to(device=self.device, dtype=self.dtype)

    def _vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype


def log_loaded(name: str, module: torch.nn.Module, device: torch.device, t0: float) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    n = sum(p.numel() for p in module.parameters())
    log.info("%s: %.1fM parameters on %s in %.1f s", name, n / 1e6, device, time.perf_counter() - t0)


# Config keys of a saved component that fix the latent layout the preset packs and unpacks (Note [Packed
# tokens] in presets.py): a directory whose value differs cannot run under the preset, so it is refused at
# load instead of failing at the first request. Only keys the preset's config sets are compared; the
# transformer's size (heads, layers) may differ and is only warned of (DiTModel.__init__).
kLayoutKeys = {
    "transformer": ("in_channels", "out_channels", "patch_size"),
    "vae": ("z_dim", "latent_channels", "patch_size", "scale_factor_spatial", "scale_factor_temporal"),
}


def _check_weights_dir(cls, preset: ModelPreset, weights: str, components: tuple[str, ...]) -> None:
    """Before anything loads: the directory is this family's pipeline layout and holds every part the
    requested components need (both experts of a two-expert preset: transformer/ and transformer_2/),
    with the latent layout of the preset; otherwise one error naming every missing or mismatched part."""
    if not os.path.isdir(weights):
        raise FileNotFoundError(f"weights directory {weights!r} does not exist")
    two_experts = preset.transformer_2_config is not None
    index_path = os.path.join(weights, "model_index.json")
    if os.path.isfile(index_path):
        index = _read_json(weights, "model_index.json")
        found = index.get("_class_name")
        saved = f" (saved from preset {index['gfdit_preset']!r})" if "gfdit_preset" in index else ""
        if found is not None and found != cls.pipeline_class_name:
            raise ValueError(
                f"weights directory {weights!r} holds a {found}{saved}, but model {preset.name!r} needs a "
                f"{cls.pipeline_class_name}"
            )
        # diffusers writes [null, null] for a pipeline component that is absent (Wan2.2 TI2V-5B's transformer_2).
        has_second = any(v is not None for v in (index.get("transformer_2") or ()))
        if has_second and not two_experts:
            raise ValueError(
                f"weights directory {weights!r} holds two experts (transformer/ and transformer_2/){saved}, but "
                f"model {preset.name!r} has one transformer; serve it with a two-expert Wan2.2 preset"
            )
        ratio = index.get("boundary_ratio")
        if ratio is not None and ratio != preset.boundary_ratio:
            raise ValueError(
                f"weights directory {weights!r}: model_index.json has boundary_ratio {ratio}{saved}, but model "
                f"{preset.name!r} switches experts at {preset.boundary_ratio}"
            )
    needed = [spec.tokenizer_subfolder for spec in preset.text_encoders]
    if "text" in components:
        needed += [spec.subfolder for spec in preset.text_encoders]
    needed += [c for c in ("transformer", "vae") if c in components]
    if two_experts and "transformer" in components:
        needed.append("transformer_2")  # the low-noise expert (gfdit.models.wan22)
    missing = []
    for sub in needed:
        path = os.path.join(weights, sub)
        if not os.path.isdir(path):
            missing.append(f"{sub}/ (the low-noise expert)" if sub == "transformer_2" else f"{sub}/")
        elif not sub.startswith("tokenizer") and not os.path.isfile(os.path.join(path, "config.json")):
            missing.append(f"{sub}/config.json")
    if missing:
        raise FileNotFoundError(
            f"weights directory {weights!r} lacks {', '.join(missing)} (model {preset.name!r}, components "
            f"{list(components)}; expected the diffusers pipeline layout of a {cls.pipeline_class_name})"
        )
    wanted = {"transformer": preset.transformer_config, "vae": preset.vae_config}
    if two_experts:
        wanted["transformer_2"] = preset.transformer_2_config
    mismatched = []
    for sub, config in wanted.items():
        if sub not in needed:
            continue
        saved_config = _read_json(weights, os.path.join(sub, "config.json"))
        for key in kLayoutKeys[sub.split("_")[0]]:
            if key not in config:
                continue
            want = list(config[key]) if isinstance(config[key], tuple) else config[key]
            if key in saved_config and saved_config[key] != want:
                mismatched.append(f"{sub}/config.json has {key}={saved_config[key]!r}, the preset {want!r}")
    if mismatched:
        raise ValueError(
            f"weights directory {weights!r} does not fit model {preset.name!r}: {'; '.join(mismatched)} (these "
            "fix the latent layout; pick the preset these weights were made for)"
        )


def _read_json(weights: str, name: str) -> dict[str, Any]:
    with open(os.path.join(weights, name)) as f:
        try:
            out = json.load(f)
        except ValueError as e:
            raise ValueError(f"weights directory {weights!r}: {name} is not JSON ({e})") from None
    if not isinstance(out, dict):
        raise ValueError(f"weights directory {weights!r}: {name} is not a JSON object")
    return out


def load_diffusers(model_cls, config: Mapping[str, Any], subfolder: str, device, dtype, weights):
    if weights is None:
        # Lists where the config has tuples: constructors concatenate them with lists, as loaded JSON has.
        kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
        with _random_init(device, dtype, subfolder):
            model = model_cls(**kwargs)
        if dtype != torch.float32:
            _keep_fp32(model)
    else:
        from diffusers.utils import is_accelerate_available

        if model_cls._keep_in_fp32_modules and not is_accelerate_available():
            raise RuntimeError(
                f"loading {model_cls.__name__} from a directory needs the accelerate package (diffusers "
                "keeps its _keep_in_fp32_modules only with low_cpu_mem_usage, which needs accelerate)"
            )
        model = model_cls.from_pretrained(
            os.fspath(weights),
            subfolder=subfolder,
            torch_dtype=dtype,
            local_files_only=True,
            **_load_kwargs(device, diffusers_model=True),
        )
        model = model.to(device)
    return model.eval().requires_grad_(False)


def _load_text_encoder(spec, device, dtype, weights):
    import transformers

    model_cls = getattr(transformers, spec.model_class)
    if weights is None:
        # Nested configurations (Qwen2.5-VL's text_config / vision_config) as the dicts transformers expects.
        kwargs = {k: dict(v) if isinstance(v, Mapping) else v for k, v in spec.config.items()}
        config = model_cls.config_class(**kwargs)
        with _random_init(device, dtype, spec.subfolder):
            model = model_cls(config)
    else:
        model = model_cls.from_pretrained(
            os.path.join(os.fspath(weights), spec.subfolder),
            dtype=dtype,
            local_files_only=True,
            **_load_kwargs(device, diffusers_model=False),
        )
        model = model.to(device)
    return model.eval().requires_grad_(False)
