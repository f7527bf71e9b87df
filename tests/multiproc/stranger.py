"""A stranger on the network against a running server: what listens, and what it does with bytes
from someone who does not hold the launch secret.

    python -m tests.multiproc.stranger --pid PID --http-port PORT --marker /tmp/marker

(PID: the torchrun process of the server) lists every listening port of the server's processes and
sends each port other than HTTP: a pickle that creates `marker` when unpickled, raw garbage, a
ZeroMQ frame announcing 2^40 bytes, and a liveness connection claiming to be rank 1, and the
pickle again as a ZeroMQ DEALER speaking ZMTP's NULL mechanism. It prints what it found; the
caller checks the marker, /health and a request afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import socket
import struct

import httpx
import psutil
import zmq

kWildcards = ("0.0.0.0", "::")
kOversizedBytes = 4 << 20  # what follows the oversized frame's header (the header says 2^40)


class _Marker:
    """Unpickling this creates the marker file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "x"))


def listeners(pid: int) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket of `pid` and its descendants."""
    root = psutil.Process(pid)
    out = []
    for p in [root, *root.children(recursive=True)]:
        try:
            conns = p.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN:
                out.append((p.pid, c.laddr.ip, c.laddr.port))
    return sorted(set(out))


def _zmtp_greeting() -> bytes:
    """ZMTP 3.0: signature, version 3.0, mechanism NULL, as-server 0, filler."""
    return b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31


def _raw(host: str, port: int, payload: bytes) -> str:
    """Sends payload on a fresh TCP connection; returns how the server reacted (bounded waits)."""
    with socket.create_connection((host, port), timeout=5) as s:
        try:
            s.sendall(payload)
        except OSError as e:
            return f"send failed: {e.__class__.__name__}"
        got, seen = b"", 0
        try:
            s.shutdown(socket.SHUT_WR)
            while seen < 1 << 16:
                chunk = s.recv(4096)
                if not chunk:
                    return f"closed by the server after {seen} bytes back"
                seen += len(chunk)
                got += chunk[: 64 - len(got)]
        except TimeoutError:
            return f"still open after 5 s ({seen} bytes back)"
        except OSError as e:
            return f"reset ({e.__class__.__name__})"
    return "?"


def _zmq_pickle(host: str, port: int, payload: bytes) -> str:
    """A DEALER with no credentials sends `payload` (a pickle) once its handshake ends."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    mon = sock.get_monitor_socket()
    sock.setsockopt(zmq.IPV6, int(":" in host))
    sock.connect(f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}")
    outcome = "no handshake within 5 s"
    try:
        poller = zmq.Poller()
        poller.register(mon, zmq.POLLIN)
        from zmq.utils.monitor import recv_monitor_message

        while poller.poll(5000):
            ev = recv_monitor_message(mon)
            name = zmq.Event(ev["event"]).name
            if name == "HANDSHAKE_SUCCEEDED":
                sock.send(payload)
                outcome = "handshake succeeded: pickle sent"
                break
            if name.startswith("HANDSHAKE_FAILED"):
                outcome = f"refused: {name}"
                break
    finally:
        sock.setsockopt(zmq.LINGER, 2000)  # close() waits for a sent message to leave
        sock.disable_monitor()
        mon.close(0)
        sock.close()
        ctx.term()
    return outcome


def probe(ip: str, port: int, marker: str) -> dict[str, str]:
    """Every stranger's attempt on one port (listening on `ip`); what each got."""
    host = "127.0.0.1" if ip in kWildcards else ip
    evil = pickle.dumps(_Marker(marker), protocol=pickle.HIGHEST_PROTOCOL)
    big = _zmtp_greeting() + b"\x02" + struct.pack("!Q", 1 << 40) + os.urandom(kOversizedBytes)
    return {
        "pickle over raw TCP": _raw(host, port, evil),
        "garbage": _raw(host, port, os.urandom(4096)),
        "oversized ZeroMQ frame": _raw(host, port, big),
        "forged liveness 'I am rank 1'": _raw(host, port, struct.pack("!q", 1)),
        "pickle over ZeroMQ (NULL mechanism)": _zmq_pickle(host, port, evil),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--marker", required=True)
    args = p.parse_args(argv)
    found = listeners(args.pid)
    report = {"listeners": [f"pid {pid} {ip}:{port}" for pid, ip, port in found], "probes": {}}
    for _pid, ip, port in found:
        if port != args.http_port:
            report["probes"][f"{ip}:{port}"] = probe(ip, port, args.marker)
    health = httpx.get(f"http://127.0.0.1:{args.http_port}/health", timeout=10)
    report["health_after"] = f"{health.status_code} {health.json().get('reason')}"
    report["marker_created"] = os.path.exists(args.marker)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
