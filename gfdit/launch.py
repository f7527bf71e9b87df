"""Start the ranks of one node and supervise them: what `gfdit serve` and `gfdit profile` run.

    gfdit serve --nproc 4 --model tiny-flux ...    ->   launch(4, "gfdit.serve", [...])

Every rank is `python -m MODULE ARGS` with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT, TORCHELASTIC_USE_AGENT_STORE=true), so the
same module also runs under torchrun. Like torchrun's agent, the launcher hosts the key-value store
the ranks bootstrap through (gfcoll.init), but on a socket bound to 127.0.0.1 only: torch's
TCPStore listens on every interface whatever address it is given, unless handed a listening socket
(master_listen_fd). Why not torchrun itself: on a signal its agent raises SignalException (a
traceback, exit status 1, however cleanly the ranks drained), and it stops every rank as soon as
one fails.

Note [Launcher signals and exit status]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
SIGTERM or SIGINT to the launcher goes to rank 0 alone: rank 0 drains (gfdit.serve) and closes the
engine, which ends the other ranks. A second signal is forwarded too (rank 0 then stops without
waiting). Ranks still running `shutdown_timeout_s` after the first signal, or after rank 0 has
exited, are killed. The launcher exits with rank 0's status (gfdit.serve: 0 when every accepted
request completed or was cancelled by its client, kExitDrainFailed when the drain had to fail
some); a rank that dies while rank 0 runs is logged and does not by itself change the status:
rank 0's engine notices the loss and reports it over /health.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time

__all__ = ["launch", "loopback_store", "rank_command"]

log = logging.getLogger("gfdit.launch")

kPollS = 0.1  # how often the supervisor looks at its children


kStoreTimeoutS = 600.0  # how long a store client waits on a key (torchrun's static rendezvous default)


def loopback_store(timeout_s: float = kStoreTimeoutS):
    """A torch TCPStore server reachable from this machine only: (store, port)."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    store = TCPStore(
        "127.0.0.1", port, None, True, timedelta(seconds=timeout_s), wait_for_workers=False,
        multi_tenant=True, master_listen_fd=listener.detach(),  # the store owns the socket from here
    )  # fmt: skip
    return store, port


def rank_command(module: str, args: list[str]) -> list[str]:
    """The command line of one rank."""
    return [sys.executable, "-m", module, *args]


def _rank_env(environ: dict[str, str], rank: int, nproc: int, port: int) -> dict[str, str]:
    env = dict(environ)
    env.update(
        RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc),
        GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        TORCHELASTIC_USE_AGENT_STORE="true",  # the launcher hosts the store, as torchrun's agent does
    )  # fmt: skip
    return env


def _status(code: int) -> int:
    """A shell's exit status for a child's returncode (negative: killed by that signal)."""
    return 128 - code if code < 0 else code


def launch(
    nproc: int, module: str, args: list[str], *, shutdown_timeout_s: float = 30.0, environ=None
) -> int:
    """Runs `nproc` ranks of `module` on this node until rank 0 exits; returns the exit status
    (Note [Launcher signals and exit status]). Blocks; installs SIGTERM/SIGINT handlers."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    environ = dict(os.environ if environ is None else environ)
    store, port = loopback_store()
    cmd = rank_command(module, args)
    procs: list[subprocess.Popen] = []
    signalled_at: list[float] = []

    def forward(sig, _frame):
        if not signalled_at:
            signalled_at.append(time.monotonic())
        if procs and procs[0].poll() is None:
            procs[0].send_signal(sig)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for rank in range(nproc):
            procs.append(subprocess.Popen(cmd, env=_rank_env(environ, rank, nproc, port)))
        if signalled_at:  # a signal that came while the ranks were starting
            procs[0].send_signal(signal.SIGTERM)
        reported: set[int] = set()
        rank0_done_at = None
        while True:
            codes = [p.poll() for p in procs]
            for rank, code in enumerate(codes):
                if rank > 0 and code not in (None, 0) and rank not in reported and codes[0] is None:
                    reported.add(rank)
                    log.warning(
                        "rank %d (pid %d) exited with status %d", rank, procs[rank].pid, _status(code)
                    )
            if all(c is not None for c in codes):
                break
            now = time.monotonic()
            if codes[0] is not None and rank0_done_at is None:
                rank0_done_at = now
            started = min([t for t in (rank0_done_at, *signalled_at) if t is not None], default=None)
            if started is not None and now - started > shutdown_timeout_s:
                for rank, p in enumerate(procs):
                    if p.poll() is None:
                        log.error("rank %d (pid %d) still running %.0f s after shutdown began: killed",
                                  rank, p.pid, shutdown_timeout_s)  # fmt: skip
                        p.kill()
                for p in procs:
                    p.wait()
                break
            time.sleep(kPollS)
        return _status(procs[0].returncode)
    finally:
        for p in procs:  # an exception in the supervisor must not leave ranks behind
            if p.poll() is None:
                p.kill()
                p.wait()
        for s, h in old.items():
            signal.signal(s, h)
        del store  # the ranks are gone: nobody needs the store any more
