"""gfdit.Engine: elastic DiT serving as a library, under torchrun.

    world = gfcoll.init()
    engine = gfdit.Engine(world, "tiny-flux", policy="edf-best-fit")   # every rank
    if world.rank == 0:
        handle = engine.submit(Request("r1", "tiny-flux", "a cat", width=64, height=64))
        images = handle.result(timeout=60).images
    engine.close()                                                      # every rank

Every rank runs a Worker (gfdit.runtime.worker) in a thread of its own; rank 0 also runs the
control thread: the Scheduler with its Policy (pure Python), fed by submissions and by the
workers' events, dispatching assignments. The engine is split by job:
  - the handle API (gfdit.runtime.handle): RequestHandle, Progress, Result, the Status vocabulary;
  - the control channel (gfdit.runtime.channel): ZeroMQ to the other ranks, their liveness, the
    in-process link to rank 0's own worker, and the wake-ups (Note [Event-driven control loop]);
  - request placement (gfdit.runtime.placement): where each request's data lives, held in its
    record (`_Tracked`);
  - the watchdog (gfdit.runtime.watchdog): tasks in flight, their limits, hung ranks;
and this module, which wires them: the control loop and what each event does.
Tensors never travel over ZeroMQ, except the finished images on their way to the caller. Every
message is one of gfdit.runtime.messages' typed Structs (Note [Control-plane messages]).

Note [Surviving a lost rank]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A non-zero rank is lost when its liveness connection closes (its process died, Note [Worker
liveness]) or when the watchdog finds it hung (Note [Hung ranks]). The engine then
  1. removes it from the scheduler for good (no policy sees it free again) and tells every
     surviving rank's gfcoll world to exclude it (msg.Exclude, rank 0's worker included; Note
     [Excluded ranks] in gfcoll.world), so operations with it fail at once and groups without it
     keep working; with nccl every survivor's worker then shrinks the communicator to the survivors
     (World.shrink_nccl, Note [NCCL shrink]; not yet run on GPUs);
  2. re-runs from its first task every unfinished request whose state it held (a latent slice,
     the last copy of the conditioning: Placement.needs_rerun) or whose task in
     flight it was a member of; the request keeps its seed, so the re-run produces the same
     image. The survivors drop what they held of it (msg.Release). Members of an abandoned task
     that have not reported stay fenced (busy) until they do;
  3. keeps serving on the others: /health says "degraded" and names the rank.
A member's task may also fail because a peer died or hung (gfcoll's peer-died or timeout error,
msg.Failed.peer) before the rank is known lost: that request re-runs too (at most
kMaxReruns times, then it fails). Rank 0 (engine + HTTP) is the one single point of failure.
A control-thread exception (a bug) fails every unfinished request with the reason and turns
`health()` unavailable: the thread never dies silently, and nothing is dispatched after it.

Note [Task log]
~~~~~~~~~~~~~~~
With `task_log` (`gfdit serve --task-log FILE`) rank 0 writes one JSON line per task that finished:
the request (id, arrival on the engine clock, shape), the task (kind, step range), its group, its
batch size and CFG-parallel flag, and when it was dispatched and reported done (engine clock, the
same as the arrival) with the part spent resharding. It is what the simulator's trace is to a
simulation (gfdit.sim.TraceEntry): `gfdit eval fidelity` keeps one per policy and compares them task
by task (gfdit.eval.tasks). Failed and abandoned tasks are not logged. The control thread writes
it, line-buffered (a few microseconds a task); an I/O error turns it off with one log line.
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import json
import logging
import os
import random
import secrets
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

import torch
import zmq

import gfcoll
from gfdit.batching import kBatchedFamilies
from gfdit.cost import AnalyticCostModel, apply_profile, read_profile
from gfdit.policy import Policy, make_policy
from gfdit.request import Request, RequestState
from gfdit.scheduler import Scheduler, kDefaultChunkSteps
from gfdit.tasks import TaskKind, TaskTimings

from . import auth
from . import messages as msg
from .channel import ControlChannel, RankLost, RemoteLink
from .fast import apply as apply_fast_steps
from .fast import graph_pool_stats
from .handle import RequestHandle, Result, Status
from .placement import Placement
from .watchdog import Inflight, Watchdog
from .worker import Worker

__all__ = ["Engine", "EngineHealth", "RankInfo", "kMaxReruns"]

log = logging.getLogger("gfdit.engine")

kMaxReruns = 3  # re-runs of one request after peer failures before it fails (Note [Surviving a lost rank])
kHungGraceS = 5.0  # added to gfcoll's timeout for the watchdog's grace (Note [Hung ranks])


@dataclass
class RankInfo:
    """One rank as /health shows it."""

    rank: int  # global rank
    pid: int  # its process id (0 until it reported ready)
    state: str  # "starting" | "up" | "lost" | "hung"
    reason: str = ""  # why lost or hung
    requests: int = 0  # unfinished requests whose latent (or a slice of it) lives there


@dataclass
class EngineHealth:
    """What the engine says about itself (rank 0)."""

    status: str  # "ok" (all ranks up), "degraded" (some lost or hung, still serving), "unavailable"
    reason: str  # "ok" or why not
    ranks: list[RankInfo]  # every rank, 0 included

    @property
    def serving(self) -> bool:
        return self.status in ("ok", "degraded")


@dataclass
class _Tracked:
    """Rank 0's record of one unfinished request."""

    handle: RequestHandle
    placement: Placement = field(default_factory=Placement)  # where its data lives
    reshard_s: float = 0.0  # seconds its tasks spent moving state, so far
    bytes_moved: int = 0  # bytes its reshards received, so far


def _broadcast_int(world: gfcoll.World, value: int) -> int:
    dev = "cpu" if world.device.type == "cpu" else world.device
    t = torch.tensor([value], dtype=torch.int64, device=dev)
    world.group(list(range(world.size))).broadcast(t, root=0)
    return int(t.item())


def _launch_secret(world: gfcoll.World, one_node: bool) -> bytes:
    """Every rank's copy of the launch secret (Note [Control-plane authentication]). Collective."""
    secret = auth.load_secret()
    if _broadcast_int(world, int(secret is not None)):  # rank 0 has one: every rank must have it
        if secret is None:
            raise auth.SecretError(
                f"rank {world.rank}: rank 0 has a launch secret but this rank has neither "
                f"{auth.kSecretEnv} nor {auth.kSecretFileEnv}"
            )
        return secret
    if not one_node:
        raise auth.SecretError(
            f"ranks on several nodes need a launch secret: set {auth.kSecretEnv} (e.g. `openssl rand -hex "
            f"32`) or {auth.kSecretFileEnv} (a mode-0600 file) in every rank's environment"
        )
    if secret is not None:
        log.warning("rank %d: ignoring this rank's launch secret: rank 0 has none", world.rank)
    # One node, no secret given: rank 0 makes one; gfcoll carries it (shared memory of this job only).
    dev = "cpu" if world.device.type == "cpu" else world.device
    t = torch.zeros(32, dtype=torch.uint8)
    if world.rank == 0:
        t = torch.frombuffer(bytearray(secrets.token_bytes(32)), dtype=torch.uint8)
    t = t.to(dev)
    world.group(list(range(world.size))).broadcast(t, root=0)
    return bytes(t.cpu().numpy().tobytes())


kWorkerThreadName = "gfdit-worker"  # every rank's task-running thread, at the OS level too
kPrSetName = 15  # prctl(2) option: the calling thread's name


def name_os_thread(name: str) -> None:
    """Gives the calling thread `name` (at most 15 bytes) at the OS level, where `top -H`, /proc and
    `gfdit eval fidelity` (gfdit.eval.fidelity.measured_host_cpu: the CPU that is not the workers')
    see it; Python before 3.14 names only its own Thread objects. Linux only; elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(kPrSetName, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):  # no libc symbol: a name is only a convenience
        pass


class Engine:
    """Collective: every rank constructs it with the same arguments and calls close().

    `keep_finished`: how many finished requests the scheduler keeps queryable (the newest; None: all).
    A server runs for days: the bound keeps its memory and each scheduling decision independent of
    the number of requests served. Results live in the RequestHandle, not there.
    `task_timeout_factor`, `task_timeout_floor_s`: a task running longer than the larger of the floor
    and factor x its estimated time, plus gfcoll's timeout, has hung members (Note [Hung ranks]); a
    floor of None disables the check.
    `cost_profile`: a file written by `gfdit profile` for this model, loaded into the scheduler's cost
    model (rank 0) so that its estimates start from this machine's measurements.
    `control_host`: the address rank 0's internal ports listen on and the ranks connect to (Note
    [Internal addresses] in gfdit.runtime.auth); default: loopback on one node, MASTER_ADDR's interface
    across nodes.
    `compile`, `cuda_graphs`, `warm_sizes` ([(width, height, frames)]), `graph_memory_bytes`: the fast
    steps (gfdit.runtime.fast.apply; None: the device's defaults). `warm_batch_sizes`: the batch sizes
    warmed for each warm size (None: 1 to the policy's max_batch).
    `task_log`: a file rank 0 writes one JSON line to per finished task (Note [Task log])."""

    def __init__(
        self,
        world: gfcoll.World,
        model: str = "tiny-flux",
        policy: str | Policy = "fcfs-elastic",
        *,
        weights: str | None = None,
        chunk_steps: int = kDefaultChunkSteps,
        max_queue: int = 1024,
        dtype: torch.dtype | None = None,
        model_obj=None,
        keep_latents: bool = False,
        keep_finished: int | None = 4096,
        task_timeout_factor: float = 20.0,
        task_timeout_floor_s: float | None = 300.0,
        cost_profile: str | None = None,
        control_host: str | None = None,
        compile: str | None = None,
        cuda_graphs: bool | None = None,
        warm_sizes=(),
        graph_memory_bytes: int | None = None,
        warm_batch_sizes=None,
        task_log: str | None = None,
    ):
        from gfdit.models import load_model  # noqa: PLC0415 - heavy (diffusers)

        # Every rank reads the profile, so a bad file fails everywhere before any collective.
        profile = read_profile(cost_profile, model=model) if cost_profile is not None else None

        if not task_timeout_factor > 0 or (task_timeout_floor_s is not None and not task_timeout_floor_s > 0):
            raise ValueError(
                f"task timeout: factor and floor must be > 0, got {task_timeout_factor}, {task_timeout_floor_s}"
            )
        self.world = world
        self.model_name = model
        self.model = (
            model_obj
            if model_obj is not None
            else load_model(model, device=world.device, dtype=dtype, weights=weights)
        )
        # Every rank parses the policy, so a bad spec fails everywhere before any collective.
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        if warm_batch_sizes is None:  # the batch sizes the policy may form (Note [Batching in policies])
            batches = self.model.preset.family in kBatchedFamilies
            warm_batch_sizes = range(1, (getattr(self.policy, "max_batch", 1) if batches else 1) + 1)
        # Compiled and graph-replayed steps, warm sizes compiled now (gfdit.runtime.fast): every rank.
        self.fast = apply_fast_steps(
            self.model,
            compile=compile,
            cuda_graphs=cuda_graphs,
            warm_sizes=warm_sizes,
            graph_memory_bytes=graph_memory_bytes,
            warm_batch_sizes=list(warm_batch_sizes),
        )
        self.max_queue = max_queue
        self.task_timeout_factor = float(task_timeout_factor)
        self.task_timeout_floor_s = task_timeout_floor_s
        self.keep_latents = keep_latents  # return each request's final latent too (tests, debugging)
        self._closed = False
        self._ctx = zmq.Context()
        one_node = world.local_size == world.size
        master_addr = os.environ.get("MASTER_ADDR")
        keys = auth.derive_keys(_launch_secret(world, one_node))
        self.channel: ControlChannel | None = None
        if world.rank == 0:
            cost = AnalyticCostModel(graph_steps=self.fast.cuda_graphs)
            if profile is not None:
                apply_profile(cost, profile)
            self.scheduler = Scheduler(
                world.size,
                self.policy,
                cost,
                chunk_steps=chunk_steps,
                valid_degrees=lambda r, n: self.model.valid_sp_degrees(r, n),
                dim_size=self.model.seq_len,
                keep_finished=keep_finished,
            )
            bind_host = auth.control_bind_host(one_node, control_host, master_addr)
            self.channel = ControlChannel(self._ctx, keys, world.size, bind_host)
            self.watchdog = Watchdog(
                task_timeout_floor_s, self.task_timeout_factor, world.timeout_s + kHungGraceS
            )
            self._lock = threading.Lock()  # the scheduler, the records, the ranks' states
            self._tracked: dict[str, _Tracked] = {}  # unfinished requests
            self._handles: dict[str, RequestHandle] = {}  # every request's handle until forgotten
            self._task_ids = itertools.count()
            self._ranks = [RankInfo(r, os.getpid() if r == 0 else 0, "starting") for r in range(world.size)]
            self._fault: str | None = None  # a control-thread exception: the engine stopped serving
            # Note [Task log]; line-buffered: what a killed server wrote is whole lines
            self._task_log = open(task_log, "w", buffering=1) if task_log else None  # noqa: SIM115 (close)
            self._ready = threading.Event()
            self.num_reruns = 0  # requests re-run after a lost rank or a peer failure, in total
            self._t0 = time.monotonic()
        port = _broadcast_int(world, self.channel.port if world.rank == 0 else 0)
        live_port = _broadcast_int(world, self.channel.live_port if world.rank == 0 else 0)
        if world.rank == 0:
            self._link = self.channel.local
        else:
            addr = auth.control_connect_host(one_node, control_host, master_addr)
            self._link = RemoteLink(self._ctx, keys, world.rank, addr, port, live_port)
        self._worker = Worker(world, self.model, notify=self._link.send)
        self._worker_thread = threading.Thread(target=self._worker_loop, name="gfdit-worker", daemon=True)
        self._worker_thread.start()
        if world.rank == 0:
            self._control_thread = threading.Thread(
                target=self._control_loop, name="gfdit-control", daemon=True
            )
            self._control_thread.start()
            if not self._ready.wait(120):
                starting = [i.rank for i in self._ranks if i.state == "starting"]
                raise RuntimeError(f"workers {starting} never became ready")

    # -- public API (rank 0) ---------------------------------------------------------------------
    def now(self) -> float:
        """The engine clock (seconds since start): arrival and deadline times use it."""
        return time.monotonic() - self._t0

    def submit(self, request: Request) -> RequestHandle:
        """Validates and queues a request. Raises ValueError (before any rank does work) for an
        invalid request, RuntimeError when the engine is closed or cannot serve, OverflowError when
        the queue is full."""
        self._require_rank0("submit")
        if self._closed:
            raise RuntimeError("the engine is closed")
        h = self.health()
        if not h.serving:
            raise RuntimeError(f"the engine cannot serve: {h.reason}")
        if request.model != self.model_name:
            raise ValueError(f"model: this engine serves {self.model_name!r}, not {request.model!r}")
        self.model.validate(request)
        # Every rank draws the same noise from the seed: pick one now if the caller did not.
        seed = request.seed if request.seed is not None else random.randrange(2**31)
        request = dataclasses.replace(request, arrival_s=self.now(), seed=seed)
        with self._lock:
            if self.num_queued() >= self.max_queue:
                raise OverflowError(f"queue full ({self.max_queue} requests waiting)")
            self.scheduler.submit(request)
            handle = RequestHandle(self.channel.post, request)
            self._handles[request.request_id] = handle
            self._tracked[request.request_id] = _Tracked(handle)
        self.channel.post(msg.Wake())
        return handle

    def graph_pool_stats(self) -> dict[str, float]:
        """Rank 0's CUDA-graph pool of denoising steps (Note [Step graphs]); zeros without one."""
        return graph_pool_stats(self.model)

    def num_queued(self) -> int:
        # A snapshot (one C-level copy): other threads may submit while this counts.
        return sum(1 for rec in tuple(self.scheduler.active.values()) if rec.state is RequestState.QUEUED)

    def num_running(self) -> int:
        return sum(1 for rec in tuple(self.scheduler.active.values()) if rec.state is RequestState.RUNNING)

    def num_waiting(self) -> int:
        """Started requests between two tasks (at a rescheduling point, their state on their last group)."""
        return sum(1 for rec in tuple(self.scheduler.active.values()) if rec.state is RequestState.WAITING)

    def forget(self, request_id: str) -> None:
        """Drops the engine's reference to a finished request's handle, and so to its images: a
        long-running front end calls it once it holds the result. No-op while the request runs."""
        with self._lock:
            handle = self._handles.get(request_id)
            if handle is not None and handle.done():
                del self._handles[request_id]

    def health(self) -> EngineHealth:
        """Status, reason and every rank's state (Note [Surviving a lost rank]). Any thread."""
        holders = [t.placement.latent_ranks for t in tuple(self._tracked.values())]  # a snapshot
        ranks = [dataclasses.replace(i, requests=sum(1 for h in holders if i.rank in h)) for i in self._ranks]
        if self._fault is not None:
            return EngineHealth("unavailable", self._fault, ranks)
        gone = [i for i in ranks if i.state in ("lost", "hung")]
        starting = [i for i in ranks if i.state == "starting"]
        if starting and not self._ready.is_set():
            return EngineHealth(
                "unavailable", f"{len(ranks) - len(starting)} of {len(ranks)} workers ready", ranks
            )
        if gone:
            why = "; ".join(f"rank {i.rank} {i.state}: {i.reason}" for i in gone)
            return EngineHealth("degraded", why, ranks)
        return EngineHealth("ok", "ok", ranks)

    def healthy(self) -> tuple[bool, str]:
        """(serving, reason): True while the engine serves, degraded included."""
        h = self.health()
        return h.serving, h.reason

    def ranks_alive(self) -> int:
        """Ranks not lost or hung (rank 0 included)."""
        return sum(1 for i in self._ranks if i.state not in ("lost", "hung"))

    def close(self, timeout: float = 300.0) -> None:
        """Collective teardown. Rank 0 waits for the running tasks to end, then stops every worker."""
        if self._closed:
            return
        self._closed = True
        if self.world.rank == 0:
            self.channel.post(msg.Stop())
            self._control_thread.join(timeout)
        self._worker_thread.join(timeout)
        self._link.close()
        if self.world.rank == 0:
            self.channel.close()
            if self._task_log is not None:
                self._task_log.close()
        self._ctx.term()

    # -- the worker thread (every rank) -----------------------------------------------------------
    def _require_rank0(self, what: str) -> None:
        if self.world.rank != 0:
            raise RuntimeError(f"{what} is called on rank 0 only (this is rank {self.world.rank})")

    def _worker_loop(self) -> None:
        name_os_thread(kWorkerThreadName)
        link = self._link
        if isinstance(link, RemoteLink):
            try:
                link.start()
            except OSError as e:
                log.error("rank %d: liveness handshake with rank 0 failed: %s", self.world.rank, e)
                link.close()
                return
        try:
            link.send(msg.Ready(rank=self.world.rank, pid=os.getpid()))
            while True:
                cmd = link.recv()
                if isinstance(cmd, msg.Shutdown):
                    break
                for event in self._worker.handle(cmd):
                    link.send(event)
        finally:
            if isinstance(link, RemoteLink):
                link.close()  # Note [Worker liveness]: rank 0 sees this loop end

    # -- the control thread (rank 0) --------------------------------------------------------------
    def _control_loop(self) -> None:
        name_os_thread("gfdit-control")
        stopping = False
        while True:
            try:
                wait = self.watchdog.next_deadline_s(self.now())
                for item in self.channel.poll(1.0 if wait is None else wait):
                    if isinstance(item, msg.Stop):
                        stopping = True
                    elif isinstance(item, msg.Cancel):
                        self._cancel(item.request_id)
                    elif isinstance(item, RankLost):
                        self._on_rank_lost(item.rank, item.reason, "lost")
                    elif isinstance(item, msg.Wake):
                        pass  # the dispatch below
                    else:
                        self._on_event(item)
                for rank, inf in self.watchdog.hung(self.now()):
                    self._on_rank_lost(
                        rank,
                        f"task {inf.assignment.task} ran past its {inf.limit_s:.1f} s limit without reporting",
                        "hung",
                    )
                if self._step(stopping):
                    return
            except Exception as e:  # a bug: fail every unfinished request, /health 503 (Note above)
                self._on_fault(e)
                if stopping:
                    self._shutdown_workers()
                    return

    def _on_fault(self, e: Exception) -> None:
        why = f"engine error: {type(e).__name__}: {e}"
        log.error("control thread: %s\n%s", why, traceback.format_exc())
        with self._lock:
            if self._fault is None:
                self._fault = why
            for rid in list(self._tracked):
                self._fail_request(rid, why)

    def _step(self, stopping: bool) -> bool:
        """Dispatches what the policy decides; on shutdown, once nothing runs, fails what is left
        and stops the workers. True once shut down."""
        with self._lock:
            if not stopping:
                if self._fault is None:
                    self._dispatch()
                return False
            if self.watchdog.running() and self._fault is None:
                return False
            for rid in list(self._tracked):
                self._fail_request(rid, "engine shut down before the request finished")
        self._shutdown_workers()
        return True

    def _shutdown_workers(self) -> None:
        # A hung rank gets it too: if it ever comes back, it leaves; a dead one cannot read it.
        for info in self._ranks:
            if info.state != "lost":
                self.channel.send(info.rank, msg.Shutdown())

    def _dispatch(self) -> None:
        now = self.now()
        batches: dict[int, list] = {}
        for a in self.scheduler.schedule(now):
            if a.batch is None:
                self._start(a, now)
            else:
                batches.setdefault(a.batch, []).append(a)
        for members in batches.values():
            if len(members) == 1:
                self._start(members[0], now)
                continue
            # One msg.Batch to every rank any member's reshard names (Note [Batched chunks in the
            # scheduler]); each member is tracked as its own task.
            cmds, involved = [], set()
            for a in members:
                cmd, inv = self._command(a, now)
                cmds.append(cmd)
                involved |= inv
            batch = msg.Batch(tasks=tuple(cmds))
            for r in sorted(involved):
                self.channel.send(r, batch)

    def _start(self, a, now: float) -> None:
        cmd, involved = self._command(a, now)
        for r in sorted(involved):
            self.channel.send(r, cmd)

    def _command(self, a, now: float) -> tuple[msg.Task, set[int]]:
        """The command of one assignment, its task tracked (watchdog, handle) as dispatched now, and
        the ranks it goes to."""
        task, ranks = a.task, tuple(a.ranks)
        rid = task.request_id
        rec = self.scheduler.record(rid)
        tracked = self._tracked[rid]
        fields, involved = tracked.placement.command_fields(task.kind, ranks, a.reshard)
        cmd = msg.Task(
            task_id=next(self._task_ids),
            request=rec.request,
            kind=task.kind,
            start=task.start,
            end=task.end,
            ranks=ranks,
            dim_size=rec.dim_size,
            token_dim=self.model.token_dim,
            latent_dtype="float32",  # the latent state is fp32 whatever the model's dtype
            keep_latents=self.keep_latents,
            cfg=a.cfg,
            **fields,
        )
        expected_s = max(0.0, (rec.expected_end_s or now) - now)
        self.watchdog.start(cmd.task_id, a, now, expected_s, ranks)
        tracked.handle.update(state=Status.IN_PROGRESS, degree=len(ranks), task=str(task))
        return cmd, set(involved)

    def _on_event(self, ev: msg.Event) -> None:
        with self._lock:
            if isinstance(ev, msg.Ready):
                info = self._ranks[ev.rank]
                if info.state == "starting":
                    info.state, info.pid = "up", ev.pid
                if all(i.state != "starting" for i in self._ranks):
                    self._ready.set()
                return
            inf = self.watchdog.get(ev.task_id)
            if inf is None:
                return  # a late report of a task already settled
            if isinstance(ev, msg.StepDone):
                a = inf.assignment
                tracked = self._tracked.get(a.task.request_id)
                if tracked is not None and not inf.abandoned and ev.rank == a.ranks[0]:
                    tracked.handle.update(
                        state=Status.IN_PROGRESS, step=ev.step, degree=len(a.ranks), task=str(a.task)
                    )
                return
            if ev.rank not in inf.waiting:
                log.warning(
                    "control: dropped a report of task %d from rank %d, not a member", ev.task_id, ev.rank
                )
                return
            inf.waiting.discard(ev.rank)
            if inf.abandoned:
                self.scheduler.unfence(ev.rank)
                if not inf.waiting:
                    self.watchdog.pop(ev.task_id)
                return
            if isinstance(ev, msg.Failed):
                self._on_failed(inf, ev)
                return
            inf.events.append(ev)
            if not inf.waiting:
                self.watchdog.pop(ev.task_id)
                self._complete(inf)

    def _on_failed(self, inf: Inflight, ev: msg.Failed) -> None:
        a = inf.assignment
        rid = a.task.request_id
        log.warning("task %s failed: %s\n%s", a.task, ev.reason, ev.trace)
        reruns = self.scheduler.record(rid).num_reruns
        if ev.peer and reruns < kMaxReruns:
            self._rerun(rid, f"a peer failed during {a.task}: {ev.reason}")
        elif a.batch is not None and reruns < kMaxReruns:
            # Which member made the batch fail is unknown: each re-runs alone (Note [Batching in
            # policies]), so only a faulty one fails.
            self._rerun(rid, f"its batch failed during {a.task}: {ev.reason}; re-runs unbatched", solo=True)
        else:
            self._fail_request(rid, ev.reason)

    def _complete(self, inf: Inflight) -> None:
        a = inf.assignment
        task, rid = a.task, a.task.request_id
        now = self.now()
        reshard_s = min(max(e.reshard_s for e in inf.events), now - inf.start_s)
        self.scheduler.on_task_done(task, a.ranks, TaskTimings(inf.start_s, now, reshard_s))
        rec = self.scheduler.record(rid)
        if self._task_log is not None:
            self._log_task(rec, a, inf.start_s, now, reshard_s)
        tracked = self._tracked[rid]
        tracked.reshard_s += reshard_s
        tracked.bytes_moved += sum(e.bytes_moved for e in inf.events)
        cond_meta = next((e.cond_meta for e in inf.events if e.cond_meta is not None), None)
        tracked.placement.on_done(task.kind, tuple(a.ranks), cond_meta)
        handle = tracked.handle
        step = task.end if task.kind is TaskKind.DENOISE else handle.progress().step
        handle.update(state=Status.IN_PROGRESS, step=step, degree=len(a.ranks), task=str(task))
        if rec.state is RequestState.DONE:
            images = next(e.result for e in inf.events if e.result is not None).to_numpy()
            result = Result(
                images=images,
                latency_s=now - rec.request.arrival_s,
                queue_s=(rec.first_start_s or now) - rec.request.arrival_s,
                reshard_s=tracked.reshard_s,
                bytes_moved=tracked.bytes_moved,
                num_reshards=rec.num_reshards,
                groups=[(str(t.task), t.ranks) for t in rec.history if t.outcome == "done"],
                chunk_batch_sizes=[
                    t.batch_size
                    for t in rec.history
                    if t.outcome == "done" and t.task.kind is TaskKind.DENOISE
                ],
                latents=next((e.latents.to_numpy() for e in inf.events if e.latents is not None), None),
                num_reruns=rec.num_reruns,
                chunk_cfg=[
                    t.cfg for t in rec.history if t.outcome == "done" and t.task.kind is TaskKind.DENOISE
                ],
            )
            self._release(rid)
            handle.finish(result, None, Status.COMPLETED)
        elif rec.state is RequestState.CANCELLED:
            self._release(rid)
            handle.finish(None, "cancelled", Status.CANCELLED)

    def _log_task(self, rec, a, start_s: float, end_s: float, reshard_s: float) -> None:
        """Note [Task log]: one finished task as a JSON line."""
        r, task = rec.request, a.task
        line = {
            "request_id": r.request_id, "arrival_s": r.arrival_s, "width": r.width, "height": r.height,
            "num_frames": r.num_frames, "kind": task.kind.name, "start": task.start, "end": task.end,
            "ranks": list(a.ranks), "batch_size": rec.history[-1].batch_size, "cfg": a.cfg,
            "dispatch_s": start_s, "end_s": end_s, "reshard_s": reshard_s,
        }  # fmt: skip
        try:
            self._task_log.write(json.dumps(line) + "\n")
        except OSError as e:  # a full disk must not stop serving: the log stops instead
            log.error("task log: %s; no more tasks are logged", e)
            self._task_log = None

    def _cancel(self, rid: str) -> None:
        with self._lock:
            if rid not in self._tracked:
                return  # ended (or forgotten) already
            rec = self.scheduler.record(rid)
            self.scheduler.cancel(rid, self.now())
            if rec.state is RequestState.CANCELLED:
                handle = self._tracked[rid].handle
                self._release(rid)
                handle.finish(None, "cancelled", Status.CANCELLED)

    def _fail_request(self, rid: str, reason: str) -> None:
        """Ends a request as failed, wherever it is (the scheduler too); members of its task in
        flight stay fenced until they report."""
        tracked = self._tracked.get(rid)
        if tracked is None:
            return
        try:
            self.scheduler.fail(rid, reason, self.now(), fence=self._abandon(rid))
        except Exception:  # the scheduler's own bug must not keep the caller from its answer
            log.exception("failing request %s", rid)
        finally:
            self._release(rid)
            tracked.handle.finish(None, reason, Status.FAILED)

    def _abandon(self, rid: str) -> set[int]:
        """Marks the request's tasks in flight abandoned (their reports are ignored; one nobody still
        runs is forgotten) and returns the ranks still running them, to fence."""
        fence: set[int] = set()
        for inf in self.watchdog.running():
            if inf.assignment.task.request_id == rid:
                inf.abandoned = True
                fence |= inf.waiting
                if not inf.waiting:
                    self.watchdog.pop(inf.task_id)
        return fence

    def _release(self, rid: str) -> None:
        tracked = self._tracked.pop(rid, None)
        if tracked is None:
            return
        for r in sorted(tracked.placement.touched):
            if self._ranks[r].state == "up":
                self.channel.send(r, msg.Release(request_id=rid))

    # -- surviving a lost rank (Note [Surviving a lost rank]) ----------------------------------------
    def _rerun(self, rid: str, reason: str, *, solo: bool = False) -> None:
        """Restarts a request from its first task; its task in flight (if any) is abandoned. `solo`:
        it is never batched again."""
        tracked = self._tracked[rid]
        self.scheduler.rerun(rid, self.now(), reason, fence=self._abandon(rid), solo=solo)
        if self.scheduler.record(rid).state.is_terminal:  # its cancel was asked meanwhile
            self._release(rid)
            tracked.handle.finish(None, "cancelled", Status.CANCELLED)
            return
        for r in sorted(tracked.placement.touched):
            if self._ranks[r].state == "up":
                self.channel.send(r, msg.Release(request_id=rid))
        tracked.placement = Placement()
        tracked.reshard_s, tracked.bytes_moved = 0.0, 0
        self.num_reruns += 1
        tracked.handle.update(state=Status.IN_PROGRESS, step=0, task=f"re-run: {reason}")

    def _on_rank_lost(self, rank: int, reason: str, state: str) -> None:
        with self._lock:
            info = self._ranks[rank]
            if info.state in ("lost", "hung"):
                return
            info.state, info.reason = state, reason
            log.error("rank %d %s: %s; serving on the others", rank, state, reason)
            self.scheduler.lose_rank(rank)
            self.world.exclude([rank])
            lost = tuple(sorted(i.rank for i in self._ranks if i.state in ("lost", "hung")))
            for i in self._ranks:  # rank 0's worker too: it takes part in the nccl shrink
                if i.state == "up":
                    self.channel.send(i.rank, msg.Exclude(ranks=lost))
            why = f"rank {rank} {state}: {reason}"
            for inf in self.watchdog.all():
                if rank in inf.waiting:
                    inf.waiting.discard(rank)
                    if inf.abandoned and not inf.waiting:
                        self.watchdog.pop(inf.task_id)
            running = {
                inf.assignment.task.request_id
                for inf in self.watchdog.running()
                if rank in inf.assignment.ranks
            }
            for rid, tracked in list(self._tracked.items()):
                if rid in running or tracked.placement.needs_rerun(rank):
                    if self.scheduler.record(rid).num_reruns >= kMaxReruns:
                        self._fail_request(rid, why)
                    else:
                        self._rerun(rid, why)
                else:
                    tracked.placement.drop_rank(rank)
            if not self.scheduler.free_ranks and not self.watchdog.running() and self._tracked:
                log.error("no rank left to serve on")
