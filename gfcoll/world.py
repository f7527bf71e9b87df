"""World, Group and the collective API of gfcoll.

Ordering rules (what callers must follow; tests/multiproc/test_concurrency.py checks each):

1. Every member of a group issues that group's operations in the same order. A group is named by
   its ordered rank list: two Group objects with the same list are the same group.
2. Groups may overlap, and operations on different groups may be in flight at once (``async_op``,
   other threads, other streams): an operation on {0,1} never waits for, or corrupts, one on {1,2}.
   On the host transport (CPU tensors) operations are matched by (group, epoch), never by the order
   of messages between two ranks, so this holds in any interleaving.
3. As with NCCL communicators, two ranks that share two groups and issue both groups' operations
   on one stream (or one thread, for CPU tensors) must issue them in the same relative order.
   On the nccl transport (CUDA tensors) NCCL runs one communicator's work in issue order whatever
   the stream, so this rule applies to CUDA operations on every stream (Note [nccl masked
   collectives] in csrc/include/gfcoll/nccl_transport.h). On the ipc transport (CUDA tensors of
   ranks on one node) nothing in gfcoll couples two streams (Note [ipc signalling] in
   csrc/include/gfcoll/ipc_transport.h), so rule 3 does not apply to ipc operations on different
   streams: overlapping groups issued on two streams in opposite orders complete (verified where 2
   and 4 ranks share one H100, bench/results/2026-12-06-h100-s7; before gfcoll loaded its kernels
   at init this deadlocked there, Note [ipc signalling], "Loading"). Rule 3 still holds for the
   operations of one stream, and for nccl on every stream.
   Operations of one group issued on two streams run in issue order (the later stream
   waits for the earlier).
4. Point-to-point messages between an ordered pair of ranks match in issue order, as in MPI.
5. Graph slots (ipc only; ``slot = world.graph_slot(size)``): every rank creates its slots in the
   same order (slot k is the same slot on every rank). Operations issued on a slot read the
   group from a device-side table, so a CUDA graph captured with them replays for any group of
   ``size`` members. Before a replay every member of the group calls ``slot.bind(group)`` on the
   replay's stream (``group.size == size``); a slot serves one replay at a time per rank (bind,
   replay, then bind again), and between two binds the members that took part replay the same
   graph the same number of times (rule 1 for the slot). ``bind`` is an operation of the bound
   group (it ends with a barrier of the group, enqueued on the stream), the slot's operations
   are not: they belong to the slot. Captured operations stage in the graph
   arena (a quarter of GFCOLL_IPC_BYTES), each from its start: gfcoll operations inside one capture
   are stream-ordered, and graphs holding them replay one at a time per rank.
6. Scopes (host transport): a failed operation can leave the members' epochs of a group (or the
   sequence numbers of a pair) out of step, some having issued it and some not, and its published
   windows stay in shared memory. An operation issued later could then match one of those leftovers
   and read stale data without any error. ``with world.scope(tag):`` numbers the host operations
   issued inside (by this thread) from 0, in a namespace of their own: every rank that takes part in
   one unit of work (a serving task) enters the same tag around it, and nothing of another scope,
   failed or not, ever matches them (Note [Scoped epochs]).

Transports are chosen per operation by ``World._select`` (one function): CPU tensors use host;
CUDA tensors use nccl where NCCL exists, and ipc where it does not (ranks sharing a GPU) or when
``GFCOLL_TRANSPORT=ipc`` asks for it and every member is on this node (and the operation fits the
workspace): ipc is verified on one shared GPU only so far. ``GFCOLL_TRANSPORT=ipc|nccl`` forces
one. With fewer GPUs than ranks, NCCL is not created (it refuses two ranks on one GPU) and ipc
serves every CUDA operation. ipc and nccl errors of an operation (a dead or silent peer, an NCCL
asynchronous error) are recorded by the transports' watchdogs and raised by the next gfcoll call
on that rank, by ``Work.wait``/``Work.synchronize``, ``barrier`` and ``World.check``. Known issue:
on the one-GPU H200, a survivor of a killed ipc peer crashed (SIGSEGV) in its next device
synchronisation instead of raising (bench/results/2026-12-01-h200/README.md).

Stream semantics follow torch.distributed: CUDA operations are enqueued on the current stream of
the tensor's device and return at once; CPU operations complete before returning. With
``async_op=True`` every operation returns a Work whose ``wait()`` makes the current stream wait
(CUDA) or blocks until done (CPU), and whose ``is_completed()`` polls.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from . import _native
from ._tensor import Buf, as_buf, check_same, op_code
from .errors import GfcollClosedError, GfcollPeerDiedError, GfcollUnsupportedError, GfcollValueError

log = logging.getLogger("gfcoll")

_MASK64 = (1 << 64) - 1


def _group_hash(ranks: tuple[int, ...]) -> int:
    # Python's tuple-of-int hash is deterministic across processes (no string salting).
    return hash((len(ranks),) + ranks) & _MASK64


def _pair_hash(src: int, dst: int) -> int:
    return hash((-1, src, dst)) & _MASK64


class Work:
    """Handle of an operation issued with ``async_op=True``."""

    def __init__(self, future: Future | None = None, event=None, keep=None, check=None):
        self._future = future
        self._event = event
        self._keep = keep  # tensors that must outlive the operation
        self._check = check  # raises an error the transport recorded (ipc watchdog), or None

    def wait(self) -> None:
        """CPU: blocks until done and re-raises its error. CUDA: makes the current stream wait
        (and raises an error the transport already recorded)."""
        if self._future is not None:
            self._future.result()
        elif self._event is not None:
            self._event.wait(torch.cuda.current_stream().cuda_stream)
            if self._check is not None:
                self._check()

    def is_completed(self) -> bool:
        if self._future is not None:
            return self._future.done()
        return self._event.query() if self._event is not None else True

    def synchronize(self) -> None:
        """Blocks the host until the operation finished (CUDA) or finished and raised (CPU)."""
        if self._future is not None:
            self._future.result()
        elif self._event is not None:
            self._event.synchronize()
            if self._check is not None:
                self._check()


_P2P_NAMES = tuple(f"ops[{k}].tensor" for k in range(16))  # as_buf's names for batch_p2p items


@dataclass
class P2P:
    """One transfer of ``World.batch_p2p``: op is "send" or "recv", peer a global rank."""

    op: str
    tensor: object
    peer: int


class Group:
    """An ordered subset of the world's ranks. Made by ``World.group``; costs no communication."""

    __slots__ = ("_world", "ranks", "size", "rank", "_key", "_hash", "_ipc")

    def __init__(self, world: World, ranks: tuple[int, ...], rank: int):
        self._world = world
        self.ranks = ranks  # ordered global ranks
        self.size = len(ranks)
        self.rank = rank  # this process's index in ranks, or -1
        self._hash = _group_hash(ranks)
        self._ipc = None  # whether every member is reachable over ipc (computed once)

    def __repr__(self) -> str:
        return f"Group(ranks={list(self.ranks)}, rank={self.rank})"

    @property
    def world(self) -> World:
        """The world this group belongs to."""
        return self._world

    # -- helpers -------------------------------------------------------------------------------
    def _me(self, what: str) -> int:
        self._world._check_open()
        self._world.check_members(self.ranks, what)
        if self.rank < 0:
            raise GfcollValueError(
                f"{what}: rank {self._world.rank} is not a member of group {list(self.ranks)}"
            )
        return self.rank

    def _run(self, what: str, host_fn, nccl_fn, bufs: Sequence[Buf], async_op: bool, ipc_fn=None, nbytes=0):
        """Issues one operation on the transport World._select picks. CPU operations get their
        epoch now (rule 1); CUDA transports order a group's operations themselves."""
        w = self._world
        if bufs[0].is_cuda:
            stream = bufs[0].stream
            if w._select(what, self, bufs, nbytes) == "ipc":
                ipc_fn(w._ipc, stream)
                check = w._ipc.check
            else:
                nccl_fn(w._nccl, stream)
                check = w._nccl.check
            if not async_op:
                return None
            event = _native.lib().CudaEvent()
            event.record(stream)
            return Work(event=event, keep=[b.tensor for b in bufs], check=check)
        epoch = w._next_epoch(self.ranks)
        host = w._host_for(what)
        if not async_op:
            host_fn(host, epoch)
            return None
        return Work(future=w._executor().submit(host_fn, host, epoch), keep=[b.tensor for b in bufs])

    # -- collectives ---------------------------------------------------------------------------
    def all_gather(self, out, inp, async_op: bool = False):
        """out = concatenation of every member's inp along dim 0, in group order. All members
        call it. ``inp`` may be this rank's block of ``out`` (in place)."""
        me = self._me("all_gather")
        i, o = as_buf(inp, "inp"), as_buf(out, "out")
        check_same(i, o, "all_gather")
        if o.numel != i.numel * self.size:
            raise GfcollValueError(
                f"all_gather: out has {o.numel} elements, expected {self.size} x {i.numel} (group size x inp)"
            )
        members = list(self.ranks)
        return self._run(
            "all_gather",
            lambda h, e: h.all_gather(self._hash, e, members, me, i.ptr, o.ptr, i.nbytes, i.dtype_code),
            lambda n, s: n.all_gather(members, me, i.ptr, o.ptr, i.nbytes, s),
            [i, o],
            async_op,
            lambda t, s: t.all_gather(members, me, i.ptr, o.ptr, i.nbytes, s, -1),
        )

    def reduce_scatter(self, out, inp, op: str = "sum", async_op: bool = False):
        """out = op over members of block ``rank`` of inp (inp has size x out.numel elements).
        Floating types accumulate in float32 in group order; all members call it."""
        me = self._me("reduce_scatter")
        i, o = as_buf(inp, "inp"), as_buf(out, "out")
        check_same(i, o, "reduce_scatter")
        code = op_code(op, i.tensor.dtype, "reduce_scatter")
        if i.numel != o.numel * self.size:
            raise GfcollValueError(
                f"reduce_scatter: inp has {i.numel} elements, expected {self.size} x {o.numel} (group size x out)"
            )
        members = list(self.ranks)
        return self._run(
            "reduce_scatter",
            lambda h, e: h.reduce_scatter(
                self._hash, e, members, me, i.ptr, o.ptr, o.numel, i.dtype_code, code
            ),
            lambda n, s: n.reduce_scatter(members, me, i.ptr, o.ptr, o.numel, i.dtype_code, code, s),
            [i, o],
            async_op,
            lambda t, s: t.reduce_scatter(members, me, i.ptr, o.ptr, o.numel, i.dtype_code, code, s, -1),
        )

    def all_reduce(self, t, op: str = "sum", async_op: bool = False):
        """In place: t = op over members of t. op in {"sum", "avg", "max", "min"} ("avg" for
        floating types only). Every member gets bit-identical results."""
        me = self._me("all_reduce")
        b = as_buf(t, "t")
        code = op_code(op, b.tensor.dtype, "all_reduce")
        members = list(self.ranks)
        return self._run(
            "all_reduce",
            lambda h, e: h.all_reduce(self._hash, e, members, me, b.ptr, b.ptr, b.numel, b.dtype_code, code),
            lambda n, s: n.all_reduce(members, me, b.ptr, b.ptr, b.numel, b.dtype_code, code, s),
            [b],
            async_op,
            lambda t, s: t.all_reduce(members, me, b.ptr, b.ptr, b.numel, b.dtype_code, code, s, -1),
        )

    def all_to_all(self, out, inp, out_splits=None, in_splits=None, async_op: bool = False):
        """Like torch's all_to_all_single: block j of inp (rows along dim 0, sizes in_splits) goes
        to member j; block j of out (sizes out_splits) comes from member j. Without splits, dim 0
        is split evenly. Every member's in_splits[j] must equal member j's out_splits[me]."""
        me = self._me("all_to_all")
        i, o = as_buf(inp, "inp"), as_buf(out, "out")
        check_same(i, o, "all_to_all")
        in_off, in_sz = _split_bytes(i, in_splits, self.size, "in_splits")
        out_off, out_sz = _split_bytes(o, out_splits, self.size, "out_splits")
        if in_sz[me] != out_sz[me]:
            raise GfcollValueError(
                f"all_to_all: this rank sends itself {in_sz[me]} bytes but expects {out_sz[me]}"
            )
        members = list(self.ranks)
        return self._run(
            "all_to_all",
            lambda h, e: h.all_to_all(
                self._hash, e, members, me, i.ptr, o.ptr, in_off, in_sz, out_off, out_sz, i.dtype_code
            ),
            lambda n, s: n.all_to_all(members, me, i.ptr, o.ptr, in_off, in_sz, out_off, out_sz, s),
            [i, o],
            async_op,
            lambda t, s: t.all_to_all(members, me, i.ptr, o.ptr, in_off, in_sz, out_off, out_sz, s, -1),
            i.nbytes,
        )

    def broadcast(self, t, root: int, async_op: bool = False):
        """In place: every member's t becomes root's t. ``root`` is a GLOBAL rank of a member."""
        me = self._me("broadcast")
        if root not in self.ranks:
            raise GfcollValueError(f"broadcast: root {root} is not a member of group {list(self.ranks)}")
        root_index = self.ranks.index(root)
        b = as_buf(t, "t")
        members = list(self.ranks)
        return self._run(
            "broadcast",
            lambda h, e: h.broadcast(self._hash, e, members, me, root_index, b.ptr, b.nbytes, b.dtype_code),
            lambda n, s: n.broadcast(members, me, root_index, b.ptr, b.nbytes, s),
            [b],
            async_op,
            lambda t, s: t.broadcast(members, me, root_index, b.ptr, b.nbytes, s, -1),
        )

    def barrier(self) -> None:
        """Returns once every member entered the barrier. On a CUDA world, first waits for the
        work queued on the current stream (like torch.distributed.barrier)."""
        me = self._me("barrier")
        w = self._world
        if w.device.type == "cuda":
            torch.cuda.current_stream(w.device).synchronize()
            w.check()
        epoch = w._next_epoch(self.ranks)
        if w._host is not None and all(w._host.is_attached(r) or r == w.rank for r in self.ranks):
            w._host.barrier(self._hash, epoch, list(self.ranks), me)
            return
        # Ranks on several nodes: a one-byte exchange over NCCL, then wait for it.
        flag = torch.zeros(self.size, dtype=torch.uint8, device=w.device)
        self.all_gather(flag, flag[me : me + 1])
        torch.cuda.current_stream(w.device).synchronize()


def _split_bytes(b: Buf, splits, n: int, name: str) -> tuple[list[int], list[int]]:
    rows = b.tensor.shape[0] if b.tensor.dim() > 0 else 1
    row_bytes = b.nbytes // rows if rows else 0
    if splits is None:
        if rows % n:
            raise GfcollValueError(
                f"all_to_all: dim 0 ({rows}) is not divisible by the group size {n}; pass {name}"
            )
        size = rows // n * row_bytes  # the common case, without the loop below
        return [k * size for k in range(n)], [size] * n
    else:
        splits = [int(s) for s in splits]
        if len(splits) != n:
            raise GfcollValueError(f"all_to_all: {name} has {len(splits)} entries for a group of {n}")
        if any(s < 0 for s in splits):
            raise GfcollValueError(f"all_to_all: {name} has a negative entry: {splits}")
        if sum(splits) != rows:
            raise GfcollValueError(f"all_to_all: {name} sums to {sum(splits)} but dim 0 is {rows}")
    offsets, sizes, acc = [], [], 0
    for s in splits:
        offsets.append(acc * row_bytes)
        sizes.append(s * row_bytes)
        acc += s
    return offsets, sizes


class World:
    """All ranks of the job. Made by ``gfcoll.init()``; close it with ``close()``."""

    def __init__(self, rank: int, size: int, local_rank: int, local_size: int, device: torch.device):
        self.rank = rank
        self.size = size
        self.local_rank = local_rank
        self.local_size = local_size
        self.device = device
        # CUDA device index compared with tensor.get_device() on every call (-1: not a CUDA world)
        self._dev_index = device.index if device.type == "cuda" and device.index is not None else -1
        self._host = None  # native HostTransport (ranks of this node), or None
        self._nccl = None  # native NcclTransport, or None
        self._ipc = None  # native IpcTransport (CUDA ranks of this node), or None
        self._ipc_ranks: frozenset[int] = frozenset()  # global ranks reachable over ipc
        self._force = "auto"  # GFCOLL_TRANSPORT for CUDA operations
        self._ipc_ring = 0  # bytes one ipc operation may stage at once
        self._epochs: dict[tuple[int, ...], int] = {}
        self._p2p_seq: dict[tuple[int, int], int] = {}
        self._scoped = threading.local()  # .tag, .epochs, .p2p_seq of the scope this thread is in
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._async_threads = 64
        self._closed = False
        self._lost: frozenset[int] = frozenset()  # ranks excluded by exclude(): Note [Excluded ranks]
        self._nccl_members: tuple[int, ...] | None = (
            None  # global ranks of the nccl communicator, in its order
        )
        self.timeout_s = 300.0  # how long an operation waits for a peer (set by init: GFCOLL_TIMEOUT_S)

    def __repr__(self) -> str:
        return f"World(rank={self.rank}, size={self.size}, device={self.device})"

    # -- construction (gfcoll.init) ---------------------------------------------------------------
    def configure(self, *, timeout_s: float, async_threads: int, force: str) -> None:
        """gfcoll.init's settings: the peer timeout (GFCOLL_TIMEOUT_S), the threads of asynchronous
        host operations, and GFCOLL_TRANSPORT for CUDA operations. Local; before any operation."""
        self.timeout_s = float(timeout_s)
        self._async_threads = int(async_threads)
        self._force = force

    def attach_transport(self, name: str, native, *, ipc_ranks=(), ipc_ring_bytes: int = 0) -> None:
        """gfcoll.init hands the world a native transport it set up: "host", "ipc" (with the global
        ranks reachable over it and the bytes one operation may stage) or "nccl". Local."""
        if name == "host":
            self._host = native
        elif name == "ipc":
            self._ipc, self._ipc_ranks, self._ipc_ring = native, frozenset(ipc_ranks), int(ipc_ring_bytes)
        elif name == "nccl":
            self._nccl = native
        else:
            raise GfcollValueError(f"attach_transport: unknown transport {name!r}")

    def native_transport(self, name: str):
        """The native transport object "host", "ipc" or "nccl" (gfcoll._gfcoll), or None: for
        diagnostics and benchmarks that time the native calls themselves."""
        if name not in ("host", "ipc", "nccl"):
            raise GfcollValueError(f"native_transport: unknown transport {name!r}")
        return {"host": self._host, "ipc": self._ipc, "nccl": self._nccl}[name]

    # -- excluded ranks --------------------------------------------------------------------------
    # Note [Excluded ranks]
    # ~~~~~~~~~~~~~~~~~~~~~
    # A serving runtime that survives a dead or hung rank tells gfcoll so with `exclude`. From then
    # on, on this rank, any operation whose group or peers include an excluded rank raises
    # GfcollPeerDiedError at once, before touching a transport (fail fast instead of waiting for
    # the liveness check or GFCOLL_TIMEOUT_S). Groups without excluded ranks are unaffected: the
    # host transport's operations only touch their members' segments, so they keep working.
    # An operation already waiting on the excluded rank when exclude() is called ends as the
    # transport decides (host: peer-died within a liveness period for a dead process, the timeout
    # for a stopped one). nccl needs the global communicator shrunk to the survivors: that is
    # collective, so it is its own call, `shrink_nccl()` (Note [NCCL shrink] in gfcoll.nccl_shrink);
    # ipc refuses operations with a dead local peer in the native transport (its watchdog's mask).
    def exclude(self, ranks: Sequence[int]) -> None:
        """Marks global ranks as lost on this rank (Note [Excluded ranks]). Local, no communication;
        any thread. Excluding this rank itself or an out-of-range rank is an error."""
        new = set()
        for r in ranks:
            if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < self.size:
                raise GfcollValueError(f"exclude: rank {r!r} is not in [0, {self.size})")
            if r == self.rank:
                raise GfcollValueError(f"exclude: rank {r} cannot exclude itself")
            new.add(r)
        with self._lock:
            self._lost = self._lost | new
        if new:
            log.warning("rank %d: excluded ranks %s from the world", self.rank, sorted(new))

    def shrink_nccl(self, *, shrinker=None) -> bool:
        """Collective over the ranks not excluded: replaces the nccl transport's communicator by one of
        those ranks only (Note [NCCL shrink] in gfcoll.nccl_shrink), so that groups without lost ranks
        run on nccl again. Every survivor calls it after excluding the same ranks, with none of its
        nccl operations in flight. Returns False (nothing to do) without an nccl transport or when no
        excluded rank is still in the communicator. `shrinker`: an NcclShrinker (tests pass one over
        a fake library); default: over the library the transport loaded. Not yet run on GPUs (the
        multi-GPU measurement issues)."""
        from .nccl_shrink import NcclShrinker, plan_shrink

        self._check_open()
        nccl = self._nccl
        if nccl is None:
            return False
        members = self._nccl_members if self._nccl_members is not None else tuple(range(self.size))
        gone = [i for i, r in enumerate(members) if r in self._lost]
        if not gone:
            return False
        plan = plan_shrink(len(members), gone, members.index(self.rank))
        handle = nccl.comm_handle()
        if not handle:
            raise GfcollUnsupportedError(
                "shrink_nccl: the nccl communicator is gone (closed, or aborted by the watchdog after a "
                "failure): nothing to shrink"
            )
        if shrinker is None:
            shrinker = NcclShrinker.load(nccl.library_path(), timeout_s=self.timeout_s)
        child = shrinker.shrink(handle, plan)
        survivors = tuple(members[i] for i in plan.survivors)
        comm_rank_of = [-1] * self.size
        for k, r in enumerate(survivors):
            comm_rank_of[r] = k
        nccl.adopt(child.value, comm_rank_of)
        self._nccl_members = survivors
        return True

    @property
    def lost_ranks(self) -> frozenset[int]:
        """The ranks excluded so far (Note [Excluded ranks])."""
        return self._lost

    def check_members(self, ranks: Sequence[int], what: str) -> None:
        """Raises GfcollPeerDiedError if any of `ranks` was excluded (Note [Excluded ranks])."""
        lost = self._lost
        if lost and not lost.isdisjoint(ranks):
            gone = sorted(lost.intersection(ranks))
            raise GfcollPeerDiedError(f"{what}: rank(s) {gone} were excluded from the world (lost)")

    # -- groups ----------------------------------------------------------------------------------
    def group(self, ranks: Sequence[int]) -> Group:
        """The group of the given ordered global ranks. No communication; any process may call
        it, members or not."""
        t = tuple(ranks)
        size = self.size
        seen = set()
        for r in t:
            if type(r) is not int:
                if not isinstance(r, int) or isinstance(r, bool):
                    raise GfcollValueError(f"group: ranks must be integers, got {r!r}")
                r = int(r)
            if r < 0 or r >= size:
                raise GfcollValueError(f"group: rank {r} is out of range for a world of {size}")
            if r in seen:
                raise GfcollValueError(f"group: duplicate rank {r} in {list(t)}")
            seen.add(r)
        if not t:
            raise GfcollValueError("group: a group needs at least one rank")
        me = t.index(self.rank) if self.rank in seen else -1
        return Group(self, t, me)

    # -- point to point --------------------------------------------------------------------------
    def send(self, t, dst: int) -> None:
        """Sends t to global rank dst, which calls recv(·, src=this rank). CPU: returns once dst
        received it. CUDA: enqueued on the current stream."""
        self.batch_p2p([P2P("send", t, dst)])

    def recv(self, t, src: int) -> None:
        """Receives into t from global rank src."""
        self.batch_p2p([P2P("recv", t, src)])

    def batch_p2p(self, ops: Sequence[P2P], async_op: bool = False):
        """Issues several sends and receives that progress concurrently (no ordering deadlock
        between them). All tensors must be on one device type."""
        self._check_open()
        if not ops:
            return None
        self.check_members([p.peer for p in ops if isinstance(p, P2P)], "batch_p2p")
        # One pass that validates and builds what the transports take (this is on every call's path:
        # no per-item string formatting unless an error is raised).
        bufs, items, peers = [], [], [self.rank]
        size, me = self.size, self.rank
        for k, p in enumerate(ops):
            if type(p) is not P2P and not isinstance(p, P2P):
                raise GfcollValueError(f"batch_p2p: item {k} is not a gfcoll.P2P")
            op, peer = p.op, p.peer
            if op != "send" and op != "recv":
                raise GfcollValueError(f"batch_p2p: item {k} has op {op!r}, expected 'send' or 'recv'")
            if type(peer) is not int or not 0 <= peer < size or peer == me:
                if not isinstance(peer, int) or not 0 <= peer < size or peer == me:
                    raise GfcollValueError(
                        f"batch_p2p: item {k} has bad peer {peer!r} (rank {me}, world {size})"
                    )
                peer = int(peer)
            b = as_buf(p.tensor, _P2P_NAMES[k] if k < len(_P2P_NAMES) else f"ops[{k}].tensor")
            if bufs and b.is_cuda != bufs[0].is_cuda:
                raise GfcollValueError("batch_p2p: mix of CPU and CUDA tensors")
            bufs.append(b)
            items.append((op == "send", peer, b))
            peers.append(peer)
        if bufs[0].is_cuda:
            stream = bufs[0].stream
            native_ops = [(s, peer, b.ptr, b.nbytes) for s, peer, b in items]
            if self._select("batch_p2p", peers, bufs, 0) == "ipc":
                self._ipc.batch_p2p(native_ops, stream)
                check = self._ipc.check
            else:
                self._nccl.batch_p2p(native_ops, stream)
                check = self._nccl.check
            if not async_op:
                return None
            event = _native.lib().CudaEvent()
            event.record(stream)
            return Work(event=event, keep=[b.tensor for b in bufs], check=check)
        host = self._host_for("batch_p2p")
        native_ops = []
        with self._lock:
            for is_send, peer, b in items:
                pair = (self.rank, peer) if is_send else (peer, self.rank)
                seq = self._next_p2p_seq(pair)
                native_ops.append((is_send, peer, b.ptr, b.nbytes, _pair_hash(*pair), seq))
        if not async_op:
            host.batch_p2p(native_ops)
            return None
        return Work(future=self._executor().submit(host.batch_p2p, native_ops), keep=[b.tensor for b in bufs])

    # -- scopes ----------------------------------------------------------------------------------
    # Note [Scoped epochs]
    # ~~~~~~~~~~~~~~~~~~~~
    # Host operations are matched by (group hash, epoch); the epoch is this rank's count of the
    # group's operations (of the ordered pair's messages, for point to point). A failure breaks the
    # assumption that every member counts the same: a rank that times out in the first of several
    # operations skips the rest, while a peer goes on to issue (and publish windows for) the next one,
    # and a failed operation's published windows stay in shared memory (their slots are kept out of
    # use, HostTransport::run). The next operation between the two ranks then pairs epoch e on one
    # side with the leftover of epoch e on the other: the receiver copies stale data and reports
    # success. In serving this was a wrong image after a lost rank, seen with batched chunks (a
    # batch makes one reshard per member, so a rank failing in the first skipped the others;
    # bench/results/2026-12-06-cpu-s7/survival-batched). `scope(tag)` gives the operations of one unit
    # of work counters that start at 0 and an epoch of (tag << 32) | count, so a scope's operations
    # match only the same scope's on other ranks, and whatever a failed scope left behind is never
    # matched again. Every rank that takes part must use the same tag (the serving worker uses the
    # command's task id) and issue the scope's operations by rule 1 and 4 among themselves. Unscoped
    # operations keep the world-wide counters (epochs below 2**32). The ipc graph slots' binds are
    # never scoped: their epochs order device-side flags that must only grow.
    @contextlib.contextmanager
    def scope(self, tag: int):
        """Host operations issued inside, by this thread, are numbered in a namespace of `tag` alone
        (rule 6, Note [Scoped epochs]): every rank taking part in the work enters the same tag, an
        integer in [1, 2**31). Scopes do not nest. CUDA operations (nccl, ipc) are not affected."""
        if type(tag) is not int or not 1 <= tag < 2**31:
            raise GfcollValueError(f"scope: tag must be an integer in [1, 2**31), got {tag!r}")
        sc = self._scoped
        if getattr(sc, "tag", 0):
            raise GfcollValueError(f"scope: already in scope {sc.tag}; scopes do not nest")
        sc.tag, sc.epochs, sc.p2p_seq = tag, {}, {}
        try:
            yield self
        finally:
            sc.tag, sc.epochs, sc.p2p_seq = 0, None, None

    # -- lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        """Local teardown of this rank's resources: shared-memory mappings and the NCCL
        communicator. Every rank calls it after its last operation. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._host is not None:
            self._host.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._ipc is not None:
            self._ipc.close()
            if self._ipc.abandoned:
                log.warning(
                    "gfcoll: rank %d closed the ipc transport with an operation still blocked after "
                    "GFCOLL_TIMEOUT_S; its workspace stays mapped until the process exits",
                    self.rank,
                )
        if self._nccl is not None:
            self._nccl.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def transports(self) -> list[str]:
        out = []
        if self._host is not None:
            out.append("host")
        if self._ipc is not None:
            out.append("ipc")
        if self._nccl is not None:
            out.append("nccl")
        return out

    def check(self) -> None:
        """Raises the error an ipc or nccl operation of this rank ended with (GfcollTimeoutError,
        GfcollPeerDiedError naming the peer, GfcollNcclError), as the watchdogs recorded it."""
        if self._ipc is not None:
            self._ipc.check()
        if self._nccl is not None:
            self._nccl.check()

    # -- graph slots -----------------------------------------------------------------------------
    def graph_slot(self, size: int) -> GraphSlot:
        """A placeholder group of ``size`` members for group-agnostic CUDA graphs (ordering rule 5).
        Every rank that will bind it calls graph_slot in the same order; no communication."""
        self._check_open()
        if self._ipc is None:
            raise GfcollUnsupportedError("graph_slot: needs the ipc transport (CUDA ranks of one node)")
        if not isinstance(size, int) or size < 1:
            raise GfcollValueError(f"graph_slot: size must be a positive integer, got {size!r}")
        return GraphSlot(self, self._ipc.graph_slot(size), size)

    # -- internals -------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise GfcollClosedError("the gfcoll world was closed")

    def _next_epoch(self, ranks: tuple) -> int:
        sc = self._scoped
        if getattr(sc, "tag", 0) and ranks[0] != "slot":  # ipc slot binds keep their own order
            e = sc.epochs.get(ranks, 0)
            sc.epochs[ranks] = e + 1
            return (sc.tag << 32) | e
        with self._lock:
            e = self._epochs.get(ranks, 0)
            self._epochs[ranks] = e + 1
            return e

    def _next_p2p_seq(self, pair: tuple[int, int]) -> int:
        sc = self._scoped
        if getattr(sc, "tag", 0):
            e = sc.p2p_seq.get(pair, 0)
            sc.p2p_seq[pair] = e + 1
            return (sc.tag << 32) | e
        e = self._p2p_seq.get(pair, 0)
        self._p2p_seq[pair] = e + 1
        return e

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._async_threads, thread_name_prefix="gfcoll-async")
            return self._pool

    def _host_for(self, what: str):
        if self._host is None:
            raise GfcollUnsupportedError(
                f"{what}: CPU tensors need the host transport, which this world lacks"
            )
        return self._host

    def _select(self, what: str, group, bufs: Sequence[Buf], nbytes: int) -> str:
        """The one selection function of CUDA operations: "ipc" or "nccl" (CPU tensors always use
        host). ``group`` is a Group or a sequence of global ranks; ``nbytes`` what must fit the ipc
        staging at once (all_to_all), 0 when the transport chunks."""
        index = self._dev_index
        for b in bufs:
            if b.tensor.get_device() != index:  # an int compare: t.device builds an object
                raise GfcollValueError(
                    f"{what}: tensor is on {b.tensor.device}, but this rank's device is {self.device}"
                )
        is_group = isinstance(group, Group)
        ok = group._ipc if is_group else None
        if ok is None:
            ok = self._ipc is not None and self._ipc_ranks.issuperset(group.ranks if is_group else group)
            if is_group:
                group._ipc = ok
        force = self._force
        # auto prefers nccl where it exists: ipc is verified on one shared GPU only, not yet against
        # NCCL on several GPUs (bench/results/2026-12-01-h200/README.md); GFCOLL_TRANSPORT=ipc opts in.
        fits = nbytes == 0 or nbytes <= self._ipc_ring
        if ok and fits and (force == "ipc" or self._nccl is None):
            return "ipc"
        if self._nccl is not None:
            if force == "ipc":
                reason = (
                    f"{what} needs {nbytes} bytes of ipc staging, more than GFCOLL_IPC_BYTES allows"
                    if ok
                    else "a member is not reachable over ipc (another node, or ipc is off)"
                )
                raise GfcollUnsupportedError(f"{what}: GFCOLL_TRANSPORT=ipc but {reason}")
            return "nccl"
        if ok:
            raise GfcollUnsupportedError(
                f"{what}: needs {nbytes} bytes of ipc staging; raise GFCOLL_IPC_BYTES (no nccl transport here)"
            )
        raise GfcollUnsupportedError(
            f"{what}: CUDA tensors need the ipc transport (members on this node) or nccl; "
            f"this world has {self.transports()} on {self.device}"
        )

    def _nccl_for(self, bufs: Sequence[Buf], what: str):
        if self._nccl is None:
            raise GfcollUnsupportedError(
                f"{what}: CUDA tensors need the nccl transport; this world was initialised on {self.device}"
            )
        for b in bufs:
            if b.tensor.device != self.device:
                raise GfcollValueError(
                    f"{what}: tensor is on {b.tensor.device}, but this rank's device is {self.device}"
                )
        return self._nccl


class GraphSlot:
    """A placeholder group for group-agnostic CUDA graphs (ordering rule 5). Its operations read
    the members, this rank's index and the epoch from a device-side table that ``bind`` sets, so a
    graph captured once replays for any bound group of ``size`` members. Made by
    ``World.graph_slot``. Only CUDA tensors on this rank's device, ipc transport."""

    def __init__(self, world: World, slot: int, size: int):
        self._world = world
        self._slot = slot
        self.size = size
        self.group: Group | None = None  # the group bound last (host side), or None
        self.rank = -1  # this rank's index in the bound group

    def __repr__(self) -> str:
        return f"GraphSlot(slot={self._slot}, size={self.size}, group={self.group})"

    def bind(self, group: Group) -> None:
        """Points the slot at ``group`` on the current stream, then enqueues a barrier of the
        group (so no partner of an earlier binding is still using the slot). Every member of
        ``group`` calls it before a replay on the replay's stream; ``group.size`` must equal the
        slot's size. Counts as an operation of ``group`` (rule 1)."""
        w = self._world
        w._check_open()
        if not isinstance(group, Group):
            raise GfcollValueError(f"bind: expected a gfcoll.Group, got {type(group).__name__}")
        if group.size != self.size:
            raise GfcollValueError(f"bind: the slot has {self.size} members, the group {group.size}")
        if group.rank < 0:
            raise GfcollValueError(f"bind: rank {w.rank} is not a member of group {list(group.ranks)}")
        if not all(r in w._ipc_ranks for r in group.ranks):
            raise GfcollUnsupportedError(f"bind: group {list(group.ranks)} is not reachable over ipc")
        stream = torch.cuda.current_stream(w.device).cuda_stream
        epoch = w._next_epoch(("slot", self._slot))
        w._ipc.bind(self._slot, list(group.ranks), group.rank, epoch & 0x7FFFFFFF, stream)
        self.group = group
        self.rank = group.rank

    def _bufs(self, what: str, *named):
        self._world._check_open()
        bufs = [as_buf(t, name) for t, name in named]
        for b in bufs:
            if not b.is_cuda or b.tensor.device != self._world.device:
                raise GfcollValueError(f"{what}: graph slots take CUDA tensors on {self._world.device}")
        return bufs

    def all_gather(self, out, inp) -> None:
        """As Group.all_gather, on the bound group."""
        i, o = self._bufs("all_gather", (inp, "inp"), (out, "out"))
        check_same(i, o, "all_gather")
        if o.numel != i.numel * self.size:
            raise GfcollValueError(
                f"all_gather: out has {o.numel} elements, expected {self.size} x {i.numel}"
            )
        self._world._ipc.all_gather([], 0, i.ptr, o.ptr, i.nbytes, i.stream, self._slot)

    def reduce_scatter(self, out, inp, op: str = "sum") -> None:
        """As Group.reduce_scatter, on the bound group."""
        i, o = self._bufs("reduce_scatter", (inp, "inp"), (out, "out"))
        check_same(i, o, "reduce_scatter")
        code = op_code(op, i.tensor.dtype, "reduce_scatter")
        if i.numel != o.numel * self.size:
            raise GfcollValueError(
                f"reduce_scatter: inp has {i.numel} elements, expected {self.size} x {o.numel}"
            )
        self._world._ipc.reduce_scatter(
            [], 0, i.ptr, o.ptr, o.numel, i.dtype_code, code, i.stream, self._slot
        )

    def all_reduce(self, t, op: str = "sum") -> None:
        """As Group.all_reduce, on the bound group (in place)."""
        (b,) = self._bufs("all_reduce", (t, "t"))
        code = op_code(op, b.tensor.dtype, "all_reduce")
        self._world._ipc.all_reduce([], 0, b.ptr, b.ptr, b.numel, b.dtype_code, code, b.stream, self._slot)

    def all_to_all(self, out, inp, out_splits=None, in_splits=None) -> None:
        """As Group.all_to_all, on the bound group. Splits are baked into a capture: a graph with
        uneven splits replays for groups where this rank has the same index."""
        i, o = self._bufs("all_to_all", (inp, "inp"), (out, "out"))
        check_same(i, o, "all_to_all")
        in_off, in_sz = _split_bytes(i, in_splits, self.size, "in_splits")
        out_off, out_sz = _split_bytes(o, out_splits, self.size, "out_splits")
        self._world._ipc.all_to_all([], 0, i.ptr, o.ptr, in_off, in_sz, out_off, out_sz, i.stream, self._slot)

    def broadcast(self, t, root_index: int) -> None:
        """In place: every member's t becomes that of member ``root_index`` (an INDEX in the bound
        group, since the group is not known at capture)."""
        if not isinstance(root_index, int) or not 0 <= root_index < self.size:
            raise GfcollValueError(f"broadcast: root_index {root_index!r} is not in [0, {self.size})")
        (b,) = self._bufs("broadcast", (t, "t"))
        self._world._ipc.broadcast([], 0, root_index, b.ptr, b.nbytes, b.stream, self._slot)
