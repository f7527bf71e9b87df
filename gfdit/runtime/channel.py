"""The control channel between the engine (rank 0) and the workers: ZeroMQ, liveness, wake-ups.

Rank 0 owns a ControlChannel: one ROUTER that every other rank's DEALER connects to (CURVE,
Note [Control-plane authentication] in gfdit.runtime.auth), the liveness listener (Note [Worker
liveness]), and an in-process inbox. Rank 0's own worker is in process: its commands go into a
queue its thread reads (`LocalLink`), its events into the inbox, never through a socket. Every
other rank has a `RemoteLink` (its DEALER and its liveness connection). Both links offer the
same `recv()` / `send(event)` to the worker loop.

Note [Event-driven control loop]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
The control thread blocks in one zmq poll over the ROUTER, the socket monitor, the liveness
sockets and the read end of a wake-up socket pair. `post()` (any thread: the handle API, rank 0's
worker) appends a typed item to the inbox and writes one byte to the pair, so the poll returns at
once: a submission is dispatched as soon as the control thread is free, not at the next poll
tick. The poll's timeout is the watchdog's next deadline (bounded by kMaxPollS, which also expires
unproven liveness connections); nothing waits on a fixed tick.

Note [Worker liveness]
~~~~~~~~~~~~~~~~~~~~~~
Besides its DEALER, every rank other than 0 opens one plain TCP connection to a listener on rank 0
and proves its rank over it (rank 0's nonce, answered with the rank and an HMAC of both under the
launch secret's liveness key); a connection that has not proven a rank counts for nothing, and one
that fails or takes longer than kLivenessAuthTimeoutS is closed and logged. A proven connection
stays open, silent, for as long as the rank's worker loop runs. When a worker process dies (or its
worker loop ends) the kernel closes the connection, and the control loop, which polls these
sockets with the ROUTER, sees end-of-file at once and reports `RankLost`: no heartbeat timing to
tune and nothing for a busy worker to send. (ZeroMQ's ROUTER_NOTIFY would say the same, but it is
a draft API that the libzmq bundled with pyzmq leaves out.) A hung (not dead) worker keeps its
connection open: the watchdog (gfdit.runtime.watchdog) finds it by the clock.
"""

from __future__ import annotations

import collections
import logging
import queue
import secrets
import socket
import threading
import time
from dataclasses import dataclass

import zmq
import zmq.utils.monitor

from . import auth
from . import messages as msg

__all__ = ["ControlChannel", "LocalLink", "RankLost", "RemoteLink", "kMaxPollS", "tcp_endpoint"]

log = logging.getLogger("gfdit.channel")

# Liveness connections accepted but not yet proven at once; more are refused (a flood of strangers
# cannot exhaust rank 0's file descriptors). A real job has at most world_size of them, briefly.
kMaxUnprovenLiveness = 64
# The longest the control loop sleeps without a deadline of its own: unproven liveness connections
# expire at this granularity (they have kLivenessAuthTimeoutS = 10 s).
kMaxPollS = 0.5


def tcp_endpoint(host: str, port: int | None = None) -> str:
    h = f"[{host}]" if ":" in host else host
    return f"tcp://{h}" if port is None else f"tcp://{h}:{port}"


@dataclass(frozen=True)
class RankLost:
    """What the channel reports when a rank's liveness connection ends (Note [Worker liveness])."""

    rank: int  # the rank
    reason: str  # why, for /health and the log


@dataclass
class _LiveConn:
    """An accepted liveness connection (Note [Worker liveness])."""

    sock: socket.socket
    peer: str  # the remote address, for the log
    nonce: bytes  # the challenge sent to it
    deadline: float  # monotonic time by which it must have proven a rank
    buf: bytes = b""  # its bytes so far, until it has proven a rank
    rank: int | None = None  # the rank it proved; None: a stranger so far


class LocalLink:
    """Rank 0's worker's link: commands from a queue, events into the control channel's inbox."""

    def __init__(self, post):
        self._commands: queue.Queue = queue.Queue()
        self._post = post

    def deliver(self, cmd: msg.Command) -> None:
        """Control thread: hands a command to rank 0's worker."""
        self._commands.put(cmd)

    def recv(self) -> msg.Command:
        return self._commands.get()

    def send(self, event: msg.Event) -> None:
        self._post(event)

    def close(self) -> None:
        pass


class RemoteLink:
    """A non-zero rank's link to rank 0: its DEALER and its liveness connection. Constructed (and
    the liveness connection opened) on the engine's thread; `start()` proves liveness and connects
    the DEALER on the worker thread, which then alone uses it."""

    def __init__(self, ctx: zmq.Context, keys: auth.Keys, rank: int, addr: str, port: int, live_port: int):
        self._ctx, self._keys, self.rank = ctx, keys, rank
        self._endpoint = tcp_endpoint(addr, port)
        self._live = socket.create_connection((addr, live_port), timeout=120)
        self._sock = None

    def start(self) -> None:
        """Answers rank 0's nonce on the liveness connection, then connects the DEALER. OSError if
        the handshake fails."""
        nonce = b""
        while len(nonce) < auth.kLivenessNonceBytes:
            chunk = self._live.recv(auth.kLivenessNonceBytes - len(nonce))  # bounded: the socket's timeout
            if not chunk:
                raise ConnectionError("rank 0 closed the liveness connection before its challenge")
            nonce += chunk
        self._live.sendall(auth.liveness_proof(self._keys.liveness, nonce, self.rank))
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, str(self.rank).encode())
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.MAXMSGSIZE, msg.kMaxMessageBytes)
        self._keys.make_client(sock)
        sock.connect(self._endpoint)
        self._sock = sock

    def recv(self) -> msg.Command:
        """The next command; ones that do not decode are logged and skipped (only rank 0 can reach
        this socket, so such a message is a bug, not an attack)."""
        while True:
            raw = self._sock.recv()
            try:
                return msg.decode_command(raw)
            except msg.MessageError as e:
                log.error("rank %d: dropped a command from rank 0: %s", self.rank, e)

    def send(self, event: msg.Event) -> None:
        self._sock.send(msg.encode(event))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._live.close()  # Note [Worker liveness]: rank 0 sees this loop end


class ControlChannel:
    """Rank 0's end of the control plane. `send` and `poll` belong to the control thread; `post`
    may be called from any thread."""

    def __init__(self, ctx: zmq.Context, keys: auth.Keys, world_size: int, bind_host: str):
        self._keys = keys
        self.world_size = world_size
        # Note [Control-plane authentication]: CURVE, and a ZAP handler that admits the workers only.
        self._zap = auth.start_zap(ctx, keys)
        self._router = ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.MAXMSGSIZE, msg.kMaxMessageBytes)
        self._router.setsockopt(zmq.IPV6, int(":" in bind_host))
        keys.make_server(self._router)
        self._monitor = self._router.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH
        )
        self.port = self._router.bind_to_random_port(tcp_endpoint(bind_host))
        family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
        self._live_listener = socket.create_server((bind_host, 0), family=family)
        self.live_port = self._live_listener.getsockname()[1]
        self._live_conns: dict[int, _LiveConn] = {}  # fd -> its state
        # Note [Event-driven control loop]: the inbox and its wake-up pair.
        self._inbox: collections.deque = collections.deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._wake_lock = threading.Lock()
        self._wake_pending = False
        self.local = LocalLink(self.post)  # rank 0's worker
        self._poller = zmq.Poller()
        self._poller.register(self._router, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._poller.register(self._live_listener.fileno(), zmq.POLLIN)
        self._poller.register(self._wake_r.fileno(), zmq.POLLIN)

    # -- any thread --------------------------------------------------------------------------------
    def post(self, item) -> None:
        """Queues a typed item (msg.Control, or rank 0's msg.Event) for the control thread and wakes
        it (Note [Event-driven control loop])."""
        self._inbox.append(item)
        with self._wake_lock:
            if self._wake_pending:
                return
            self._wake_pending = True
        try:
            self._wake_w.send(b"\0")
        except BlockingIOError:  # the pair's buffer is full of wake-ups: the loop is awake anyway
            pass

    # -- control thread ----------------------------------------------------------------------------
    def send(self, rank: int, cmd: msg.Command) -> None:
        if rank == 0:
            self.local.deliver(cmd)
        else:
            self._router.send_multipart([str(rank).encode(), msg.encode(cmd)])

    def poll(self, timeout_s: float) -> list:
        """Waits up to `timeout_s` (at most kMaxPollS) for anything, then returns every item ready:
        msg.Event (a worker's, validated), msg.Control (posted) and RankLost, in arrival order per
        source."""
        out: list = []
        timeout_ms = max(0, int(min(timeout_s, kMaxPollS) * 1000))
        if self._inbox:
            timeout_ms = 0
        for sock, _ in self._poller.poll(timeout_ms):
            if sock is self._router:
                while True:
                    try:
                        frames = self._router.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    ev = self._decode(frames)
                    if ev is not None:
                        out.append(ev)
            elif sock is self._monitor:
                self._on_monitor()
            elif sock == self._wake_r.fileno():
                with self._wake_lock:
                    self._wake_pending = False
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except BlockingIOError:
                        pass
            else:
                lost = self._on_liveness(sock)
                if lost is not None:
                    out.append(lost)
        while self._inbox:
            out.append(self._inbox.popleft())
        self._expire_unproven()
        return out

    def close(self) -> None:
        self._router.disable_monitor()
        self._monitor.close(0)
        self._router.close(0)
        self._zap.stop()
        for conn in [self._live_listener, *(c.sock for c in self._live_conns.values())]:
            conn.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- internals -----------------------------------------------------------------------------------
    def _decode(self, frames: list[bytes]) -> msg.Event | None:
        """One message on the ROUTER: (sender identity, payload). Anything that does not decode to
        an event of the rank that sent it is dropped and logged (Note [Control-plane messages])."""
        if len(frames) != 2:
            log.warning("control: dropped a message of %d frames (expected 2)", len(frames))
            return None
        ident, payload = frames
        source = ident.decode(errors="replace")
        try:
            ev = msg.decode_event(payload)
        except msg.MessageError as e:
            log.warning("control: dropped a message from rank %s: %s", source, e)
            return None
        if str(ev.rank) != source or ev.rank == 0:
            log.warning(
                "control: dropped a %s event claiming rank %d from rank %s",
                type(ev).__name__,
                ev.rank,
                source,
            )
            return None
        return ev

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

    def _drop_live(self, fd: int) -> _LiveConn:
        self._poller.unregister(fd)
        entry = self._live_conns.pop(fd)
        entry.sock.close()
        return entry

    def _on_liveness(self, fd: int) -> RankLost | None:
        """A liveness socket is readable (Note [Worker liveness]); the poller names it by its fd."""
        if fd == self._live_listener.fileno():
            conn, peer = self._live_listener.accept()
            where = f"{peer[0]}:{peer[1]}"
            if sum(c.rank is None for c in self._live_conns.values()) >= kMaxUnprovenLiveness:
                log.warning("liveness: refused a connection from %s: too many unproven connections", where)
                conn.close()
                return None
            nonce = secrets.token_bytes(auth.kLivenessNonceBytes)
            try:
                conn.setblocking(False)
                conn.send(nonce)  # 32 bytes into an empty send buffer: all of it goes
            except OSError as e:
                log.warning("liveness: connection from %s dropped before its challenge: %s", where, e)
                conn.close()
                return None
            deadline = time.monotonic() + auth.kLivenessAuthTimeoutS
            self._live_conns[conn.fileno()] = _LiveConn(conn, where, nonce, deadline)
            self._poller.register(conn.fileno(), zmq.POLLIN)
            return None
        entry = self._live_conns[fd]
        try:
            data = entry.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            data = b""
        if not data:
            self._drop_live(fd)
            if entry.rank is not None:
                return RankLost(entry.rank, "its worker process exited (liveness connection closed)")
            log.warning("liveness: %s closed its connection without proving a rank", entry.peer)
            return None
        if entry.rank is not None:
            return None  # a proven rank never sends more; nothing it sends is read
        entry.buf += data
        if len(entry.buf) < auth.kLivenessProofBytes:
            return None
        rank = auth.check_liveness_proof(self._keys.liveness, entry.nonce, entry.buf)
        if rank is None or not 0 < rank < self.world_size or len(entry.buf) != auth.kLivenessProofBytes:
            self._drop_live(fd)
            log.warning(
                "liveness: closed the connection from %s: it did not prove the launch secret", entry.peer
            )
            return None
        entry.rank, entry.buf = rank, b""
        return None

    def _expire_unproven(self) -> None:
        """Closes liveness connections that did not prove a rank in time."""
        now = time.monotonic()
        for fd, entry in list(self._live_conns.items()):
            if entry.rank is None and now > entry.deadline:
                self._drop_live(fd)
                log.warning(
                    "liveness: closed the connection from %s: no proof within %.0f s",
                    entry.peer,
                    auth.kLivenessAuthTimeoutS,
                )
