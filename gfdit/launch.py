"""torchrun for one node whose key-value store listens on loopback only.

    python -m gfdit.launch --nproc-per-node 4 -m gfdit.serve --model tiny-flux --port 8000

takes torchrun's options and runs torchrun with the rendezvous backend `gfdit-local` (what `gfdit
serve` and `gfdit profile` run). Plain `torchrun --standalone` hosts its store (c10d rendezvous, and
the agent store the ranks bootstrap through) on a torch TCPStore, which listens on every interface
whatever address it is given: anyone who can reach the machine can read and write the keys the
ranks exchange (gfcoll's shared-memory names, NCCL's unique id). `gfdit-local` hosts that one store
on a socket bound to 127.0.0.1 before torch sees it (TCPStore's master_listen_fd), so on one node
nothing but local processes can reach it. What remains: local users can still connect to the
loopback port (the store has no authentication); the engine's own ports prove the launch secret
(Note [Control-plane authentication] in gfdit.runtime.auth), the store does not.

The backend is registered here, and also as the `torchrun.handlers` entry point `gfdit-local`, so
`torchrun --rdzv-backend gfdit-local --nnodes 1 --nproc-per-node N ...` works as well once gf-dit
is installed.
"""

from __future__ import annotations

import datetime
import functools
import logging
import socket
import sys

__all__ = ["kBackend", "create_handler", "handler_creator", "launch_args", "main"]

log = logging.getLogger("gfdit.launch")

kBackend = "gfdit-local"
kDefaultTimeoutS = 600  # how long the store waits on a key; torchrun's static backend's default

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
                listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                listener.bind(("127.0.0.1", 0))
                listener.listen(128)
                self._port = listener.getsockname()[1]
                # The store owns the descriptor from here on (detach: Python never closes it).
                self._store = TCPStore(
                    "127.0.0.1",
                    self._port,
                    None,
                    True,
                    self._timeout,
                    wait_for_workers=False,
                    multi_tenant=True,
                    master_listen_fd=listener.detach(),
                )
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
    timeout = float(params.config.get("timeout", kDefaultTimeoutS))
    return _handler_class()(params.run_id, timeout)


def handler_creator():
    """The `torchrun.handlers` entry point: torchrun registers what this returns."""
    return create_handler


def launch_args(nproc: int) -> list[str]:
    """torchrun's options for one node on the `gfdit-local` backend."""
    return [
        "--rdzv-backend", kBackend, "--rdzv-endpoint", "127.0.0.1:0", "--nnodes", "1",
        "--nproc-per-node", str(nproc),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    from torch.distributed import run
    from torch.distributed.elastic.rendezvous import rendezvous_handler_registry

    # gfdit.launch's own function (not __main__'s copy): equal to what the entry point registered.
    from gfdit.launch import create_handler as registered

    rendezvous_handler_registry.register(kBackend, registered)  # a no-op when the entry point did
    run.main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    from gfdit.launch import main as _main

    _main()
