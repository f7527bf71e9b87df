"""Every GFCOLL_* environment variable, read in this one module."""

from __future__ import annotations

import os

# Seconds an operation waits for a peer before raising GfcollTimeoutError.
TIMEOUT_S = "GFCOLL_TIMEOUT_S"
# Path of libnccl.so.2 to load instead of the copy torch already loaded.
NCCL_PATH = "GFCOLL_NCCL_PATH"
# Host transport: slots per rank (operations' windows in flight) and bytes per slot. The defaults
# (32 x 512 KiB = 16 MiB of /dev/shm per rank) were chosen to fit a container's small /dev/shm;
# larger chunks help only above a few MiB per message.
HOST_SLOTS = "GFCOLL_HOST_SLOTS"
HOST_CHUNK_BYTES = "GFCOLL_HOST_CHUNK_BYTES"
# Threads that run asynchronous host-transport operations.
HOST_ASYNC_THREADS = "GFCOLL_HOST_ASYNC_THREADS"
# ipc transport: bytes of the CUDA workspace of each rank (control block, staging ring, and a
# quarter reserved for operations captured in CUDA graphs). Staging for one eager operation is
# chunked at 3/16 of it (a quarter of the ring); an all_to_all must fit its whole input in the
# ring (3/4 of it).
IPC_BYTES = "GFCOLL_IPC_BYTES"
# Transport of CUDA operations: "auto" (ipc for groups of one node, else nccl), or force one of
# "ipc", "nccl" ("host" forces nothing on CUDA: host is the transport of CPU tensors).
TRANSPORT = "GFCOLL_TRANSPORT"

_DEFAULTS = {
    TIMEOUT_S: "300",
    NCCL_PATH: "",
    HOST_SLOTS: "32",
    HOST_CHUNK_BYTES: str(512 * 1024),
    HOST_ASYNC_THREADS: "64",
    IPC_BYTES: str(256 << 20),
    TRANSPORT: "auto",
}


def get_str(name: str) -> str:
    return os.environ.get(name, _DEFAULTS[name])


def get_float(name: str) -> float:
    raw = get_str(name)
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None


def get_int(name: str) -> int:
    raw = get_str(name)
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
