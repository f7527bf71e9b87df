"""This rank's gfcoll world, from torchrun's environment or, without it, as a world of one rank:
what `gfdit serve` and `gfdit profile` start from."""

from __future__ import annotations

import os
import socket

import gfcoll

__all__ = ["init_world"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_world(device: str | None) -> gfcoll.World:
    """gfcoll.init(device=...) under torchrun's environment (RANK set; collective: every rank calls
    it); otherwise a world of one rank, bootstrapped through an in-process store (no port is kept)."""
    if "RANK" in os.environ:
        return gfcoll.init(device=device)
    from torch.distributed import HashStore

    return gfcoll.init(
        rank=0, world_size=1, local_rank=0, local_world_size=1,
        master_addr="127.0.0.1", master_port=_free_port(), device=device, store=HashStore(),
    )  # fmt: skip
