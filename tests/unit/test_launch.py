"""gfdit.launch: the ranks `gfdit serve` starts and supervises (Note [Launcher signals and exit status])."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A rank program: writes "RANK.up" when its handlers are installed; on SIGTERM writes "RANK.term" and
# exits with RANK0_STATUS (rank 0) or waits for rank 0's exit (others: rank 0 "closes the engine").
RANK_PROGRAM = textwrap.dedent(
    """
    import os, signal, sys, time
    d, rank = os.environ["TEST_DIR"], int(os.environ["RANK"])
    assert os.environ["WORLD_SIZE"] == os.environ["LOCAL_WORLD_SIZE"] == os.environ["NUM"]
    assert os.environ["MASTER_ADDR"] == "127.0.0.1" and int(os.environ["MASTER_PORT"]) > 0
    mode = os.environ.get("MODE", "")
    def on_term(sig, frame):
        open(os.path.join(d, f"{rank}.term"), "w").close()
        if rank == 0:
            sys.exit(int(os.environ.get("RANK0_STATUS", "0")))
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if rank > 0 and mode == "die":
        sys.exit(5)
    if rank > 0 and mode == "linger":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    open(os.path.join(d, f"{rank}.up"), "w").close()
    deadline = time.monotonic() + 60
    if rank == 0 and mode in ("exit", "die", "linger"):
        while mode == "die" and not os.path.exists(os.path.join(d, "1.gone")):
            if time.monotonic() > deadline:
                sys.exit(99)
            time.sleep(0.01)
        sys.exit(int(os.environ.get("RANK0_STATUS", "0")))
    while time.monotonic() < deadline:  # rank 0: until SIGTERM; others: until rank 0 "closes the engine"
        if rank > 0 and mode == "serve" and os.path.exists(os.path.join(d, "0.term")):
            sys.exit(0)
        time.sleep(0.01)
    sys.exit(98)
    """
)


def _launcher(tmp_path, num: int, mode: str, rank0_status: int = 0, shutdown_s: float = 30.0):
    pkg = tmp_path / "pkg"
    pkg.mkdir(exist_ok=True)
    (pkg / "rankprog.py").write_text(RANK_PROGRAM)
    env = dict(os.environ, TEST_DIR=str(tmp_path), NUM=str(num), MODE=mode, RANK0_STATUS=str(rank0_status))
    env["PYTHONPATH"] = os.pathsep.join([str(pkg), ROOT, env.get("PYTHONPATH", "")])
    code = f"import sys; from gfdit.launch import launch; sys.exit(launch({num}, 'rankprog', [], shutdown_timeout_s={shutdown_s}))"
    return subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)


def _wait_files(tmp_path, names, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not all((tmp_path / n).exists() for n in names):
        assert time.monotonic() < deadline, f"{names} not all written within {timeout_s} s"
        time.sleep(0.01)


@pytest.mark.parametrize("status", [0, 3])
def test_sigterm_goes_to_rank_0_alone_and_its_status_is_the_launchers(tmp_path, status):
    proc = _launcher(tmp_path, 3, "serve", rank0_status=status)
    _wait_files(tmp_path, ["0.up", "1.up", "2.up"])
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == status, err
    assert (tmp_path / "0.term").exists()
    assert not (tmp_path / "1.term").exists() and not (tmp_path / "2.term").exists()  # rank 0 ends them
    assert "Traceback" not in err, err


def test_a_rank_that_dies_does_not_change_the_status(tmp_path):
    proc = _launcher(tmp_path, 2, "die")
    # rank 1 exits 5 at once; rank 0 waits for the marker the test writes once the launcher said so
    deadline = time.monotonic() + 60
    err_lines = []
    for line in proc.stderr:
        err_lines.append(line)
        if "rank 1" in line and "status 5" in line:
            (tmp_path / "1.gone").touch()
            break
        assert time.monotonic() < deadline
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, "".join(err_lines) + rest


def test_ranks_left_running_after_rank_0_are_killed(tmp_path):
    proc = _launcher(tmp_path, 2, "linger", shutdown_s=1.0)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "rank 1" in err and "killed" in err, err


def test_bad_nproc_is_refused():
    from gfdit.launch import launch

    with pytest.raises(ValueError, match="nproc"):
        launch(0, "gfdit.serve", [])


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} write them) listening on `port`."""
    found = []
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(path).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.rsplit(":", 1)
            if int(p, 16) == port and state == "0A":  # LISTEN
                found.append(addr)
    return found


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux's /proc/net/tcp")
def test_the_store_listens_on_loopback_only():
    from gfdit.launch import loopback_store

    store, port = loopback_store(timeout_s=10)
    store.set("k", "v")
    assert store.get("k") == b"v"
    assert _listening(port) == ["0100007F"], _listening(port)  # 127.0.0.1, no wildcard
