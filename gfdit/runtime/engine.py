"""gfdit.Engine: elastic DiT serving as a library, under torchrun.

    world = gfcoll.init()
    engine = gfdit.Engine(world, "tiny-flux", policy="edf-best-fit")   # every rank
    if world.rank == 0:
        handle = engine.submit(Request("r1", "tiny-flux", "a cat", width=64, height=64))
        images = handle.result(timeout=60).images
    engine.close()                                                      # every rank

Every rank runs a Worker (gfdit.runtime.worker) in a thread of its own; rank 0 also runs the
control loop: the Scheduler with its Policy (pure Python), fed by submissions and by the workers'
events, dispatching assignments over ZeroMQ (one ROUTER on rank 0, one DEALER per worker).
Tensors never travel over ZeroMQ, except the finished images on their way to the caller. Every
message is one of gfdit.runtime.messages' typed Structs (Note [Control-plane messages]); every
connection to rank 0's internal ports proves the launch secret first (Note [Control-plane
authentication] in gfdit.runtime.auth), and they listen on loopback or the ranks' interface only
(Note [Internal addresses]).

Note [Worker liveness]
~~~~~~~~~~~~~~~~~~~~~~
Besides its DEALER, every rank opens one plain TCP connection to a listener on rank 0 and proves
its rank over it (rank 0's nonce, answered with the rank and an HMAC of both under the launch
secret's liveness key); a connection that has not proven a rank counts for nothing, and one that
fails or takes longer than kLivenessAuthTimeoutS is closed and logged. A proven connection stays
open, silent, for as long as the rank's worker loop runs. When a worker process dies (or its
worker loop ends) the kernel closes the connection, and rank 0's control loop, which polls these
sockets with the ROUTER, sees end-of-file at once: no heartbeat timing to tune and nothing for a
busy worker to send. (ZeroMQ's ROUTER_NOTIFY would say the same, but it is a draft API that the
libzmq bundled with pyzmq leaves out.) A dead rank ends the engine's service: the gfcoll world
has lost a member, so every request not yet finished fails with the reason, `healthy()` reports
the rank, and `submit` refuses new work.

A hung (not dead) worker keeps its connection open, so rank 0 also watches the clock: a task that
runs past max(task_timeout_floor_s, task_timeout_factor x the cost model's estimate) marks the members
that have not reported as lost, with the same consequences. Their threads cannot be stopped from
here, and their gfcoll peers may be stuck in a collective with them, so the engine stops serving
rather than guess which ranks are still sound; /health then tells the orchestrator to restart the
job. (A member stuck in a collective is also ended by gfcoll's GFCOLL_TIMEOUT_S on its peers.)
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import queue
import random
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import zmq
import zmq.utils.monitor

import gfcoll
from gfdit.cost import AnalyticCostModel
from gfdit.policy import Policy, make_policy
from gfdit.profile import apply_profile, read_profile
from gfdit.request import Request, RequestState
from gfdit.scheduler import Scheduler
from gfdit.tasks import TaskKind, TaskTimings

from . import auth
from . import messages as msg
from .fast import apply as apply_fast_steps
from .fast import graph_pool_stats
from .worker import Worker

log = logging.getLogger("gfdit.engine")

# Liveness connections accepted but not yet proven at once; more are refused (a flood of strangers
# cannot exhaust rank 0's file descriptors). A real job has at most world_size of them, briefly.
kMaxUnprovenLiveness = 64


@dataclass
class Result:
    """A finished request."""

    images: np.ndarray  # uint8, [N, H, W, 3] (images) or [N, F, H, W, 3] (video frames)
    latency_s: float  # submit to result
    queue_s: float  # submit to first task start
    reshard_s: float  # time the request's tasks spent moving state between ranks (max over members)
    bytes_moved: int  # bytes its reshards received, over all ranks
    num_reshards: int  # tasks that first moved state
    groups: list[tuple[str, tuple[int, ...]]]  # (task, ranks) of every task, in order
    latents: np.ndarray | None = None  # the final latent [1, S, C] (float32), with keep_latents


@dataclass
class Progress:
    """One progress event (also kept as the handle's latest)."""

    state: str  # queued | in_progress | completed | failed | cancelled
    step: int  # denoising steps done
    num_steps: int  # total denoising steps
    degree: int  # size of the group of the last task
    task: str = ""  # the last task that finished or started


class RequestHandle:
    """Returned by Engine.submit (rank 0): progress, result, cancel."""

    def __init__(self, engine: Engine, request: Request):
        self.engine = engine
        self.request = request
        self.request_id = request.request_id
        self._done = threading.Event()
        self._result: Result | None = None
        self._error: str | None = None
        self._progress = Progress("queued", 0, request.num_inference_steps, 0)
        self._listeners: list[queue.Queue] = []
        self._lock = threading.Lock()

    def progress(self) -> Progress:
        return self._progress

    def subscribe(self, sink=None) -> queue.Queue:
        """A queue that receives every later Progress event; the last one has a terminal state, and
        once it is there, result() returns without waiting. `sink`: use this object instead of a new
        queue.Queue: anything with a put(progress) that never blocks (e.g. an adapter into an
        asyncio loop); it is called on the engine's control thread, and returned."""
        q = sink if sink is not None else queue.Queue()
        with self._lock:
            self._listeners.append(q)
            if self._done.is_set():
                q.put(self._progress)
        return q

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Result:
        """Blocks until the request ends. Raises RuntimeError with the reason if it failed or was
        cancelled, TimeoutError if `timeout` passes first."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} not finished after {timeout} s")
        if self._error is not None:
            raise RuntimeError(f"request {self.request_id} {self._progress.state}: {self._error}")
        return self._result

    def cancel(self) -> None:
        """Asks to cancel; the ranks are freed at the next rescheduling point."""
        self.engine._post(("cancel", self.request_id))

    @property
    def error(self) -> str | None:
        return self._error

    def _emit(self, p: Progress) -> None:
        with self._lock:
            self._progress = p
            for q in self._listeners:
                q.put(p)

    def _finish(self, result: Result | None, error: str | None, state: str) -> None:
        # Done before the terminal event goes out: a listener that gets it can call result() at once.
        with self._lock:
            self._result, self._error = result, error
            self._progress = p = dataclasses.replace(self._progress, state=state)
            self._done.set()
            for q in self._listeners:
                q.put(p)


@dataclass
class _Inflight:
    assignment: object  # the scheduler's Assignment
    start_s: float
    waiting: set[int]  # members that have not reported yet
    limit_s: float  # running longer than this: the members still waiting are hung
    events: list[msg.Done] = field(default_factory=list)


@dataclass
class _LiveConn:
    """An accepted liveness connection (Note [Worker liveness])."""

    sock: socket.socket
    peer: str  # the remote address, for the log
    nonce: bytes  # the challenge sent to it
    deadline: float  # monotonic time by which it must have proven a rank
    buf: bytes = b""  # its bytes so far, until it has proven a rank
    rank: int | None = None  # the rank it proved; None: a stranger so far


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


def _tcp_endpoint(host: str, port: int | None = None) -> str:
    h = f"[{host}]" if ":" in host else host
    return f"tcp://{h}" if port is None else f"tcp://{h}:{port}"


class Engine:
    """Collective: every rank constructs it with the same arguments and calls close().

    `keep_finished`: how many finished requests the scheduler keeps queryable (the newest; None: all).
    A server runs for days: the bound keeps its memory and each scheduling decision independent of
    the number of requests served. Results live in the RequestHandle, not there.
    `task_timeout_factor`, `task_timeout_floor_s`: a task running longer than the larger of the floor
    and factor x its estimated time is hung (Note [Worker liveness]); a floor of None disables it.
    `cost_profile`: a file written by `gfdit profile` for this model, loaded into the scheduler's cost
    model (rank 0) so that its estimates start from this machine's measurements.
    `control_host`: the address rank 0's internal ports listen on and the ranks connect to (Note
    [Internal addresses] in gfdit.runtime.auth); default: loopback on one node, MASTER_ADDR's interface
    across nodes.
    `compile`, `cuda_graphs`, `warm_sizes` ([(width, height, frames)]), `graph_memory_bytes`: the fast
    steps (gfdit.runtime.fast.apply; None: the device's defaults)."""

    def __init__(
        self,
        world: gfcoll.World,
        model: str = "tiny-flux",
        policy: str | Policy = "fcfs-elastic",
        *,
        weights: str | None = None,
        chunk_steps: int = 2,
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
        # Compiled and graph-replayed steps, warm sizes compiled now (gfdit.runtime.fast): every rank.
        self.fast = apply_fast_steps(
            self.model,
            compile=compile,
            cuda_graphs=cuda_graphs,
            warm_sizes=warm_sizes,
            graph_memory_bytes=graph_memory_bytes,
        )
        self.max_queue = max_queue
        self.task_timeout_factor = float(task_timeout_factor)
        self.task_timeout_floor_s = task_timeout_floor_s
        self.keep_latents = keep_latents  # return each request's final latent too (tests, debugging)
        self._closed = False
        self._ctx = zmq.Context()
        self._worker_sock = None  # the worker thread's DEALER (set by _worker_loop)
        self._worker = Worker(world, self.model, notify=self._notify)
        # Every rank parses the policy, so a bad spec fails everywhere before any collective.
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        one_node = world.local_size == world.size
        master_addr = os.environ.get("MASTER_ADDR")
        self._keys = auth.derive_keys(_launch_secret(world, one_node))
        bind_host = auth.control_bind_host(one_node, control_host, master_addr) if world.rank == 0 else ""
        port = 0
        if world.rank == 0:
            cost = AnalyticCostModel()
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
            # Note [Control-plane authentication]: CURVE, and a ZAP handler that admits the workers only.
            self._zap = auth.start_zap(self._ctx, self._keys)
            self._router = self._ctx.socket(zmq.ROUTER)
            self._router.setsockopt(zmq.LINGER, 0)
            self._router.setsockopt(zmq.MAXMSGSIZE, msg.kMaxMessageBytes)
            self._router.setsockopt(zmq.IPV6, int(":" in bind_host))
            self._keys.make_server(self._router)
            self._monitor = self._router.get_monitor_socket(
                zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            )
            port = self._router.bind_to_random_port(_tcp_endpoint(bind_host))
            self._inbox: queue.Queue = queue.Queue()
            self._lock = threading.Lock()
            self._handles: dict[str, RequestHandle] = {}
            self._inflight: dict[int, _Inflight] = {}
            self._task_ids = itertools.count()
            self._cond_holders: dict[str, set[int]] = {}
            self._cond_meta: dict[str, list] = {}
            self._pixel_meta: dict[str, tuple] = {}
            self._touched: dict[str, set[int]] = {}  # ranks that may hold some of a request's state
            self._stats: dict[str, dict] = {}  # per request: reshard seconds and bytes so far
            self._ready: set[int] = set()
            self._dead: dict[int, str] = {}
            self._t0 = time.monotonic()
            # Note [Worker liveness]: fd of an accepted connection -> its state.
            family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
            self._live_listener = socket.create_server((bind_host, 0), family=family)
            self._live_conns: dict[int, _LiveConn] = {}
        port = _broadcast_int(world, port)
        live_port = _broadcast_int(world, self._live_listener.getsockname()[1] if world.rank == 0 else 0)
        if world.rank == 0:
            addr = "127.0.0.1" if auth.is_wildcard(bind_host) else bind_host
        else:
            addr = auth.control_connect_host(one_node, control_host, master_addr)
        self._endpoint = _tcp_endpoint(addr, port)
        # Connected here, proven in the worker thread (rank 0's control thread answers it).
        self._live = socket.create_connection((addr, live_port), timeout=120)
        self._worker_thread = threading.Thread(target=self._worker_loop, name="gfdit-worker", daemon=True)
        self._worker_thread.start()
        if world.rank == 0:
            self._control_thread = threading.Thread(
                target=self._control_loop, name="gfdit-control", daemon=True
            )
            self._control_thread.start()
            deadline = time.monotonic() + 120
            while len(self._ready) < world.size:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"workers {sorted(set(range(world.size)) - self._ready)} never became ready"
                    )
                time.sleep(0.01)

    # -- public API (rank 0) ---------------------------------------------------------------------
    def now(self) -> float:
        """The engine clock (seconds since start): arrival and deadline times use it."""
        return time.monotonic() - self._t0

    def submit(self, request: Request) -> RequestHandle:
        """Validates and queues a request. Raises ValueError (before any rank does work) for an
        invalid request, RuntimeError when the engine is closed or the queue is full."""
        self._require_rank0("submit")
        if self._closed:
            raise RuntimeError("the engine is closed")
        if self._dead:
            raise RuntimeError(f"the engine lost a worker: {self.healthy()[1]}")
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
            handle = RequestHandle(self, request)
            self._handles[request.request_id] = handle
        self._post(("wake", None))
        return handle

    def graph_pool_stats(self) -> dict[str, float]:
        """Rank 0's CUDA-graph pool of denoising steps (Note [Step graphs]); zeros without one."""
        return graph_pool_stats(self.model)

    def num_queued(self) -> int:
        # A snapshot (one C-level copy): other threads may submit while this counts.
        return sum(1 for rec in tuple(self.scheduler.active.values()) if rec.state is RequestState.QUEUED)

    def num_running(self) -> int:
        return sum(1 for rec in tuple(self.scheduler.active.values()) if rec.state is RequestState.RUNNING)

    def forget(self, request_id: str) -> None:
        """Drops the engine's reference to a finished request's handle, and so to its images: a
        long-running front end calls it once it holds the result. No-op while the request runs."""
        with self._lock:
            handle = self._handles.get(request_id)
            if handle is not None and handle.done():
                del self._handles[request_id]

    def healthy(self) -> tuple[bool, str]:
        if self._dead:
            return False, "; ".join(f"rank {r}: {why}" for r, why in sorted(self._dead.items()))
        if len(self._ready) < self.world.size:
            return False, f"{len(self._ready)} of {self.world.size} workers ready"
        return True, "ok"

    def close(self, timeout: float = 300.0) -> None:
        """Collective teardown. Rank 0 waits for the running tasks to end, then stops every worker."""
        if self._closed:
            return
        self._closed = True
        if self.world.rank == 0:
            self._post(("shutdown", None))
            self._control_thread.join(timeout)
        self._worker_thread.join(timeout)
        self._live.close()
        if self.world.rank == 0:
            self._router.disable_monitor()
            self._monitor.close(0)
            self._router.close(0)
            self._zap.stop()
            for conn in [self._live_listener, *(c.sock for c in self._live_conns.values())]:
                conn.close()
        self._ctx.term()

    # -- internals -------------------------------------------------------------------------------
    def _require_rank0(self, what: str) -> None:
        if self.world.rank != 0:
            raise RuntimeError(f"{what} is called on rank 0 only (this is rank {self.world.rank})")

    def _post(self, item) -> None:
        self._inbox.put(item)

    def _prove_liveness(self) -> None:
        """Answers rank 0's nonce on the liveness connection (Note [Worker liveness])."""
        nonce = b""
        while len(nonce) < auth.kLivenessNonceBytes:
            chunk = self._live.recv(auth.kLivenessNonceBytes - len(nonce))  # bounded: the socket's timeout
            if not chunk:
                raise ConnectionError("rank 0 closed the liveness connection before its challenge")
            nonce += chunk
        self._live.sendall(auth.liveness_proof(self._keys.liveness, nonce, self.world.rank))

    def _notify(self, event: msg.Event) -> None:
        """The worker's events sent while a task runs: on the worker thread, over its socket."""
        self._worker_sock.send(msg.encode(event))

    def _worker_loop(self) -> None:
        try:
            self._prove_liveness()
        except OSError as e:
            log.error("rank %d: liveness handshake with rank 0 failed: %s", self.world.rank, e)
            self._live.close()
            return
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, str(self.world.rank).encode())
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.MAXMSGSIZE, msg.kMaxMessageBytes)
        self._keys.make_client(sock)
        sock.connect(self._endpoint)
        self._worker_sock = sock  # used by this thread only (the worker's notify runs on it)
        sock.send(msg.encode(msg.Ready(rank=self.world.rank)))
        try:
            while True:
                raw = sock.recv()
                try:
                    cmd = msg.decode_command(raw)
                except msg.MessageError as e:  # only rank 0 can reach this socket: a bug, not an attack
                    log.error("rank %d: dropped a command from rank 0: %s", self.world.rank, e)
                    continue
                if isinstance(cmd, msg.Shutdown):
                    break
                for event in self._worker.handle(cmd):
                    sock.send(msg.encode(event))
        finally:
            sock.close()
            self._live.close()  # Note [Worker liveness]: rank 0 sees this loop end

    def _control_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._live_listener.fileno(), zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        stopping = False
        while True:
            try:
                while True:
                    kind, arg = self._inbox.get_nowait()
                    if kind == "shutdown":
                        stopping = True
                    elif kind == "cancel":
                        self._cancel(arg)
            except queue.Empty:
                pass
            try:
                for sock, _ in poller.poll(5):
                    if sock is self._router:
                        self._on_message(sock.recv_multipart())
                    elif sock is self._monitor:
                        self._on_monitor()
                    else:
                        self._on_liveness(sock, poller)
                self._expire_unproven(poller)
                self._check_hung()
                if self._step(stopping):
                    return
            except Exception as e:  # a bug or a PolicyError: fail what waits, keep serving
                log.exception("control loop: %s", e)
                with self._lock:
                    for rid, rec in list(self.scheduler.active.items()):
                        if rec.running is None:
                            self.scheduler.cancel(rid, self.now())
                            self._fail_request(rid, f"engine error: {type(e).__name__}: {e}")

    def _step(self, stopping: bool) -> bool:
        """Dispatches what the policy decides; on shutdown, once nothing runs, fails what is left
        and stops the workers. True once shut down."""
        with self._lock:
            if not stopping:
                if not self._dead:
                    self._dispatch()
                return False
            if self._inflight:
                return False
            for rid in list(self.scheduler.active):
                self._fail_request(rid, "engine shut down before the request finished")
            for r in range(self.world.size):
                self._send(r, msg.Shutdown())
            return True

    def _on_message(self, frames: list[bytes]) -> None:
        """One message on the ROUTER: (sender identity, payload). Anything that does not decode to
        an event of the rank that sent it is dropped and logged (Note [Control-plane messages])."""
        if len(frames) != 2:
            log.warning("control: dropped a message of %d frames (expected 2)", len(frames))
            return
        ident, payload = frames
        source = ident.decode(errors="replace")
        try:
            ev = msg.decode_event(payload)
        except msg.MessageError as e:
            log.warning("control: dropped a message from rank %s: %s", source, e)
            return
        if str(ev.rank) != source:
            log.warning(
                "control: dropped a %s event claiming rank %d from rank %s",
                type(ev).__name__,
                ev.rank,
                source,
            )
            return
        self._on_event(ev)

    def _on_monitor(self) -> None:
        """A connection to the ROUTER failed its handshake: a peer without the launch secret."""
        try:
            event = zmq.utils.monitor.recv_monitor_message(self._monitor, zmq.NOBLOCK)
        except zmq.Again:
            return
        log.warning(
            "control socket %s: refused a connection (%s, errno %s): it did not prove the launch secret",
            event.get("endpoint", b"").decode(errors="replace"),
            zmq.Event(event["event"]).name,
            event.get("value"),
        )

    def _drop_live(self, fd: int, poller: zmq.Poller) -> _LiveConn:
        poller.unregister(fd)
        entry = self._live_conns.pop(fd)
        entry.sock.close()
        return entry

    def _on_liveness(self, fd: int, poller: zmq.Poller) -> None:
        """A liveness socket is readable (Note [Worker liveness]); the poller names it by its fd."""
        if fd == self._live_listener.fileno():
            conn, peer = self._live_listener.accept()
            where = f"{peer[0]}:{peer[1]}"
            if sum(c.rank is None for c in self._live_conns.values()) >= kMaxUnprovenLiveness:
                log.warning("liveness: refused a connection from %s: too many unproven connections", where)
                conn.close()
                return
            nonce = secrets.token_bytes(auth.kLivenessNonceBytes)
            try:
                conn.setblocking(False)
                conn.send(nonce)  # 32 bytes into an empty send buffer: all of it goes
            except OSError as e:
                log.warning("liveness: connection from %s dropped before its challenge: %s", where, e)
                conn.close()
                return
            deadline = time.monotonic() + auth.kLivenessAuthTimeoutS
            self._live_conns[conn.fileno()] = _LiveConn(conn, where, nonce, deadline)
            poller.register(conn.fileno(), zmq.POLLIN)
            return
        entry = self._live_conns[fd]
        try:
            data = entry.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop_live(fd, poller)
            if entry.rank is not None:
                self._on_rank_lost(entry.rank, "its worker process exited (liveness connection closed)")
            else:
                log.warning("liveness: %s closed its connection without proving a rank", entry.peer)
            return
        if entry.rank is not None:
            return  # a proven rank never sends more; nothing it sends is read
        entry.buf += data
        if len(entry.buf) < auth.kLivenessProofBytes:
            return
        rank = auth.check_liveness_proof(self._keys.liveness, entry.nonce, entry.buf)
        if rank is None or not 0 <= rank < self.world.size or len(entry.buf) != auth.kLivenessProofBytes:
            self._drop_live(fd, poller)
            log.warning(
                "liveness: closed the connection from %s: it did not prove the launch secret", entry.peer
            )
            return
        entry.rank, entry.buf = rank, b""

    def _expire_unproven(self, poller: zmq.Poller) -> None:
        """Closes liveness connections that did not prove a rank in time."""
        now = time.monotonic()
        for fd, entry in list(self._live_conns.items()):
            if entry.rank is None and now > entry.deadline:
                self._drop_live(fd, poller)
                log.warning(
                    "liveness: closed the connection from %s: no proof within %.0f s",
                    entry.peer,
                    auth.kLivenessAuthTimeoutS,
                )

    def _check_hung(self) -> None:
        """Marks the unreported members of a task past its time limit as lost (Note [Worker liveness])."""
        if self.task_timeout_floor_s is None:
            return
        now = self.now()
        with self._lock:
            late = [inf for inf in self._inflight.values() if now - inf.start_s > inf.limit_s]
            hung = [(r, inf) for inf in late for r in sorted(inf.waiting)]
        for rank, inf in hung:
            self._on_rank_lost(
                rank,
                f"hung: task {inf.assignment.task} ran past its {inf.limit_s:.1f} s limit without reporting",
            )

    def _on_rank_lost(self, rank: int, reason: str) -> None:
        """Fails every unfinished request: the world has lost a member (Note [Worker liveness])."""
        with self._lock:
            if rank in self._dead:
                return
            self._dead[rank] = reason
            log.error("rank %d lost: %s; failing every unfinished request", rank, reason)
            why = f"rank {rank} lost: {reason}"
            for tid, inf in list(self._inflight.items()):
                del self._inflight[tid]
                self.scheduler.on_task_failed(inf.assignment.task, inf.assignment.ranks, why, self.now())
                self._fail_request(inf.assignment.task.request_id, why)
            for rid in list(self.scheduler.active):
                self.scheduler.cancel(rid, self.now())
                self._fail_request(rid, why)

    def _send(self, rank: int, cmd: msg.Command) -> None:
        self._router.send_multipart([str(rank).encode(), msg.encode(cmd)])

    def _dispatch(self) -> None:
        now = self.now()
        for a in self.scheduler.schedule(now):
            self._start(a, now)

    def _start(self, a, now: float) -> None:
        task, ranks, plan = a.task, tuple(a.ranks), a.reshard
        rid = task.request_id
        req = self.scheduler.record(rid).request
        tid = next(self._task_ids)
        fields: dict = {}
        involved = set(ranks)
        if plan is not None and not plan.is_noop and task.kind is not TaskKind.FINALIZE:
            fields["transfers"] = tuple((t.src_rank, t.dst_rank, t.start, t.stop) for t in plan.transfers)
            fields["local"] = tuple((t.src_rank, t.dst_rank, t.start, t.stop) for t in plan.local)
            involved |= {t.src_rank for t in plan.transfers}
        if task.kind is TaskKind.FINALIZE and plan is not None and not plan.is_noop:
            src = plan.src.ranks[0]
            fields["pixels_from"] = src
            fields["pixels_meta"] = self._pixel_meta[rid]
            involved.add(src)
        if task.kind in (TaskKind.DENOISE, TaskKind.DECODE):
            holders = self._cond_holders.get(rid, set())
            lacking = [m for m in ranks if m not in holders]
            if lacking and holders:
                inside = [h for h in ranks if h in holders]
                pool = inside or sorted(holders)
                fields["cond_sends"] = tuple((pool[i % len(pool)], m) for i, m in enumerate(lacking))
                fields["cond_meta"] = self._cond_meta[rid]
                involved |= {s for s, _ in fields["cond_sends"]}
                holders |= set(lacking)
        cmd = msg.Task(
            task_id=tid,
            request=req,
            kind=task.kind.name,
            start=task.start,
            end=task.end,
            ranks=ranks,
            dim_size=self.scheduler.record(rid).dim_size,
            token_dim=self.model.token_dim,
            latent_dtype="float32",  # the latent state is fp32 whatever the model's dtype
            keep_latents=self.keep_latents,
            **fields,
        )
        self._touched.setdefault(rid, set()).update(involved)
        expected_s = max(0.0, (self.scheduler.record(rid).expected_end_s or now) - now)
        limit_s = max(self.task_timeout_floor_s or 0.0, self.task_timeout_factor * expected_s)
        self._inflight[tid] = _Inflight(a, now, set(ranks), limit_s)
        for r in sorted(involved):
            self._send(r, cmd)
        handle = self._handles.get(rid)
        if handle is not None:
            p = handle.progress()
            handle._emit(dataclasses.replace(p, state="in_progress", degree=len(ranks), task=str(task)))

    def _on_event(self, ev: msg.Event) -> None:
        with self._lock:
            if isinstance(ev, msg.Ready):
                self._ready.add(ev.rank)
                return
            inf = self._inflight.get(ev.task_id)
            if inf is None:
                return  # a late report of a task that already failed
            if isinstance(ev, msg.StepDone):
                a = inf.assignment
                handle = self._handles.get(a.task.request_id)
                if handle is not None and ev.rank == a.ranks[0]:
                    total = self.scheduler.record(a.task.request_id).request.num_inference_steps
                    handle._emit(Progress("in_progress", ev.step, total, len(a.ranks), str(a.task)))
                return
            if isinstance(ev, msg.Failed):
                del self._inflight[ev.task_id]
                a = inf.assignment
                log.warning("task %s failed: %s\n%s", a.task, ev.reason, ev.trace)
                self.scheduler.on_task_failed(a.task, a.ranks, ev.reason, self.now())
                self._fail_request(a.task.request_id, ev.reason)
                return
            if ev.rank not in inf.waiting:
                log.warning(
                    "control: dropped a report of task %d from rank %d, not a member", ev.task_id, ev.rank
                )
                return
            inf.events.append(ev)
            inf.waiting.discard(ev.rank)
            if inf.waiting:
                return
            del self._inflight[ev.task_id]
            self._complete(inf)

    def _complete(self, inf: _Inflight) -> None:
        a = inf.assignment
        task, rid = a.task, a.task.request_id
        now = self.now()
        reshard_s = max(e.reshard_s for e in inf.events)
        reshard_s = min(reshard_s, now - inf.start_s)
        self.scheduler.on_task_done(task, a.ranks, TaskTimings(inf.start_s, now, reshard_s))
        rec = self.scheduler.record(rid)
        stats = self._stats.setdefault(rid, {"reshard_s": 0.0, "bytes": 0})
        stats["reshard_s"] += reshard_s
        stats["bytes"] += sum(e.bytes_moved for e in inf.events)
        if task.kind is TaskKind.ENCODE:
            self._cond_holders[rid] = set(a.ranks)
            self._cond_meta[rid] = next(e.cond_meta for e in inf.events if e.cond_meta is not None)
        if task.kind is TaskKind.DECODE:
            r = rec.request
            h, w = r.height, r.width
            shape = (1, r.num_frames, h, w, 3) if r.num_frames is not None else (1, h, w, 3)
            self._pixel_meta[rid] = msg.TensorMeta("pixels", shape, "uint8")
        handle = self._handles.get(rid)
        if handle is None:
            return
        step = task.end if task.kind is TaskKind.DENOISE else handle.progress().step
        handle._emit(Progress("in_progress", step, rec.request.num_inference_steps, len(a.ranks), str(task)))
        if rec.state is RequestState.DONE:
            images = next(e.result for e in inf.events if e.result is not None).to_numpy()
            result = Result(
                images=images,
                latency_s=now - rec.request.arrival_s,
                queue_s=(rec.first_start_s or now) - rec.request.arrival_s,
                reshard_s=stats["reshard_s"],
                bytes_moved=stats["bytes"],
                num_reshards=rec.num_reshards,
                groups=[(str(t.task), t.ranks) for t in rec.history],
                latents=next((e.latents.to_numpy() for e in inf.events if e.latents is not None), None),
            )
            self._release(rid)
            handle._finish(result, None, "completed")
        elif rec.state is RequestState.CANCELLED:
            self._release(rid)
            handle._finish(None, "cancelled", "cancelled")

    def _cancel(self, rid: str) -> None:
        with self._lock:
            rec = self.scheduler.record(rid)
            if rec.state.is_terminal:
                return
            self.scheduler.cancel(rid, self.now())
            if rec.state is RequestState.CANCELLED:
                self._release(rid)
                self._handles[rid]._finish(None, "cancelled", "cancelled")

    def _fail_request(self, rid: str, reason: str) -> None:
        self._release(rid)
        handle = self._handles.get(rid)
        if handle is not None and not handle.done():
            handle._finish(None, reason, "failed")

    def _release(self, rid: str) -> None:
        for r in sorted(self._touched.pop(rid, set())):
            self._send(r, msg.Release(request_id=rid))
        self._stats.pop(rid, None)
        self._cond_holders.pop(rid, None)
        self._cond_meta.pop(rid, None)
        self._pixel_meta.pop(rid, None)
