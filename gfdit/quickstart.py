"""The README's main job: start a gf-dit server on the embedded default and send it requests.

    python3 -m gfdit.quickstart [--nproc 4] [--model tiny-flux] [--policy edf-best-fit:max_sp=4]

Starts `gfdit serve` (CPU, tiny random-weight model) on a free local port, waits for /health, sends
a mixed batch of image requests at once plus one streamed request, prints what came back (latency,
the groups each request ran on, state moved between ranks) and a few metrics, then stops the server
with SIGTERM (its graceful drain). Exits non-zero if anything failed, the server's exit status
included; the server's log is kept (and its path printed) only then.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--model", default="tiny-flux")
    p.add_argument("--policy", default="edf-best-fit:max_sp=4")
    p.add_argument(
        "--api-key",
        default=os.environ.get("GFDIT_API_KEY"),
        help="serve with this API key and send it (default: $GFDIT_API_KEY; none: an open API)",
    )
    args = p.parse_args(argv)

    port = _free_port()
    cmd = [sys.executable, "-m", "gfdit.cli", "serve", "--nproc", str(args.nproc), "--model", args.model,
           "--policy", args.policy, "--device", "cpu", "--port", str(port), "--log-level", "warning"]  # fmt: skip
    _say("$ " + shlex.join(["gfdit", *cmd[3:]]))
    log = tempfile.NamedTemporaryFile("w+", prefix="gfdit-server-", suffix=".log", delete=False)
    env = dict(os.environ)
    if args.api_key:  # through the environment: the key stays off every command line
        env["GFDIT_API_KEY"] = args.api_key
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    ok = False
    url = f"http://127.0.0.1:{port}"
    try:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        with httpx.Client(base_url=url, timeout=300, headers=headers) as client:
            deadline = time.monotonic() + 300
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"the server exited with code {server.returncode}")
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("the server did not become healthy within 300 s")
                time.sleep(0.5)
            _say(f"server healthy at {url}: {client.get('/v1/models').json()['data'][0]['id']}")

            bodies = [
                {"prompt": f"a lighthouse, variant {i}", "size": "128x128" if i % 3 == 0 else "64x64",
                 "num_inference_steps": 6 if i % 3 == 0 else 4, "seed": i, "slo_ms": 20000}
                for i in range(6)
            ]  # fmt: skip
            with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
                replies = list(pool.map(lambda b: client.post("/v1/images/generations", json=b), bodies))
            for body, r in zip(bodies, replies, strict=True):
                r.raise_for_status()
                d = r.json()
                g = d["gfdit"]
                png = base64.b64decode(d["data"][0]["b64_json"])
                (history,) = g["groups"]  # one image (n=1): its tasks and their ranks
                groups = " ".join(f"{x['task'].split(':')[-1]}@{list(x['ranks'])}" for x in history)
                _say(f"  {body['size']:>7} seed {body['seed']}: {g['latency_ms']:.0f} ms, {len(png)} B PNG, "
                     f"{g['reshards']} reshards, {g['bytes_moved']} B moved; groups {groups}")  # fmt: skip

            events = []
            body = {
                "prompt": "streamed",
                "size": "64x64",
                "num_inference_steps": 6,
                "seed": 1,
                "stream": True,
            }
            with client.stream("POST", "/v1/images/generations", json=body) as s:
                for line in s.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        events.append(json.loads(line[6:]))
            steps = [e.get("step") for e in events if "step" in e]
            _say(f"  streamed request: {len(events)} events, steps {steps}")

            metrics = client.get("/metrics").text.splitlines()
            wanted = ("gfdit_requests_total", "gfdit_reshards_total", "gfdit_queue_depth")
            for line in metrics:
                if line.startswith(wanted):
                    _say(f"  metric {line}")
        _say("all requests completed")
        ok = True
    finally:
        server.send_signal(signal.SIGTERM)  # graceful drain, then every rank exits
        try:
            status = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            status = server.wait()
        if ok:
            _say(f"server drained and stopped (exit status {status})")
            ok = status == 0
        if not ok:
            log.seek(0)
            _say("server log (tail):\n" + "".join(log.readlines()[-40:]) + f"(whole log: {log.name})")
        log.close()
        if ok:
            os.unlink(log.name)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
