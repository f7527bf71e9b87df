"""Serving survives a lost rank (Note [Surviving a lost rank] in gfdit.runtime.engine), end to end:
`gfdit serve --nproc 4` of tiny-flux on CPU, 20 requests in flight, one non-zero rank killed
(SIGKILL) or stopped (SIGSTOP, found by the watchdog). Every request completes with the image an
undisturbed run gives for its seed, 10 more complete afterwards, /health is 200 "degraded" naming
the rank, and SIGTERM then exits 0."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from tests.launch import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
kStartTimeoutS = 300.0  # four ranks importing torch + diffusers on a 2-core CI machine
kGfcollTimeoutS = 5  # GFCOLL_TIMEOUT_S: survivors blocked on a stopped rank give up after this
kNumRequests = 20
kVictim = 2  # the rank killed or stopped


def _png(b64: str) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        return np.asarray(im.convert("RGB"))


def _body(i: int) -> dict:
    return {"prompt": f"request {i % 5}", "size": "256x256", "num_inference_steps": 16, "seed": 100 + i}


def _generate(url: str, body: dict) -> tuple[int, np.ndarray | None, str]:
    r = httpx.post(url + "/v1/images/generations", json=body, timeout=300)
    if r.status_code != 200:
        return r.status_code, None, r.text
    return 200, _png(r.json()["data"][0]["b64_json"]), ""


def _generate_streamed(
    url: str, body: dict, first_step: threading.Event
) -> tuple[int, np.ndarray | None, str]:
    """As _generate, streaming: sets `first_step` at the first progress event with a step done."""
    final = None
    with httpx.stream(
        "POST", url + "/v1/images/generations", json={**body, "stream": True}, timeout=300
    ) as r:
        if r.status_code != 200:
            return r.status_code, None, r.read().decode()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            if event.get("step", 0) >= 1:
                first_step.set()
            if event.get("type") in ("image_generation.completed", "error"):
                final = event
    if final is None or final["type"] == "error":
        return 500, None, str(final)
    return 200, _png(final["data"][0]["b64_json"]), ""


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"metric {name} missing")


def _until(predicate, timeout: float, what: str, period: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(period)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def server(tmp_path):
    port = free_port()
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS="1", GFCOLL_TIMEOUT_S=str(kGfcollTimeoutS))
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        sys.executable, "-m", "gfdit.cli", "serve", "--nproc", "4", "--model", "tiny-flux",
        "--policy", "fcfs-elastic", "--device", "cpu", "--port", str(port), "--log-level", "warning",
        "--chunk-steps", "2", "--task-timeout-floor", "3", "--task-timeout-factor", "20",
    ]  # fmt: skip
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"

    def up():
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            return httpx.get(url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        _until(up, kStartTimeoutS, "the server to be healthy", period=0.25)
        yield url, proc, log_path
    finally:
        try:
            os.killpg(proc.pid, signal.SIGCONT)  # a stopped rank must be able to die
            os.killpg(proc.pid, signal.SIGKILL)  # no rank may outlive the test
        except ProcessLookupError:
            pass
        proc.wait(30)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_serving_survives_a_lost_rank(server, sig):
    url, proc, log_path = server
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and [r["state"] for r in health["ranks"]] == ["up"] * 4, health
    pids = {r["rank"]: r["pid"] for r in health["ranks"]}
    assert len(set(pids.values())) == 4 and all(p > 0 for p in pids.values()), pids
    with ThreadPoolExecutor(kNumRequests) as pool:
        # The reference: the same requests, undisturbed.
        reference = list(pool.map(lambda i: _generate(url, _body(i)), range(kNumRequests)))
        assert all(code == 200 for code, _, _ in reference), [t for _, _, t in reference if t][:2]
        # Again, and the victim goes while they run: request 0 streams its progress, and its first
        # step means it (and the 19 submitted with it) are in flight.
        first_step = threading.Event()
        futures = [pool.submit(_generate_streamed, url, _body(0), first_step)]
        futures += [pool.submit(_generate, url, _body(i)) for i in range(1, kNumRequests)]
        assert first_step.wait(120), "request 0 made no progress"

        # The victim must hold some request's state when it goes (/health counts, per rank, the
        # unfinished requests whose latent lives there; it moves only at chunk boundaries).
        _until(
            lambda: httpx.get(url + "/health").json()["ranks"][kVictim]["requests"] >= 1,
            120,
            f"rank {kVictim} to hold a request's latent",
        )
        os.kill(pids[kVictim], sig)
        results = [f.result(timeout=300) for f in futures]
    for i, ((code, image, text), (_, ref, _)) in enumerate(zip(results, reference, strict=True)):
        assert code == 200, (i, text)
        assert int(np.abs(image.astype(int) - ref.astype(int)).max()) <= 2, i
    health = _until(
        lambda: (h := httpx.get(url + "/health")).json()["status"] == "degraded" and h, 60, "degraded health"
    )
    want = "lost" if sig == signal.SIGKILL else "hung"
    body = health.json()
    assert health.status_code == 200, body
    assert [(r["rank"], r["state"]) for r in body["ranks"]] == [
        (r, want if r == kVictim else "up") for r in range(4)
    ], body
    assert f"rank {kVictim} {want}" in body["reason"], body
    # 10 more, after the loss, on the survivors.
    with ThreadPoolExecutor(10) as pool:
        more = list(pool.map(lambda i: _generate(url, _body(i)), range(10)))
    assert all(code == 200 for code, _, _ in more), [t for _, _, t in more if t][:2]
    for (_, image, _), (_, ref, _) in zip(more, reference[:10], strict=True):
        assert int(np.abs(image.astype(int) - ref.astype(int)).max()) <= 2
    assert _metric(url, "gfdit_ranks_alive") == 3
    assert _metric(url, "gfdit_requests_rerun_total") >= 1  # the victim held some request's state
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 0, log_path.read_text()[-4000:]  # every accepted request completed
