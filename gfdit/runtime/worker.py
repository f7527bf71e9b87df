"""The worker of one rank: executes the engine's commands in arrival order, holds the state of the
requests whose slices live here, and moves state between ranks with gfcoll point-to-point.

Commands (dicts over ZeroMQ, from gfdit.runtime.engine):
  {"op": "task", ...}   run (this rank's part of) one trajectory task; see `Worker.run_task`
  {"op": "release", "request_id"}   drop everything held for a request
  {"op": "shutdown"}
Events back: {"op": "ready"|"done"|"failed", "rank", ...}.

Note [Reshard execution]
~~~~~~~~~~~~~~~~~~~~~~~~
A task's command carries the scheduler's ReshardPlan of the latent (token ranges along dim 1 of
[1, S, C]), the text-conditioning copies to make (holder -> member, tensors in name order) and,
for FINALIZE off the decoding rank, the pixels' source. Every rank named anywhere in it executes
its own sends and receives in ONE world.batch_p2p, in the plan's order, so the transfers of a pair
of ranks match (gfcoll rule 4) and progress together. Slices of [1, S, C] along dim 1 are
contiguous, so transfers use views, without copies. Ranks that only send (old holders outside the
new group) do so when they reach the command in their queue, after whatever they run before it.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, field

import torch

import gfcoll
from gfdit.layout import even_slices

log = logging.getLogger("gfdit.worker")


@dataclass
class Held:
    """What this rank holds of one request."""

    latents: torch.Tensor | None = None  # this rank's token slice [1, hi - lo, C], or None
    lo: int = 0  # first token of the slice
    hi: int = 0  # one past its last token
    cond: dict[str, torch.Tensor] = field(default_factory=dict)  # text conditioning (replicated)
    pixels: torch.Tensor | None = None  # decoded uint8 images/frames (owner rank only)
    final_latents: torch.Tensor | None = None  # the full latent, kept when the engine asks for it


class Worker:
    """Runs on every rank; `handle(command)` returns the events to send back."""

    def __init__(self, world: gfcoll.World, model):
        self.world = world
        self.model = model
        self.rank = world.rank
        self.held: dict[str, Held] = {}

    def _mark(self):
        """A timing CUDA event recorded now on the current stream (None on CPU). The worker never
        synchronises the device: gfcoll and the model enqueue on the current stream, so a task's
        reshard and compute are ordered there, and completion waits on the task's last event only."""
        if self.world.device.type != "cuda":
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def handle(self, cmd: dict) -> list[dict]:
        op = cmd["op"]
        if op == "release":
            self.held.pop(cmd["request_id"], None)
            return []
        if op == "task":
            try:
                return self.run_task(cmd)
            except Exception as e:  # reported to the engine; the worker keeps serving
                log.error("rank %d: task %s failed: %s", self.rank, cmd.get("task_id"), e)
                return [
                    {
                        "op": "failed",
                        "rank": self.rank,
                        "task_id": cmd["task_id"],
                        "reason": f"rank {self.rank}: {type(e).__name__}: {e}",
                        "trace": traceback.format_exc(limit=8),
                    }
                ]
        raise ValueError(f"unknown command {op!r}")

    # -- one task --------------------------------------------------------------------------------
    def run_task(self, cmd: dict) -> list[dict]:
        req = cmd["request"]
        rid = req.request_id
        kind = cmd["kind"]
        ranks: tuple[int, ...] = tuple(cmd["ranks"])
        member = self.rank in ranks
        held = self.held.setdefault(rid, Held())

        t0 = time.perf_counter()
        e0 = self._mark()
        moved = self._reshard(cmd, held, ranks, member)
        e1 = self._mark()  # no wait: the task's compute is enqueued behind the reshard on the same stream
        t1 = time.perf_counter()
        if not member:
            if held.latents is None and not held.cond and held.pixels is None:
                self.held.pop(rid, None)
            return []

        event = {"op": "done", "rank": self.rank, "task_id": cmd["task_id"], "bytes_moved": moved}
        group = self.world.group(list(ranks)) if len(ranks) > 1 else None
        if kind == "ENCODE":
            held.cond = self.model.encode(req)
            full = self.model.init_latents(req)
            lo, hi = even_slices(full.shape[1], len(ranks))[ranks.index(self.rank)]
            held.latents, held.lo, held.hi = full[:, lo:hi].contiguous(), lo, hi
            event["cond_meta"] = [(k, tuple(v.shape), str(v.dtype)) for k, v in sorted(held.cond.items())]
        elif kind == "DENOISE":
            held.latents = self.model.denoise(
                held.latents, (held.lo, held.hi), held.cond, cmd["start"], cmd["end"], req, group=group
            )
        elif kind == "DECODE":
            if group is not None:
                full = torch.empty(
                    (1, cmd["dim_size"], held.latents.shape[2]),
                    dtype=held.latents.dtype,
                    device=held.latents.device,
                )
                group.all_gather(full, held.latents.contiguous())
            else:
                full = held.latents
            held.latents = None
            if self.rank == ranks[0]:
                held.pixels = self.model.decode(full, req)
                if cmd.get("keep_latents"):
                    held.final_latents = full.float().cpu()
        elif kind == "FINALIZE":
            pixels = held.pixels
            event["result"] = pixels.cpu().numpy()
            if held.final_latents is not None:
                event["latents"] = held.final_latents.numpy()
            self.held.pop(rid, None)
        else:
            raise ValueError(f"unknown task kind {kind!r}")
        e2 = self._mark()
        if e2 is not None:
            e2.synchronize()  # this task's work only (not the device): "done" means its results exist
        t2 = time.perf_counter()
        if e0 is None:
            event["reshard_s"] = t1 - t0
            event["compute_s"] = t2 - t1
        else:  # stream time between the marks (milliseconds)
            event["reshard_s"] = e0.elapsed_time(e1) / 1e3
            event["compute_s"] = e1.elapsed_time(e2) / 1e3
        return [event]

    def _reshard(self, cmd: dict, held: Held, ranks: tuple[int, ...], member: bool) -> int:
        """This rank's part of Note [Reshard execution]. Returns the bytes it received."""
        me = self.rank
        ops: list[gfcoll.P2P] = []
        received = 0
        kind = cmd["kind"]
        transfers = cmd.get("transfers") or []
        new = None
        if kind in ("DENOISE", "DECODE") and (transfers or cmd.get("local")):
            # The latent moves onto an even split over `ranks`.
            if member:
                lo, hi = even_slices(cmd["dim_size"], len(ranks))[ranks.index(me)]
                if (
                    held.latents is not None
                    and (held.lo, held.hi) == (lo, hi)
                    and not any(t[1] == me for t in transfers)
                ):
                    new = held.latents
                else:
                    like = held.latents if held.latents is not None else None
                    c, dtype = cmd["token_dim"], cmd["latent_dtype"]
                    new = torch.empty((1, hi - lo, c), dtype=getattr(torch, dtype), device=self._device(like))
                    for _src, dst, a, b in cmd.get("local") or []:
                        if dst == me:
                            new[:, a - lo : b - lo].copy_(held.latents[:, a - held.lo : b - held.lo])
            for src, dst, a, b in transfers:
                if src == me and dst != me:
                    ops.append(gfcoll.P2P("send", held.latents[:, a - held.lo : b - held.lo], dst))
                elif dst == me and src != me:
                    view = new[:, a - lo : b - lo]
                    ops.append(gfcoll.P2P("recv", view, src))
                    received += view.numel() * view.element_size()
        cond_meta = cmd.get("cond_meta") or []
        for src, dst in cmd.get("cond_sends") or []:
            for name, shape, dtype in cond_meta:
                if src == me:
                    ops.append(gfcoll.P2P("send", held.cond[name].contiguous(), dst))
                elif dst == me:
                    t = torch.empty(
                        shape, dtype=getattr(torch, dtype.removeprefix("torch.")), device=self.world.device
                    )
                    held.cond[name] = t
                    ops.append(gfcoll.P2P("recv", t, src))
                    received += t.numel() * t.element_size()
        pix = cmd.get("pixels_from")
        if pix is not None and pix != ranks[0]:
            # FINALIZE away from the decoding rank: the pixels (and the kept latent) move, whole.
            keep = cmd.get("keep_latents")
            if me == pix:
                ops.append(gfcoll.P2P("send", held.pixels.contiguous(), ranks[0]))
                if keep:
                    ops.append(gfcoll.P2P("send", held.final_latents, ranks[0]))
            elif me == ranks[0]:
                shape, dtype = cmd["pixels_meta"]
                held.pixels = torch.empty(shape, dtype=getattr(torch, dtype))
                ops.append(gfcoll.P2P("recv", held.pixels, pix))
                received += held.pixels.numel()
                if keep:
                    held.final_latents = torch.empty(
                        (1, cmd["dim_size"], cmd["token_dim"]), dtype=torch.float32
                    )
                    ops.append(gfcoll.P2P("recv", held.final_latents, pix))
        if ops:
            self.world.batch_p2p(ops)
        if kind in ("DENOISE", "DECODE") and (transfers or cmd.get("local")):
            if member:
                held.latents, held.lo, held.hi = (
                    new,
                    *even_slices(cmd["dim_size"], len(ranks))[ranks.index(me)],
                )
            else:
                held.latents = None
        if pix is not None and pix != ranks[0] and me == pix:
            held.pixels = held.final_latents = None
        return received

    def _device(self, like: torch.Tensor | None) -> torch.device:
        return like.device if like is not None else self.world.device
