"""gfcoll.init(): the key-value-store handshake that sets up the transports once per world."""

from __future__ import annotations

import functools
import glob
import logging
import os
import socket
import sys
import uuid
from datetime import timedelta

import torch

from . import _env, _native
from .errors import GfcollError, GfcollValueError
from .world import World

log = logging.getLogger("gfcoll")

_init_count = 0  # per process: namespaces the store keys of successive worlds
# Stores this process made. Rank 0's TCPStore object owns the server that every other rank talks
# to: dropping it when init returns would cut off ranks still bootstrapping, so it lives until exit.
_stores: list = []


def _env_int(name: str, given):
    if given is not None:
        return int(given)
    raw = os.environ.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise GfcollValueError(f"environment variable {name}={raw!r} is not an integer") from None


def _make_store(rank, size, addr, port, timeout_s):
    import torch.distributed as dist  # noqa: PLC0415
    from torch.distributed import TCPStore  # noqa: PLC0415

    if dist.is_available() and dist.is_initialized():
        base = dist.distributed_c10d._get_default_store()
    else:
        if addr is None or port is None:
            raise GfcollValueError(
                "gfcoll.init: MASTER_ADDR and MASTER_PORT are needed (set by torchrun), or pass store="
            )
        # Under torchrun the agent hosts the store; otherwise rank 0 does.
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        is_master = rank == 0 and not agent
        base = TCPStore(
            addr,
            int(port),
            size,
            is_master=is_master,
            timeout=timedelta(seconds=timeout_s),
            wait_for_workers=False,
            multi_tenant=True,
            **({"master_listen_fd": _listen_fd(addr, int(port))} if is_master else {}),
        )
    return base


def _listen_fd(addr: str, port: int) -> int:
    """A socket listening on MASTER_ADDR's own address, handed to the TCPStore server: given a port
    alone, TCPStore would listen on every interface. The store owns the descriptor."""
    errors = []
    infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    for family, _, _, _, sockaddr in sorted(infos, key=lambda i: i[0] != socket.AF_INET):
        try:
            s = socket.create_server(sockaddr[:2], family=family, backlog=128)
        except OSError as e:
            errors.append(f"{sockaddr[0]}: {e}")
            continue
        return s.detach()
    raise GfcollError(f"gfcoll.init: cannot listen on MASTER_ADDR {addr}:{port}: {'; '.join(errors)}")


def _wait(store, keys, timeout_s, what):
    try:
        for key in keys:
            store.get(key)
    except Exception as e:  # torch raises DistStoreError / DistNetworkError / RuntimeError
        raise GfcollError(f"gfcoll.init: gave up after waiting for {what} ({key}): {e}") from e


@functools.cache
def _nccl_candidates() -> tuple[str, ...]:
    """GFCOLL_NCCL_PATH, else the copy torch loaded (""), else the nvidia-nccl wheel's copy."""
    override = _env.get_str(_env.NCCL_PATH)
    if override:
        return (override,)
    found = [""]
    for entry in sys.path:
        found += sorted(glob.glob(os.path.join(entry, "nvidia", "nccl", "lib", "libnccl.so.2")))
    return tuple(found)


def load_nccl():
    errors = []
    for path in _nccl_candidates():
        try:
            return _native.lib().NcclTransport(path)
        except GfcollError as e:
            errors.append(str(e))
    raise GfcollError("cannot load NCCL: " + " | ".join(errors))


def build_info() -> dict:
    """Which transports were built, and the CUDA and NCCL versions the build saw."""
    info = dict(_native.lib().build_info())
    info["nccl_runtime"] = None
    if "nccl" in info["transports"]:
        try:
            t = load_nccl()
            v = t.version()
            info["nccl_runtime"] = f"{v // 10000}.{v // 100 % 100}.{v % 100}"
            info["nccl_library"] = t.library_path()
        except GfcollError as e:
            info["nccl_runtime_error"] = str(e)
    return info


def init(
    *,
    rank: int | None = None,
    world_size: int | None = None,
    local_rank: int | None = None,
    local_world_size: int | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    device: str | torch.device | None = None,
    store=None,
    timeout_s: float | None = None,
    ipc_bytes: int | None = None,
) -> World:
    """Creates this rank's World. Collective: every rank of the job calls it once.

    Arguments default to torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT). ``device``: "cuda", "cpu" or None (CUDA when a GPU and the nccl
    transport are available). ``store``: a torch.distributed Store to bootstrap through (default:
    torch.distributed's if initialised, else a TCPStore at MASTER_ADDR:MASTER_PORT). All setup
    (shared-memory segments, ipc workspaces and their handles, the NCCL communicator and its peer
    connections) happens here, once. ``ipc_bytes``: the ipc workspace per rank (default
    GFCOLL_IPC_BYTES). With CUDA, ranks are placed round-robin on the visible GPUs; where two ranks
    share a GPU no NCCL communicator is created (NCCL refuses it) and ipc serves CUDA operations.
    """
    global _init_count
    rank = _env_int("RANK", rank)
    size = _env_int("WORLD_SIZE", world_size)
    if rank is None or size is None:
        raise GfcollValueError("gfcoll.init: rank and world size are needed (RANK/WORLD_SIZE or arguments)")
    if size < 1 or not 0 <= rank < size:
        raise GfcollValueError(f"gfcoll.init: rank {rank} out of range for world size {size}")
    local_rank = _env_int("LOCAL_RANK", local_rank)
    local_size = _env_int("LOCAL_WORLD_SIZE", local_world_size)
    local_rank = rank if local_rank is None else local_rank
    local_size = size if local_size is None else local_size
    master_addr = master_addr or os.environ.get("MASTER_ADDR")
    master_port = master_port if master_port is not None else os.environ.get("MASTER_PORT")
    timeout_s = float(timeout_s if timeout_s is not None else _env.get_float(_env.TIMEOUT_S))
    if timeout_s <= 0:
        raise GfcollValueError(f"gfcoll.init: timeout must be positive, got {timeout_s}")

    info = _native.lib().build_info()
    cuda_built = "nccl" in info["transports"] or "ipc" in info["transports"]
    force = _env.get_str(_env.TRANSPORT).strip().lower() or "auto"
    if force not in ("auto", "host", "ipc", "nccl"):
        raise GfcollValueError(f"GFCOLL_TRANSPORT={force!r}: expected auto, host, ipc or nccl")
    if force in ("ipc", "nccl") and force not in info["transports"]:
        raise GfcollValueError(f"GFCOLL_TRANSPORT={force}: this build has only {info['transports']}")
    if device is None:
        device = "cuda" if (cuda_built and torch.cuda.is_available() and force != "host") else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not cuda_built:
            raise GfcollValueError("gfcoll.init: device cuda needs a build with the ipc or nccl transport")
        if not torch.cuda.is_available():
            raise GfcollValueError("gfcoll.init: device cuda requested but no GPU is visible")
        index = device.index if device.index is not None else local_rank % torch.cuda.device_count()
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise GfcollValueError(f"gfcoll.init: device must be 'cuda' or 'cpu', got {device}")

    from torch.distributed import PrefixStore  # noqa: PLC0415

    if store is not None:
        base = store
    else:
        base = _make_store(rank, size, master_addr, master_port, timeout_s)
        _stores.append(base)
    store = PrefixStore(f"gfcoll/{_init_count}/", base)
    _init_count += 1

    world = World(rank, size, local_rank, local_size, device)
    world.configure(timeout_s=timeout_s, async_threads=_env.get_int(_env.HOST_ASYNC_THREADS), force=force)
    if ipc_bytes is None:
        ipc_bytes = _env.get_int(_env.IPC_BYTES)
    try:
        local = _setup_host(world, store, timeout_s)
        if device.type == "cuda":
            shared = _placement(world, store, timeout_s)
            if "ipc" in info["transports"] and force in ("auto", "ipc"):
                _setup_ipc(world, store, timeout_s, local, int(ipc_bytes))
            if shared:
                if force == "nccl":
                    raise GfcollValueError(
                        "gfcoll.init: GFCOLL_TRANSPORT=nccl, but ranks share a GPU and NCCL refuses that"
                    )
                log.info("gfcoll: %d ranks share %s GPUs: no NCCL communicator, ipc only", size, shared)
            elif "nccl" in info["transports"] and force in ("auto", "nccl"):
                _setup_nccl(world, store, timeout_s)
            if world.native_transport("ipc") is None and world.native_transport("nccl") is None:
                raise GfcollValueError("gfcoll.init: no CUDA transport could be set up (see the log)")
    except BaseException:
        world.close()
        raise
    log.info("gfcoll world ready: rank %d/%d on %s, transports %s", rank, size, device, world.transports())
    return world


def _setup_host(world: World, store, timeout_s: float) -> None:
    rank, size = world.rank, world.size
    node = socket.gethostname()
    store.set(f"node/{rank}", node)
    _wait(store, [f"node/{r}" for r in range(size)], timeout_s, "every rank to register")
    local = [r for r in range(size) if store.get(f"node/{r}").decode() == node]
    if world.device.type == "cpu" and len(local) != size:
        raise GfcollValueError(
            f"gfcoll.init: the host transport (device cpu) needs every rank on one node; "
            f"this node has ranks {local} of {size}"
        )
    opts = _native.lib().HostOptions()
    opts.num_slots = _env.get_int(_env.HOST_SLOTS)
    opts.chunk_bytes = _env.get_int(_env.HOST_CHUNK_BYTES)
    opts.timeout_s = timeout_s
    host = _native.lib().HostTransport(rank, size, opts)
    world.attach_transport("host", host)
    if rank == local[0]:
        store.set(f"token/{node}", uuid.uuid4().hex[:16])
    token = store.get(f"token/{node}").decode()
    name = host.create_segment(f"/gfcoll-{token}-{rank}")
    try:
        store.set(f"host/{rank}", name)
        peers = [r for r in local if r != rank]
        _wait(store, [f"host/{r}" for r in peers], timeout_s, "local peers' shared memory")
        for r in peers:
            host.attach(r, store.get(f"host/{r}").decode())
        store.set(f"attached/{rank}", "1")
        _wait(store, [f"attached/{r}" for r in peers], timeout_s, "local peers to map shared memory")
    finally:
        # Mapped by every peer (or failed): the name is no longer needed, and no file outlives us.
        host.unlink_own()
    return local


def _placement(world: World, store, timeout_s: float) -> str:
    """Publishes this rank's (node, GPU); returns "" if every rank has a GPU of its own, else a
    description of the sharing (then NCCL, which refuses two ranks on one GPU, is not created)."""
    dev = world.device
    try:
        uuid_ = str(torch.cuda.get_device_properties(dev).uuid)
    except Exception:  # older torch: fall back to the ordinal
        uuid_ = str(dev.index)
    store.set(f"gpu/{world.rank}", f"{socket.gethostname()}|{uuid_}")
    _wait(store, [f"gpu/{r}" for r in range(world.size)], timeout_s, "every rank's GPU")
    seen = [store.get(f"gpu/{r}").decode() for r in range(world.size)]
    distinct = len(set(seen))
    return "" if distinct == world.size else f"{distinct}"


def _setup_ipc(world: World, store, timeout_s: float, local: list[int], ipc_bytes: int) -> None:
    """One workspace per rank, its IPC handle opened once by every local peer. Every local rank
    publishes whether it succeeded; ipc is used only if all did (the same verdict everywhere)."""
    rank = world.rank
    lib = _native.lib()
    ipc = None
    handle = b""
    try:
        opts = lib.IpcOptions()
        opts.workspace_bytes = ipc_bytes
        opts.timeout_s = timeout_s
        ipc = lib.IpcTransport(rank, world.device.index, len(local), opts)
        handle = ipc.handle()
    except GfcollError as e:
        log.warning("gfcoll: ipc transport unavailable on rank %d: %s", rank, e)
        if ipc is not None:
            ipc.close()
        ipc = None
    store.set(f"ipc/{rank}", handle)
    store.set(f"ipcpid/{rank}", str(os.getpid()))
    _wait(store, [f"ipc/{r}" for r in local] + [f"ipcpid/{r}" for r in local], timeout_s, "local ipc handles")
    handles = [store.get(f"ipc/{r}") for r in local]
    ok = ipc is not None and all(handles)
    if ok:
        try:
            ipc.attach(local, handles, [int(store.get(f"ipcpid/{r}")) for r in local])
        except GfcollError as e:
            log.warning("gfcoll: rank %d cannot map its peers' ipc workspaces: %s", rank, e)
            ok = False
    store.set(f"ipcok/{rank}", "1" if ok else "0")
    _wait(store, [f"ipcok/{r}" for r in local], timeout_s, "local peers to map ipc workspaces")
    if ok and all(store.get(f"ipcok/{r}") == b"1" for r in local):
        world.attach_transport("ipc", ipc, ipc_ranks=local, ipc_ring_bytes=ipc.staging_bytes() * 4)
        return
    if ipc is not None:
        ipc.close()
    log.warning("gfcoll: ipc transport off on this node (a local rank could not set it up)")


def _setup_nccl(world: World, store, timeout_s: float) -> None:
    nccl = load_nccl()
    if world.rank == 0:
        store.set("nccl/id", nccl.unique_id())
    _wait(store, ["nccl/id"], timeout_s, "rank 0's NCCL id")
    uid = store.get("nccl/id")
    nccl.init(world.rank, world.size, uid, world.device.index)
    world.attach_transport("nccl", nccl)
    nccl.warmup()
    nccl.start_watchdog(timeout_s)  # bounds every operation; aborts the communicator on failure
