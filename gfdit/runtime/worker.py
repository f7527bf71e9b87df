"""The worker of one rank: executes the engine's commands in arrival order, holds the state of the
requests whose slices live here, and moves state between ranks with gfcoll point-to-point.

Commands (gfdit.runtime.messages; from gfdit.runtime.channel: over ZeroMQ, or in process on rank 0):
  Task      run (this rank's part of) one trajectory task; see `Worker.run_task`
  Batch     run (this rank's part of) one batched DENOISE chunk; see `Worker.run_batch`
  Release   drop everything held for a request
  Exclude   ranks the engine lost: gfcoll operations with them fail at once from now on
  Shutdown  (handled by the engine's worker loop)
Events back: Ready (sent by the loop), StepDone, Done, Failed (with `peer` when a gfcoll peer died,
hung or was excluded: the engine re-runs the request elsewhere).

Note [Reshard execution]
~~~~~~~~~~~~~~~~~~~~~~~~
A task's command carries the scheduler's ReshardPlan of the latent (token ranges along dim 1 of
[1, S, C]) and the text-conditioning copies to make (holder -> member, tensors in name order).
A CFG-parallel chunk's plan fills both halves (the second mirrors the first: Task.latent_slice).
Every rank named anywhere in it executes
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
from gfdit.tasks import TaskKind

from . import messages as msg

log = logging.getLogger("gfdit.worker")


@dataclass
class Held:
    """What this rank holds of one request."""

    latents: torch.Tensor | None = None  # this rank's token slice [1, hi - lo, C], or None
    lo: int = 0  # first token of the slice
    hi: int = 0  # one past its last token
    cond: dict[str, torch.Tensor] = field(default_factory=dict)  # text conditioning (replicated)


class Worker:
    """Runs on every rank; `handle(command)` returns the events to send back."""

    def __init__(self, world: gfcoll.World, model, notify=None):
        self.world = world
        self.model = model
        self.rank = world.rank
        self.held: dict[str, Held] = {}
        # notify(event): sends an event to the engine while a task runs (StepDone), or None
        self.notify = notify

    def _mark(self):
        """A timing CUDA event recorded now on the current stream (None on CPU). The worker never
        synchronises the device: gfcoll and the model enqueue on the current stream, so a task's
        reshard and compute are ordered there, and completion waits on the task's last event only."""
        if self.world.device.type != "cuda":
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def handle(self, cmd: msg.Command) -> list[msg.Event]:
        if isinstance(cmd, msg.Release):
            self.held.pop(cmd.request_id, None)
            return []
        if isinstance(cmd, msg.Exclude):
            self.world.exclude([r for r in cmd.ranks if r != self.rank])
            # Note [NCCL shrink] (gfcoll.nccl_shrink): every survivor, rank 0's worker included, handles
            # Exclude in its command order, after the tasks sent to it before; the shrink is collective
            # over them. Without nccl (host, ipc) it does nothing. Not yet run on GPUs.
            try:
                self.world.shrink_nccl()
            except gfcoll.GfcollError as e:
                log.error("rank %d: the nccl communicator was not shrunk: %s", self.rank, e)
            return []
        if isinstance(cmd, (msg.Task, msg.Batch)):
            tasks = [cmd] if isinstance(cmd, msg.Task) else list(cmd.tasks)
            try:
                # Every rank the command names enters the same scope: its host operations never match
                # what a failed command left behind (Note [Scoped epochs] in gfcoll/world.py).
                with self.world.scope(tasks[0].task_id % (2**31 - 1) + 1):
                    return self.run_task(cmd) if isinstance(cmd, msg.Task) else self.run_batch(cmd)
            except Exception as e:  # reported to the engine; the worker keeps serving
                log.error("rank %d: task(s) %s failed: %s", self.rank, [t.task_id for t in tasks], e)
                # The requests' state here may be half-updated: drop it (a re-run starts afresh). A
                # batch ran as one, so every member fails (or re-runs).
                for t in tasks:
                    self.held.pop(t.request.request_id, None)
                return [
                    msg.Failed(
                        rank=self.rank,
                        task_id=t.task_id,
                        reason=f"rank {self.rank}: {type(e).__name__}: {e}",
                        trace=traceback.format_exc(limit=8),
                        peer=isinstance(e, gfcoll.GfcollTimeoutError),
                    )
                    for t in tasks
                ]
        raise ValueError(f"unknown command {type(cmd).__name__}")

    # -- one batched chunk -----------------------------------------------------------------------
    def run_batch(self, cmd: msg.Batch) -> list[msg.Event]:
        """Each member's reshard (Note [Reshard execution]), in member order on every rank the batch
        names, then one model.denoise_batch over the members (Note [Batched steps]); StepDone and Done
        per member task."""
        from gfdit.models.batch import BatchItem  # noqa: PLC0415 - torch-side, like the model

        tasks = cmd.tasks
        ranks: tuple[int, ...] = tuple(tasks[0].ranks)
        member = self.rank in ranks
        t0 = time.perf_counter()
        e0 = self._mark()
        moved = []
        for t in tasks:
            rid = t.request.request_id
            held = self.held.setdefault(rid, Held())
            moved.append(self.reshard(t, held, ranks, member))
            if not member and held.latents is None and not held.cond:
                self.held.pop(rid, None)
        e1 = self._mark()
        t1 = time.perf_counter()
        if not member:
            return []
        group = self.world.group(list(ranks)) if len(ranks) > 1 else None
        helds = [self.held[t.request.request_id] for t in tasks]
        items = [
            BatchItem(t.request, h.latents, h.cond, t.start, t.end) for t, h in zip(tasks, helds, strict=True)
        ]
        steps: list[tuple[int, int, object]] = []  # (member, steps done, its CUDA event or None)
        report = self.notify is not None and self.rank == ranks[0]

        def on_step(k: int, step: int) -> None:
            steps.append((k, step, self._mark()))
            if steps[-1][2] is None:  # CPU: the step is done now
                self.notify(msg.StepDone(rank=self.rank, task_id=tasks[k].task_id, step=step))

        lo, hi = helds[0].lo, helds[0].hi
        outs = self.model.denoise_batch(items, (lo, hi), group, on_step=on_step if report else None)
        for h, x in zip(helds, outs, strict=True):
            h.latents = x
        for k, step, event in steps:  # CUDA: each step reported once its own work is done
            if event is not None:
                event.synchronize()
                self.notify(msg.StepDone(rank=self.rank, task_id=tasks[k].task_id, step=step))
        reshard_s, compute_s = self._elapsed(t0, t1, e0, e1)
        return [
            msg.Done(
                rank=self.rank,
                task_id=t.task_id,
                bytes_moved=b,
                reshard_s=reshard_s,
                compute_s=compute_s,
                batch_size=len(tasks),
            )
            for t, b in zip(tasks, moved, strict=True)
        ]

    # -- one task --------------------------------------------------------------------------------
    def run_task(self, cmd: msg.Task) -> list[msg.Event]:
        req = cmd.request
        rid = req.request_id
        kind = cmd.kind
        ranks: tuple[int, ...] = tuple(cmd.ranks)
        member = self.rank in ranks
        held = self.held.setdefault(rid, Held())

        t0 = time.perf_counter()
        e0 = self._mark()
        moved = self.reshard(cmd, held, ranks, member)
        e1 = self._mark()  # no wait: the task's compute is enqueued behind the reshard on the same stream
        t1 = time.perf_counter()
        if not member:
            if held.latents is None and not held.cond:
                self.held.pop(rid, None)
            return []

        cond_meta = result = latents = None
        group, pair = self._groups(cmd)
        if kind is TaskKind.ENCODE:
            held.cond = self.model.encode(req)
            full = self.model.init_latents(req)
            lo, hi = even_slices(full.shape[1], len(ranks))[ranks.index(self.rank)]
            held.latents, held.lo, held.hi = full[:, lo:hi].contiguous(), lo, hi
            cond_meta = tuple(
                msg.TensorMeta(k, tuple(v.shape), str(v.dtype).removeprefix("torch."))
                for k, v in sorted(held.cond.items())
            )
        elif kind is TaskKind.DENOISE:
            steps: list[tuple[int, object]] = []  # (steps done, its CUDA event or None)
            report = self.notify is not None and self.rank == ranks[0]

            def on_step(step: int) -> None:
                steps.append((step, self._mark()))
                if steps[-1][1] is None:  # CPU: the step is done now
                    self.notify(msg.StepDone(rank=self.rank, task_id=cmd.task_id, step=step))

            extra = {} if pair is None else {"cfg_group": pair}  # models without CFG need not take it
            held.latents = self.model.denoise(
                held.latents, (held.lo, held.hi), held.cond, cmd.start, cmd.end, req, group=group,
                on_step=on_step if report else None, **extra,
            )  # fmt: skip
            for step, event in steps:  # CUDA: each step reported once its own work is done
                if event is not None:
                    event.synchronize()
                    self.notify(msg.StepDone(rank=self.rank, task_id=cmd.task_id, step=step))
        elif kind is TaskKind.DECODE:
            # Only ranks[0] decodes: the other members send it their slices (a gather, not an
            # all-gather; the cost model charges DECODE as serial, gfdit.cost).
            # It returns the result itself: the request ends here (no separate stage to hand it over).
            full = self._gather_latent(cmd, held, ranks)
            self.held.pop(rid, None)
            if full is not None:
                pixels = self.model.decode(full, req)
                result = msg.Array.from_numpy(pixels.cpu().numpy())
                if cmd.keep_latents:
                    latents = msg.Array.from_numpy(full.float().cpu().numpy())
        else:
            raise ValueError(f"unknown task kind {kind!r}")
        reshard_s, compute_s = self._elapsed(t0, t1, e0, e1)
        return [
            msg.Done(
                rank=self.rank,
                task_id=cmd.task_id,
                bytes_moved=moved,
                reshard_s=reshard_s,
                compute_s=compute_s,
                cond_meta=cond_meta,
                result=result,
                latents=latents,
            )
        ]

    def _elapsed(self, t0: float, t1: float, e0, e1) -> tuple[float, float]:
        """(reshard, compute) seconds of the task begun at t0 / e0 whose compute was enqueued at
        t1 / e1, once its work is done: stream time between the marks on CUDA (waiting for this task's
        work only, not the device: "done" means its results exist), wall time on CPU."""
        e2 = self._mark()
        if e2 is not None:
            e2.synchronize()
        t2 = time.perf_counter()
        if e0 is None:
            return t1 - t0, t2 - t1
        return e0.elapsed_time(e1) / 1e3, e1.elapsed_time(e2) / 1e3

    def _groups(self, cmd: msg.Task):
        """(SP group, CFG pair) of this member: the whole group and no pair; or, CFG-parallel, its
        half and the pair (conditional member first) of the ranks at its position in the two halves
        (Note [CFG-parallel] in gfdit/models/base.py). A group of one is None."""
        ranks = list(cmd.ranks)
        if not cmd.cfg:
            return (self.world.group(ranks) if len(ranks) > 1 else None), None
        k = len(ranks) // 2
        i = ranks.index(self.rank)
        half = ranks[:k] if i < k else ranks[k:]
        pair = [ranks[i % k], ranks[k + i % k]]
        return (self.world.group(half) if k > 1 else None), self.world.group(pair)

    def _gather_latent(self, cmd: msg.Task, held: Held, ranks: tuple[int, ...]) -> torch.Tensor | None:
        """DECODE: the whole latent on ranks[0] (returned there; None elsewhere), each member's
        slice sent point to point to it in one batch."""
        if len(ranks) == 1:
            return held.latents
        if self.rank != ranks[0]:
            self.world.batch_p2p([gfcoll.P2P("send", held.latents.contiguous(), ranks[0])])
            return None
        lat = held.latents
        full = torch.empty((1, cmd.dim_size, lat.shape[2]), dtype=lat.dtype, device=lat.device)
        full[:, held.lo : held.hi].copy_(lat)
        slices = even_slices(cmd.dim_size, len(ranks))
        ops = [
            gfcoll.P2P("recv", full[:, lo:hi], r)
            for r, (lo, hi) in zip(ranks, slices, strict=True)
            if r != self.rank
        ]
        self.world.batch_p2p(ops)
        return full

    def reshard(self, cmd: msg.Task, held: Held, ranks: tuple[int, ...], member: bool) -> int:
        """This rank's part of Note [Reshard execution] (every rank the command names calls it).
        Returns the bytes it received."""
        me = self.rank
        ops: list[gfcoll.P2P] = []
        received = 0
        kind = cmd.kind
        transfers = cmd.transfers
        new = None
        if kind in (TaskKind.DENOISE, TaskKind.DECODE) and (transfers or cmd.local):
            # The latent moves onto an even split over `ranks`.
            if member:
                lo, hi = cmd.latent_slice(me)
                if (
                    held.latents is not None
                    and (held.lo, held.hi) == (lo, hi)
                    and not any(t[1] == me for t in transfers)
                ):
                    new = held.latents
                else:
                    like = held.latents if held.latents is not None else None
                    c, dtype = cmd.token_dim, cmd.latent_dtype
                    new = torch.empty((1, hi - lo, c), dtype=getattr(torch, dtype), device=self._device(like))
                    for _src, dst, a, b in cmd.local:
                        if dst == me:
                            new[:, a - lo : b - lo].copy_(held.latents[:, a - held.lo : b - held.lo])
            for src, dst, a, b in transfers:
                if src == me and dst != me:
                    ops.append(gfcoll.P2P("send", held.latents[:, a - held.lo : b - held.lo], dst))
                elif dst == me and src != me:
                    view = new[:, a - lo : b - lo]
                    ops.append(gfcoll.P2P("recv", view, src))
                    received += view.numel() * view.element_size()
        for src, dst in cmd.cond_sends:
            for meta in cmd.cond_meta:
                name, shape, dtype = meta.name, meta.shape, meta.dtype
                if src == me:
                    ops.append(gfcoll.P2P("send", held.cond[name].contiguous(), dst))
                elif dst == me:
                    t = torch.empty(shape, dtype=getattr(torch, dtype), device=self.world.device)
                    held.cond[name] = t
                    ops.append(gfcoll.P2P("recv", t, src))
                    received += t.numel() * t.element_size()
        if ops:
            self.world.batch_p2p(ops)
        if kind in (TaskKind.DENOISE, TaskKind.DECODE) and (transfers or cmd.local):
            if member:
                held.latents, held.lo, held.hi = (new, *cmd.latent_slice(me))
            else:
                held.latents = None
        return received

    def _device(self, like: torch.Tensor | None) -> torch.device:
        return like.device if like is not None else self.world.device
