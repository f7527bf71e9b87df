"""A torchrun rendezvous backend for one node whose key-value store listens on loopback only.

    torchrun --rdzv-backend gfdit-local --nnodes 1 --nproc-per-node 4 -m gfdit.serve --model tiny-flux ...
    python -m gfdit.rendezvous --nproc-per-node 4 -m gfdit.serve ...      # the same, registering it here

For users who run the ranks under torchrun themselves (`gfdit serve` starts them with gfdit.launch,
which hosts the same kind of store). Plain `torchrun --standalone` hosts its store (c10d rendezvous,
and the agent store the ranks bootstrap through) on a torch TCPStore, which listens on every interface
whatever address it is given: anyone who can reach the machine can read and write the keys the ranks
exchange (gfcoll's shared-memory names, NCCL's unique id). `gfdit-local` hosts that one store on a
socket bound to 127.0.0.1 before torch sees it (TCPStore's master_listen_fd), so on one node nothing
but local processes can reach it. What remains: local users can still connect to the loopback port
(the store has no authentication); the engine's own ports prove the launch secret (Note
[Control-plane authentication] in gfdit.runtime.auth), the store does not.

The backend is registered as the `torchrun.handlers` entry point `gfdit-local` once gf-dit is
installed, and by `python -m gfdit.rendezvous` in any case.
"""

from __future__ import annotations

import datetime
import functools
import logging
import sys

from gfdit.launch import kStoreTimeoutS, loopback_store

__all__ = ["kBackend", "create_handler", "handler_creator", "main"]

log = logging.getLogger("gfdit.rendezvous")

kBackend = "gfdit-local"

# Nothing from torch.distributed.elastic is imported at module level: torchrun imports this module
# (the entry point) while its rendezvous package is still initialising.


@functools.cache
def _handler_class():
    from torch.distributed import PrefixStore, TCPStore
    from torch.distributed.elastic.rendezvous import RendezvousHandler, RendezvousInfo, RendezvousStoreInfo

    class LocalRendezvous(RendezvousHandler):
        """One node, one agent: the store of the job on a loopback-only socket (see the module doc)."""

        def __init__(self, run_id: str, timeout_s: float):
            self._run_id = run_id
            self._timeout = datetime.timedelta(seconds=timeout_s)
            self._store: TCPStore | None = None
            self._port = 0

        def get_backend(self) -> str:
            return kBackend

        @property
        def use_agent_store(self) -> bool:
            return True  # the ranks bootstrap through this store (TORCHELASTIC_USE_AGENT_STORE)

        def next_rendezvous(self) -> RendezvousInfo:
            if self._store is None:
                self._store, self._port = loopback_store(self._timeout.total_seconds())
                log.info("rendezvous store on 127.0.0.1:%d (loopback only)", self._port)
            store = PrefixStore(self._run_id, self._store)
            return RendezvousInfo(store, 0, 1, RendezvousStoreInfo("127.0.0.1", self._port))

        def is_closed(self) -> bool:
            return False

        def set_closed(self) -> None:
            pass

        def num_nodes_waiting(self) -> int:
            return 0

        def get_run_id(self) -> str:
            return self._run_id

        def shutdown(self) -> bool:
            return True

    return LocalRendezvous


def create_handler(params):
    """The `gfdit-local` rendezvous handler for torchrun's RendezvousParameters."""
    if params.max_nodes != 1 or params.min_nodes != 1:
        raise ValueError(
            f"rendezvous {kBackend} runs one node: --nnodes 1, got {params.min_nodes}:{params.max_nodes}"
        )
    timeout = float(params.config.get("timeout", kStoreTimeoutS))
    return _handler_class()(params.run_id, timeout)


def handler_creator():
    """The `torchrun.handlers` entry point: torchrun registers what this returns."""
    return create_handler


def main(argv: list[str] | None = None) -> None:
    from torch.distributed import run
    from torch.distributed.elastic.rendezvous import rendezvous_handler_registry

    # gfdit.rendezvous's own function (not __main__'s copy): equal to what the entry point registered.
    from gfdit.rendezvous import create_handler as registered

    rendezvous_handler_registry.register(kBackend, registered)  # a no-op when the entry point did
    run.main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    from gfdit.rendezvous import main as _main

    _main()
