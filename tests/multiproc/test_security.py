"""Security of a running server end to end on CPU: a 2-rank tiny-flux server started through
`gfdit serve` (gfdit.launch: loopback-only store, a fresh launch secret) with an API key and a
request-cost limit.

- No internal port (every listening socket of the server's processes but HTTP) is on a wildcard.
- Strangers on every internal port (tests.multiproc.stranger: a pickle that would create a marker
  file, garbage, an oversized ZeroMQ frame, a forged "I am rank 1" liveness connection, a pickle
  over ZeroMQ's NULL mechanism) change nothing: no marker, /health 200, a request afterwards
  completes. The engine's control loop handles its sockets in arrival order, so a request that
  completes after the probes was handled after everything the probes sent.
- /v1/* needs the key (401 in OpenAI's shape otherwise), the official OpenAI SDK with the key
  generates an image, /health and /metrics stay open, the key is on no command line.
- A request above --max-request-cost gets 400 naming the limit.
"""

from __future__ import annotations

import base64
import io
import os
import secrets
import time

import httpx
import numpy as np
import psutil
import pytest

from tests.multiproc import stranger
from tests.multiproc.test_server import Server, _healthy, _start, kStartTimeoutS

KEY = "sk-test-" + secrets.token_hex(12)
kMaxCost = 2.0  # megapixel-steps: 64x64 x 4 steps is 0.016, 256x256 x 50 steps is 3.3


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("guarded"))
    config = ("tiny-flux", "fcfs-elastic:max_sp=2", ["--api-key", KEY, "--max-request-cost", str(kMaxCost)])
    server = _start("guarded", tmp, config)
    try:
        server = _healthy(server, tmp, time.monotonic() + kStartTimeoutS, config)
        yield server
    finally:
        server.stop()


def _auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _generate(server: Server, **body) -> httpx.Response:
    body = {"prompt": "a red fox", "size": "64x64", "num_inference_steps": 4, "seed": 1, **body}
    return httpx.post(server.url + "/v1/images/generations", json=body, headers=_auth(), timeout=120)


def _internal(server: Server) -> list[tuple[int, str, int]]:
    http_port = int(server.url.rsplit(":", 1)[1])
    return [(pid, ip, port) for pid, ip, port in stranger.listeners(server.proc.pid) if port != http_port]


def test_no_internal_port_listens_on_a_wildcard(guarded):
    found = stranger.listeners(guarded.proc.pid)
    internal = _internal(guarded)
    # The store (torchrun's agent), the engine's ROUTER and its liveness listener (rank 0).
    assert len(internal) >= 3, found
    wild = [f"pid {pid} {ip}:{port}" for pid, ip, port in internal if ip in stranger.kWildcards]
    assert not wild, f"internal ports on every interface: {wild} (all listeners: {found})"
    assert all(ip == "127.0.0.1" for _, ip, _ in internal), found


def test_strangers_on_internal_ports_change_nothing(guarded, tmp_path):
    marker = str(tmp_path / "marker")
    outcomes = {f"{ip}:{port}": stranger.probe(ip, port, marker) for _, ip, port in _internal(guarded)}
    # Not one pickle got through a handshake on any port.
    assert not any(o.startswith("handshake succeeded") for p in outcomes.values() for o in p.values()), (
        outcomes
    )
    r = _generate(guarded)
    assert r.status_code == 200, r.text
    assert not os.path.exists(marker), f"a stranger's pickle was executed: {outcomes}"
    health = httpx.get(guarded.url + "/health", timeout=10)
    assert health.status_code == 200, health.text
    assert health.json()["world_size"] == 2
    log = guarded.log_tail(200_000)
    assert "liveness: closed the connection from 127.0.0.1" in log, log[-3000:]
    assert "did not prove the launch secret" in log


def test_api_key_required_on_v1_with_openai_error_body(guarded):
    for headers in ({}, _auth("wrong-key-123"), {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        for method, path in (
            ("GET", "/v1/models"),
            ("POST", "/v1/images/generations"),
            ("GET", "/v1/videos"),
        ):
            r = httpx.request(method, guarded.url + path, headers=headers, json={"prompt": "x"}, timeout=10)
            assert r.status_code == 401, (headers, path, r.text)
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and err["code"] == "invalid_api_key", err
            assert KEY not in r.text
    assert httpx.get(guarded.url + "/v1/models", headers=_auth(), timeout=10).status_code == 200
    assert httpx.get(guarded.url + "/health", timeout=10).status_code == 200  # open
    assert (
        httpx.get(guarded.url + "/metrics", timeout=10).status_code == 200
    )  # open without --protect-metrics


def test_openai_sdk_with_the_key_generates_an_image(guarded):
    openai = pytest.importorskip("openai")
    from PIL import Image

    client = openai.OpenAI(base_url=guarded.url + "/v1", api_key=KEY, timeout=120, max_retries=0)
    out = client.images.generate(model="tiny-flux", prompt="a lighthouse", size="64x64", n=1)
    with Image.open(io.BytesIO(base64.b64decode(out.data[0].b64_json))) as im:
        assert np.asarray(im.convert("RGB")).shape == (64, 64, 3)
    bad = openai.OpenAI(base_url=guarded.url + "/v1", api_key="not-the-key", timeout=30, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.images.generate(model="tiny-flux", prompt="a lighthouse", size="64x64", n=1)


def test_request_over_the_cost_limit_gets_400_naming_it(guarded):
    r = _generate(guarded, size="256x256", num_inference_steps=50)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "--max-request-cost" in err["message"] and f"{kMaxCost:g}" in err["message"], err
    assert err["code"] == "request_too_costly"
    r = _generate(guarded, size="64x64", num_inference_steps=4, n=2)  # under it
    assert r.status_code == 200, r.text


def test_the_key_is_on_no_command_line(guarded):
    with open(guarded.log_path) as f:
        printed = f.readline()
    assert printed.startswith("+ ") and "gfdit.serve" in printed and KEY not in printed, printed
    procs = [psutil.Process(guarded.proc.pid), *psutil.Process(guarded.proc.pid).children(recursive=True)]
    for p in procs:
        assert KEY not in " ".join(p.cmdline()), p.pid
    assert KEY not in guarded.log_tail(200_000)
