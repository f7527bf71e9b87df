"""The HTTP server end to end on CPU: real `gfdit serve` / `torchrun ... -m gfdit.serve` processes
(2 ranks each, host transport, tiny presets), driven over HTTP with httpx.

Four servers start once for the module, concurrently: tiny-flux under fcfs-elastic ("elastic",
under plain torchrun), tiny-flux under static:sp=1 ("static", small limits: the property-based run
uses it), tiny-wan ("wan", a queue of 2 for the 429 test), and tiny-flux under fcfs-elastic with
max_batch=2 ("batch": only the bench test sends it work); the SIGTERM test starts a server of its
own ("drain"), so no test depends on another's order. A dead worker is tested in-process
(run_ranks, uvicorn in a thread). The module takes a few minutes on 2 cores.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.launch import free_port, run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
kStartTimeoutS = 300.0  # four servers importing torch + diffusers at once on a 2-core CI machine

SERVERS = {
    "elastic": (
        "tiny-flux", "fcfs-elastic:max_sp=2,max_batch=1",
        ["--chunk-steps", "2", "--max-steps", "200", "--max-queue", "64", "--max-request-cost", "200"],
    ),
    "static": ("tiny-flux", "static:sp=1,max_batch=1", ["--max-steps", "8", "--drain-timeout", "0.5"]),
    # Unbatched servers: these tests count queue slots and chunks one request at a time.
    "wan": ("tiny-wan", "fcfs-elastic:max_batch=1", ["--max-steps", "200", "--max-queue", "2"]),
    # "elastic" with batching: same policy and chunks, max_batch=2 (elastic says max_batch=1).
    "batch": ("tiny-flux", "fcfs-elastic:max_sp=2,max_batch=2", ["--chunk-steps", "2", "--max-steps", "8"]),
}  # fmt: skip
DRAIN_SERVER = ("tiny-flux", "static:sp=1", ["--max-steps", "32", "--drain-timeout", "0.5"])


@dataclass
class Server:
    name: str
    url: str
    proc: subprocess.Popen
    log_path: str

    def log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM to the launcher (it forwards it to rank 0, or to every rank under torchrun); SIGKILL
        to the session if they linger."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            return None
        finally:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # no rank may outlive the test
            except ProcessLookupError:
                pass


def _env() -> dict:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _start(name: str, tmp_dir: str, config: tuple | None = None) -> Server:
    model, policy, extra = config or SERVERS[name]
    port = free_port()
    args = [
        "--model",
        model,
        "--policy",
        policy,
        "--device",
        "cpu",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    if name != "elastic":  # through `gfdit serve` (gfdit.launch); "elastic" under plain torchrun
        launcher = [sys.executable, "-m", "gfdit.cli", "serve", "--nproc", "2"]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    "-m", "gfdit.serve"]  # fmt: skip
    cmd = [*launcher, *args, *extra]
    log_path = os.path.join(tmp_dir, f"{name}.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Server(name, f"http://127.0.0.1:{port}", proc, log_path)


def _wait_healthy(server: Server, deadline: float) -> None:
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(f"server {server.name} exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    pytest.fail(f"server {server.name} not healthy after {kStartTimeoutS} s:\n{server.log_tail()}")


def _healthy(server: Server, tmp_dir: str, deadline: float, config: tuple | None = None) -> Server:
    """Waits until `server` is healthy. One that lost its port between free_port() and its bind (other
    processes of the test run bind ports too: ZeroMQ, stores, other servers) is started again on
    another port, at most 3 times; any other failure fails the test."""
    for attempt in range(4):
        try:
            _wait_healthy(server, deadline)
            return server
        except pytest.fail.Exception:
            if attempt == 3 or "address already in use" not in server.log_tail(20000):
                raise
            server.stop()
            server = _start(server.name, tmp_dir, config)
    return server


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("servers"))
    started = {name: _start(name, tmp) for name in SERVERS}
    try:
        deadline = time.monotonic() + kStartTimeoutS
        for name in list(started):
            started[name] = _healthy(started[name], tmp, deadline)
        yield started
    finally:
        for s in started.values():
            s.stop()


@pytest.fixture(scope="module")
def elastic(servers):
    return servers["elastic"]


@pytest.fixture(scope="module")
def static(servers):
    return servers["static"]


@pytest.fixture(scope="module")
def wan(servers):
    return servers["wan"]


@pytest.fixture(scope="module")
def batch(servers):
    return servers["batch"]


# -- helpers ---------------------------------------------------------------------------------------


def _png(b64: str) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def _generate(url: str, **body) -> dict:
    body.setdefault("prompt", "a red fox in the snow")
    r = httpx.post(url + "/v1/images/generations", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _metrics(url: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _metric(m: dict, name: str, **labels) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def _sse_events(lines) -> list:
    """Parses `data: ...` lines into JSON objects ("[DONE]" kept as the string)."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def _wait_for(predicate, timeout: float, what: str, period: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(period)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def _video_job(url: str, job_id: str) -> dict:
    r = httpx.get(f"{url}/v1/videos/{job_id}", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def _video_end(url: str, job_id: str, timeout: float) -> dict:
    """The job once it is completed or failed."""

    def ended():
        job = _video_job(url, job_id)
        return job if job["status"] in ("completed", "failed") else None

    return _wait_for(ended, timeout, f"video job {job_id} to end")


# -- images ----------------------------------------------------------------------------------------


def test_same_seed_same_image_under_two_policies(elastic, static):
    # A size no other test uses: the elastic policy's cost model has no observation of it yet, so it
    # gives the lone request's first DENOISE chunk both ranks (Ulysses SP over 2), static gives one.
    body = dict(prompt="a lighthouse at dusk", size="96x80", num_inference_steps=4, seed=11)
    a, b = _generate(elastic.url, **body), _generate(static.url, **body)
    img_a, img_b = _png(a["data"][0]["b64_json"]), _png(b["data"][0]["b64_json"])
    assert img_a.shape == (80, 96, 3)
    assert int(np.abs(img_a.astype(int) - img_b.astype(int)).max()) <= 1
    degrees_a = {len(g["ranks"]) for g in a["gfdit"]["groups"][0] if ":denoise" in g["task"]}
    degrees_b = {len(g["ranks"]) for g in b["gfdit"]["groups"][0] if ":denoise" in g["task"]}
    assert 2 in degrees_a and degrees_b == {1}, (degrees_a, degrees_b)
    # Another seed gives another image.
    c = _generate(static.url, **{**body, "seed": 12})
    assert np.abs(_png(c["data"][0]["b64_json"]).astype(int) - img_b.astype(int)).max() > 10


def test_images_end_to_end(elastic):
    out = _generate(elastic.url, size="64x48", n=3, seed=5, num_inference_steps=3)
    assert isinstance(out["created"], int)
    assert [d["seed"] for d in out["data"]] == [5, 6, 7]
    images = [_png(d["b64_json"]) for d in out["data"]]
    assert all(im.shape == (48, 64, 3) for im in images)
    assert np.abs(images[0].astype(int) - images[1].astype(int)).max() > 10  # seeds differ, images too
    info = out["gfdit"]
    assert info["latency_ms"] > 0 and info["latency_ms"] >= info["queue_ms"] >= 0
    assert len(info["request_ids"]) == 3 and len(info["groups"]) == 3
    for groups in info["groups"]:
        tasks = [g["task"].split(":")[1] for g in groups]
        assert tasks[0] == "encode" and tasks[-1] == "decode"
        assert sum(t.startswith("denoise") for t in tasks) == 2  # 3 steps in chunks of 2
    # The same request again: the same pixels (seed 5).
    again = _generate(elastic.url, size="64x48", n=1, seed=5, num_inference_steps=3)
    assert np.abs(_png(again["data"][0]["b64_json"]).astype(int) - images[0].astype(int)).max() <= 1
    assert isinstance(out["gfdit"]["reshards"], int) and isinstance(out["gfdit"]["bytes_moved"], int)


def test_openai_image_parameters(elastic):
    """Every images.generate parameter is taken: formats and compression honoured, quality maps to a
    step count, the rest accepted (the README's table)."""
    common = dict(prompt="a harbour", size="64x48", seed=3)
    png = _generate(elastic.url, **common, quality="high", style="vivid", moderation="low", user="u1",
                    safety_identifier="h1", complexity="low", background="auto", partial_images=0,
                    response_format="b64_json")  # fmt: skip
    assert png["output_format"] == "png" and png["size"] == "64x48" and png["quality"] == "high"
    assert png["background"] == "opaque"
    reference = _png(png["data"][0]["b64_json"]).astype(int)
    from PIL import Image

    sizes, errors = {}, {}
    for fmt, magic in (("jpeg", b"\xff\xd8\xff"), ("webp", b"RIFF")):
        for compression in (95, 10):
            out = _generate(
                elastic.url, **common, quality="high", output_format=fmt, output_compression=compression
            )
            raw = base64.b64decode(out["data"][0]["b64_json"])
            assert raw.startswith(magic) and out["output_format"] == fmt
            image = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")).astype(int)
            assert image.shape == reference.shape
            sizes[fmt, compression] = len(raw)
            errors[fmt, compression] = np.abs(image - reference).mean()
        # output_compression is honoured: a lower value, a smaller file further from the PNG's pixels
        assert sizes[fmt, 10] < sizes[fmt, 95] and errors[fmt, 95] < errors[fmt, 10], (sizes, errors)
    # quality -> steps: tiny-flux's default is 4 steps; "low" is a quarter, "medium" a half
    for quality, steps in (("low", 1), ("medium", 2), ("auto", 4)):
        out = _generate(elastic.url, **common, quality=quality)
        ends = [
            int(g["task"].split(",")[1].rstrip(")"))
            for g in out["gfdit"]["groups"][0]
            if ":denoise" in g["task"]
        ]
        assert max(ends) == steps, (quality, ends)
    explicit = _generate(elastic.url, **common, quality="low", num_inference_steps=3)  # steps win
    assert max(int(g["task"].split(",")[1].rstrip(")")) for g in explicit["gfdit"]["groups"][0]
               if ":denoise" in g["task"]) == 3  # fmt: skip


def test_json_without_its_content_type_is_told_what_to_send(elastic):
    r = httpx.post(elastic.url + "/v1/images/generations", content=json.dumps({"prompt": "x"}),
                   headers={"content-type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "Content-Type: application/json" in message and "application/x-www-form-urlencoded" in message, (
        message
    )


def test_models_and_health(elastic, wan):
    models = httpx.get(elastic.url + "/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny-flux"]
    assert models["data"][0]["object"] == "model"
    assert httpx.get(elastic.url + "/v1/models/tiny-flux").json()["id"] == "tiny-flux"
    assert httpx.get(elastic.url + "/v1/models/flux-dev").status_code == 404
    h = httpx.get(elastic.url + "/health")
    assert h.status_code == 200
    body = h.json()
    assert body["status"] == "ok" and body["world_size"] == 2 and body["model"] == "tiny-flux"
    assert body["policy"] == "fcfs-elastic:max_sp=2,max_batch=1" and body["policy_spec"].startswith(
        "fcfs-elastic:"
    )
    assert httpx.get(wan.url + "/health").json()["model"] == "tiny-wan"


def test_thirty_concurrent_requests_complete(elastic):
    async def run():
        async with httpx.AsyncClient(base_url=elastic.url, timeout=180) as client:
            bodies = [
                {"prompt": f"prompt {i}", "size": ["32x32", "64x64", "48x32"][i % 3], "seed": 100 + i,
                 "num_inference_steps": 2 + i % 3}
                for i in range(30)
            ]  # fmt: skip
            responses = await asyncio.gather(*(client.post("/v1/images/generations", json=b) for b in bodies))
            return bodies, responses

    bodies, responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 30, [
        r.text for r in responses if r.status_code != 200
    ]
    for body, r in zip(bodies, responses, strict=True):
        data = r.json()["data"]
        w, h = (int(v) for v in body["size"].split("x"))
        assert len(data) == 1 and data[0]["seed"] == body["seed"]
        assert _png(data[0]["b64_json"]).shape == (h, w, 3)
    m = _metrics(elastic.url)
    assert _metric(m, "gfdit_requests_total", kind="image", outcome="completed") >= 30
    assert _metric(m, "gfdit_queue_depth") == 0 and _metric(m, "gfdit_running_requests") == 0


BAD_IMAGE_BODIES = [
    # (body, status, param, words the message must contain)
    ({"prompt": "x", "size": "65x64"}, 400, "size", "multiple of 16"),
    ({"prompt": "x", "size": "64"}, 400, "size", "size"),
    ({"prompt": "x", "size": "16x16"}, 400, "size", "[32, 256]"),
    ({"prompt": "x", "size": "512x512"}, 400, "size", "[32, 256]"),
    ({"prompt": "x", "n": 0}, 400, "n", "n"),
    ({"prompt": "x", "n": 11}, 400, "n", "n"),
    ({"prompt": "x", "n": "2"}, 400, "n", "integer"),
    ({"prompt": "x", "num_inference_steps": 0}, 400, "num_inference_steps", "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": 201}, 400, "num_inference_steps", "at most 200"),
    ({"prompt": "x", "guidance_scale": -1}, 400, "guidance_scale", "guidance_scale"),
    ({"prompt": "x", "guidance_scale": "high"}, 400, "guidance_scale", "guidance_scale"),
    ({"prompt": "x", "seed": -1}, 400, "seed", "seed"),
    ({"prompt": "x", "seed": 2**40}, 400, "seed", "seed"),
    ({"prompt": ""}, 400, "prompt", "prompt"),
    ({"size": "64x64"}, 400, "prompt", "prompt"),
    ({"prompt": "word " * 100}, 400, "prompt", "too long"),
    ({"prompt": "x" * 5000}, 400, "prompt", "prompt"),
    ({"prompt": "x", "response_format": "url"}, 400, "response_format", "not supported"),
    ({"prompt": "x", "response_format": "jpeg"}, 400, "response_format", "response_format"),
    ({"prompt": "x", "model": "flux-dev"}, 404, "model", "not served"),
    ({"prompt": "x", "colour": "red"}, 400, "colour", "colour"),
    ({"prompt": "x", "priority": 10**6}, 400, "priority", "priority"),
    ({"prompt": "x", "slo_ms": 0}, 400, "slo_ms", "slo_ms"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream", "stream"),
    ({"prompt": "x", "negative_prompt": 123}, 400, "negative_prompt", "negative_prompt"),
    ([1, 2], 400, None, "JSON object"),
    # OpenAI parameters gf-dit cannot honour: refused with the reason
    ({"prompt": "x", "output_format": "gif"}, 400, "output_format", "png, jpeg or webp"),
    ({"prompt": "x", "output_format": "svg"}, 400, "output_format", "not produced"),
    ({"prompt": "x", "output_format": "bmp"}, 400, "output_format", "output_format"),
    ({"prompt": "x", "output_compression": 101}, 400, "output_compression", "output_compression"),
    ({"prompt": "x", "background": "transparent"}, 400, "background", "opaque"),
    ({"prompt": "x", "partial_images": 2}, 400, "partial_images", "progress events"),
    ({"prompt": "x", "frame_count": 4}, 400, "frame_count", "GIF"),
    ({"prompt": "x", "svg": {"model": "m"}}, 400, "svg", "SVG"),
    ({"prompt": "x", "quality": "ultra"}, 400, "quality", "quality"),
    ({"prompt": "x", "style": "bold"}, 400, "style", "style"),
]


@pytest.mark.parametrize("body,status,param,words", BAD_IMAGE_BODIES, ids=range(len(BAD_IMAGE_BODIES)))
def test_bad_image_requests_get_4xx_naming_the_field(elastic, body, status, param, words):
    r = httpx.post(elastic.url + "/v1/images/generations", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert words in err["message"], err
    assert err["type"] in ("invalid_request_error", "not_found_error")


def test_malformed_requests_and_the_server_keeps_serving(elastic, wan):
    url = elastic.url
    r = httpx.post(
        url + "/v1/images/generations",
        content=b'{"prompt": "x",',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(
        url + "/v1/images/generations", content=b"x" * (2 << 20), headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    def chunks():
        for _ in range(40):
            yield b" " * 65536

    r = httpx.post(
        url + "/v1/images/generations", content=chunks(), headers={"content-type": "application/json"}
    )
    assert r.status_code == 413  # chunked, no Content-Length
    assert httpx.put(url + "/v1/images/generations", json={"prompt": "x"}).status_code == 405
    assert httpx.get(url + "/v1/nothing").status_code == 404
    r = httpx.post(url + "/v1/videos", json={"prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = httpx.post(wan.url + "/v1/images/generations", json={"prompt": "x"})
    assert r.status_code == 400 and "/v1/videos" in r.json()["error"]["message"]
    for method, path in (
        ("GET", "/v1/videos/nope"),
        ("GET", "/v1/videos/nope/content"),
        ("DELETE", "/v1/videos/nope"),
    ):
        assert httpx.request(method, wan.url + path).status_code == 404
    m = _metrics(url)
    assert _metric(m, "gfdit_http_errors_total", status="400") >= 20
    assert _metric(m, "gfdit_http_errors_total", status="413") >= 2
    # Still serving.
    assert httpx.get(url + "/health").status_code == 200
    assert _png(_generate(url, size="32x32", num_inference_steps=1)["data"][0]["b64_json"]).shape == (
        32,
        32,
        3,
    )


BAD_VIDEO_BODIES = [
    ({"prompt": "x", "num_frames": 6}, "num_frames", "4k+1"),
    ({"prompt": "x", "num_frames": 21}, "num_frames", "at most 17"),
    ({"prompt": "x", "num_frames": 9, "seconds": 1}, "seconds", "not both"),
    ({"prompt": "x", "seconds": "abc"}, "seconds", "number"),
    ({"prompt": "x", "seconds": -1}, "seconds", "seconds"),
    ({"prompt": "x", "fps": 0}, "fps", "fps"),
    ({"prompt": "x", "size": "256x256"}, "size", "[32, 128]"),
    ({"prompt": "x", "num_inference_steps": 500}, "num_inference_steps", "at most 200"),
]


@pytest.mark.parametrize("body,param,words", BAD_VIDEO_BODIES, ids=range(len(BAD_VIDEO_BODIES)))
def test_bad_video_requests(wan, body, param, words):
    r = httpx.post(wan.url + "/v1/videos", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err


# -- streaming ---------------------------------------------------------------------------------------


def test_stream_progress_in_order_then_result_then_done(elastic):
    body = {"prompt": "a cat", "size": "64x64", "num_inference_steps": 6, "seed": 3, "stream": True}
    with httpx.stream("POST", elastic.url + "/v1/images/generations", json=body, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    final = events[-2]
    assert final["type"] == "image_generation.completed"
    assert _png(final["data"][0]["b64_json"]).shape == (64, 64, 3)
    progress = events[:-2]
    assert all(e["type"] == "image_generation.progress" for e in progress)
    steps = [e["step"] for e in progress]
    assert steps == sorted(steps) and steps[-1] == 6
    assert set(range(1, 7)) <= set(steps), steps  # every step, not only chunk boundaries
    assert all(e["num_steps"] == 6 for e in progress)
    assert progress[-1]["state"] == "completed"
    assert {e["state"] for e in progress[:-1]} <= {"queued", "in_progress"}
    assert all(e["degree"] in (1, 2) for e in progress if e["state"] == "in_progress")
    # The streamed image is the same as the non-streamed one.
    plain = _generate(elastic.url, prompt="a cat", size="64x64", num_inference_steps=6, seed=3)
    diff = _png(plain["data"][0]["b64_json"]).astype(int) - _png(final["data"][0]["b64_json"]).astype(int)
    assert np.abs(diff).max() <= 1


def test_progress_follows_every_step_inside_one_long_chunk(static):
    # static:sp=1 runs all 8 steps as ONE task (no chunk boundary inside): progress still counts
    # each step as it finishes (video jobs' `progress` is the same count, in percent).
    body = {"prompt": "a dog", "size": "64x64", "num_inference_steps": 8, "seed": 1, "stream": True}
    with httpx.stream("POST", static.url + "/v1/images/generations", json=body, timeout=120) as r:
        events = _sse_events(r.iter_lines())
    assert events[-1] == "[DONE]" and events[-2]["type"] == "image_generation.completed", events[-2:]
    running = [e for e in events[:-2] if e["state"] == "in_progress"]
    denoise_steps = [e["step"] for e in running if ":denoise" in e["task"]]
    assert denoise_steps == sorted(denoise_steps) and set(range(1, 9)) <= set(denoise_steps), running


def test_stream_disconnect_cancels_the_request(elastic):
    before = _metrics(elastic.url)
    cancelled0 = _metric(before, "gfdit_requests_total", kind="image", outcome="cancelled")
    completed0 = _metric(before, "gfdit_requests_total", kind="image", outcome="completed")
    body = {"prompt": "slow", "size": "256x256", "num_inference_steps": 200, "stream": True}
    t0 = time.monotonic()
    with httpx.stream("POST", elastic.url + "/v1/images/generations", json=body, timeout=60) as r:
        for line in r.iter_lines():
            events = _sse_events([line])
            if events and events[0]["step"] >= 2:
                break  # leave mid-request: the connection closes

    # 200 steps take many seconds; the cancellation lands at the next chunk boundary.
    def cancelled():
        return (
            _metric(_metrics(elastic.url), "gfdit_requests_total", kind="image", outcome="cancelled")
            > cancelled0
        )

    _wait_for(cancelled, 30, "the request to be cancelled")
    m = _metrics(elastic.url)
    assert _metric(m, "gfdit_requests_total", kind="image", outcome="completed") == completed0
    assert time.monotonic() - t0 < 30
    _wait_for(lambda: _metric(_metrics(elastic.url), "gfdit_running_requests") == 0, 10, "ranks to be free")


def test_plain_request_disconnect_cancels_too(elastic):
    m = _metrics(elastic.url)
    cancelled0 = _metric(m, "gfdit_requests_total", kind="image", outcome="cancelled")
    completed0 = _metric(m, "gfdit_requests_total", kind="image", outcome="completed")
    # 10 images x 200 steps at 256x256 on 2 ranks: one such image takes ~0.7 s on this machine's CPU
    # (4 take ~1.9 s), so most are still queued or running when the client leaves after 0.5 s.
    body = {"prompt": "slow", "size": "256x256", "num_inference_steps": 200, "n": 10}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(elastic.url + "/v1/images/generations", json=body, timeout=httpx.Timeout(30, read=0.5))

    def ended():
        m = _metrics(elastic.url)
        cancelled = _metric(m, "gfdit_requests_total", kind="image", outcome="cancelled") - cancelled0
        completed = _metric(m, "gfdit_requests_total", kind="image", outcome="completed") - completed0
        return (cancelled, completed) if cancelled + completed == 10 else None

    # Every image ends: those done before the disconnect was seen completed, the rest cancelled.
    cancelled, completed = _wait_for(ended, 30, "the abandoned requests to end")
    assert cancelled >= 5, (cancelled, completed)
    _wait_for(lambda: _metric(_metrics(elastic.url), "gfdit_running_requests") == 0, 10, "ranks to be free")


# -- metrics ---------------------------------------------------------------------------------------------


def test_metrics_after_traffic(elastic):
    _generate(elastic.url, size="32x32", num_inference_steps=2, slo_ms=600_000)  # met
    _generate(elastic.url, size="32x32", num_inference_steps=2, slo_ms=0.001)  # missed: 1 us
    m = _metrics(elastic.url)
    completed = _metric(m, "gfdit_requests_total", kind="image", outcome="completed")
    assert completed >= 35
    assert _metric(m, "gfdit_request_latency_seconds_count", kind="image") == completed
    assert _metric(m, "gfdit_request_latency_seconds_sum", kind="image") > 0
    assert _metric(m, "gfdit_request_latency_seconds_bucket", kind="image", le="+Inf") == completed
    assert _metric(m, "gfdit_slo_met_total") >= 1 and _metric(m, "gfdit_slo_missed_total") >= 1
    steps = sum(v for (name, labels), v in m.items() if name == "gfdit_step_seconds_count")
    assert steps >= completed  # at least one DENOISE chunk each
    assert _metric(m, "gfdit_step_seconds_count", degree="1") > 0
    assert _metric(m, "gfdit_chunk_degree_count") == steps and _metric(m, "gfdit_preemptions_total") >= 0
    assert _metric(m, "gfdit_slo_attainment", slo_class="none") < 1  # one missed, unlabelled requests
    assert _metric(m, "gfdit_rank_busy_seconds_total", rank="0") > 0
    assert _metric(m, "gfdit_rank_busy_seconds_total", rank="1") > 0
    assert _metric(m, "gfdit_reshards_total") >= 0 and _metric(m, "gfdit_reshard_bytes_total") >= 0
    assert _metric(m, "gfdit_healthy") == 1 and _metric(m, "gfdit_world_size") == 2
    assert _metric(m, "gfdit_queue_depth") == 0


# -- videos ----------------------------------------------------------------------------------------------


def test_video_job_end_to_end(wan):
    import av

    r = httpx.post(wan.url + "/v1/videos", json={"prompt": "waves", "size": "64x48", "seconds": 0.5,
                                                "num_inference_steps": 3, "seed": 4})  # fmt: skip
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["object"] == "video" and job["status"] in ("queued", "in_progress")
    assert job["num_frames"] == 9 and job["fps"] == 16 and job["size"] == "64x48"  # 0.5 s at 16 fps: 4k+1
    job = _video_end(wan.url, job["id"], 120)
    assert job["status"] == "completed" and job["progress"] == 100 and job["error"] is None, job
    assert job["gfdit"]["latency_ms"] > 0 and job["completed_at"] >= job["created_at"]
    content = httpx.get(f"{wan.url}/v1/videos/{job['id']}/content", timeout=30)
    assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
    with av.open(io.BytesIO(content.content)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (48, 64, 3)
    listed = httpx.get(wan.url + "/v1/videos").json()
    assert listed["object"] == "list" and job["id"] in [j["id"] for j in listed["data"]]
    # DELETE of a finished job forgets it.
    assert httpx.delete(f"{wan.url}/v1/videos/{job['id']}").json() == {
        "id": job["id"], "object": "video.deleted", "deleted": True,
    }  # fmt: skip
    assert httpx.get(f"{wan.url}/v1/videos/{job['id']}").status_code == 404


def test_video_job_from_form_fields_as_openai_sdks_send(wan):
    """OpenAI's SDKs send POST /v1/videos as multipart/form-data (all values strings)."""
    form = {"model": "tiny-wan", "prompt": "waves", "seconds": "0.5", "size": "64x48",
            "num_inference_steps": "3", "seed": "4"}  # fmt: skip
    r = httpx.post(wan.url + "/v1/videos", files={k: (None, v) for k, v in form.items()}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.request.headers["content-type"].startswith("multipart/form-data")
    job = r.json()
    assert job["num_frames"] == 9 and job["size"] == "64x48" and job["seed"] == 4, job
    # 0.5 s at 16 fps is 8 frames; the model takes 4k + 1: 9 frames, 0.5625 s, and the job says so.
    assert job["seconds"] == "0.5625" and job["requested_seconds"] == "0.5", job
    job = _video_end(wan.url, job["id"], 120)
    assert job["status"] == "completed", job
    # The same fields urlencoded; then cancelled, to keep the test short.
    r = httpx.post(
        wan.url + "/v1/videos", data={"prompt": "waves", "num_frames": "5", "size": "64x48"}, timeout=30
    )
    assert r.status_code == 200 and r.json()["num_frames"] == 5, r.text
    assert httpx.delete(f"{wan.url}/v1/videos/{r.json()['id']}").status_code == 200


BAD_VIDEO_FORMS = [
    # (files for httpx: multipart), param, words in the message
    ([("prompt", (None, "x")), ("input_reference", ("ref.png", b"\x89PNG", "image/png"))],
     "input_reference", "text only"),
    ([("prompt", (None, "x")), ("num_inference_steps", (None, "many"))], "num_inference_steps", "integer"),
    ([("prompt", (None, "x")), ("prompt", (None, "y"))], "prompt", "more than once"),
    ([("prompt", (None, "x")), ("colour", (None, "red"))], "colour", "xtra"),
    ([("prompt", (None, "x")), ("seed", ("seed.txt", b"3", "text/plain"))], "seed", "a file"),
    ([("size", (None, "64x48"))], "prompt", "required"),
]  # fmt: skip


@pytest.mark.parametrize("files,param,words", BAD_VIDEO_FORMS, ids=range(len(BAD_VIDEO_FORMS)))
def test_bad_video_forms(wan, files, param, words):
    r = httpx.post(wan.url + "/v1/videos", files=files, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err


def test_video_body_of_another_type_or_broken_form(wan):
    r = httpx.post(wan.url + "/v1/videos", content=b"prompt=x", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["error"]["message"], r.text
    r = httpx.post(
        wan.url + "/v1/videos", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data"}
    )
    assert r.status_code == 400 and "not valid multipart/form-data" in r.json()["error"]["message"], r.text
    r = httpx.post(wan.url + "/v1/videos", json={"prompt": "x", "num_frames": "5"})  # JSON stays strict
    assert r.status_code == 400 and r.json()["error"]["param"] == "num_frames", r.text
    assert httpx.get(wan.url + "/health").status_code == 200


def test_video_delete_cancels_a_running_job(wan):
    long = {"prompt": "slow", "size": "128x128", "num_frames": 17, "num_inference_steps": 150}
    job = httpx.post(wan.url + "/v1/videos", json=long).json()
    _wait_for(lambda: _video_job(wan.url, job["id"])["status"] == "in_progress", 60, "the job to start")
    r = httpx.get(f"{wan.url}/v1/videos/{job['id']}/content")
    assert r.status_code == 404 and r.json()["error"]["code"] == "video_not_ready"
    t0 = time.monotonic()
    assert httpx.delete(f"{wan.url}/v1/videos/{job['id']}").json()["deleted"] is True
    done = _video_end(wan.url, job["id"], 30)
    assert done["status"] == "failed" and done["error"]["code"] == "cancelled", done
    assert done["progress"] < 100 and time.monotonic() - t0 < 15  # 150 steps would take far longer
    r = httpx.get(f"{wan.url}/v1/videos/{job['id']}/content")
    assert r.status_code == 409 and r.json()["error"]["code"] == "cancelled"
    # The ranks are free again: a short job completes.
    short = httpx.post(wan.url + "/v1/videos", json={"prompt": "x", "size": "32x32", "num_frames": 5,
                                                    "num_inference_steps": 2}).json()  # fmt: skip
    assert _video_end(wan.url, short["id"], 60)["status"] == "completed"
    m = _metrics(wan.url)
    assert _metric(m, "gfdit_requests_total", kind="video", outcome="cancelled") >= 1


def test_full_queue_answers_429_with_retry_after(wan):
    long = {"prompt": "slow", "size": "128x128", "num_frames": 17, "num_inference_steps": 150}
    accepted, refused = [], []
    for _ in range(6):
        r = httpx.post(wan.url + "/v1/videos", json=long)
        (accepted if r.status_code == 200 else refused).append(r)
    try:
        assert refused, "a queue of 2 took 6 long jobs"
        assert all(r.status_code == 429 for r in refused), [r.text for r in refused]
        assert 1 <= int(refused[0].headers["retry-after"]) <= 60
        assert refused[0].json()["error"]["code"] == "queue_full"
        assert 2 <= len(accepted) <= 4  # 2 queued, at most 2 running
    finally:
        for r in accepted:
            httpx.delete(f"{wan.url}/v1/videos/{r.json()['id']}")
    for r in accepted:
        end = _video_end(wan.url, r.json()["id"], 30)
        assert end["status"] == "failed" and end["error"]["code"] == "cancelled", end
    assert _metric(_metrics(wan.url), "gfdit_rejected_total", reason="queue_full") >= len(refused)
    assert httpx.get(wan.url + "/health").status_code == 200


# -- property-based run of the OpenAPI schema -------------------------------------------------------------

try:
    import schemathesis
    from schemathesis.generation import GenerationMode
except ImportError:  # a test dependency; without it the property-based run is skipped, with the reason
    schemathesis = None


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_openapi_schema_finds_no_server_error(static, mode):
    # Hypothesis drives schemathesis' case strategies directly, one operation at a time: schemathesis'
    # pytest plugin (`schemathesis.pytest.from_fixture`) reaches into pytest internals and broke with
    # pytest 9.2 (AttributeError: 'Function' object has no attribute '_nodeid'); this path uses public
    # APIs of both libraries only. The static server caps steps at 8, so generated requests that pass
    # validation stay cheap.
    if schemathesis is None:
        pytest.skip("schemathesis is not installed (pip install schemathesis)")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable

    schema = schemathesis.openapi.from_url(static.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    exercised = []
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
        @settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def no_server_error(case):
            response = case.call(timeout=120)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])

        try:
            no_server_error()
        except Unsatisfiable:
            # Negative mode only: an operation whose every input is valid (no inputs, or a free-form
            # string id in the path) has no invalid request to generate.
            if mode == "positive":
                raise
            continue
        exercised.append(operation.label)
    assert len(exercised) >= (6 if mode == "positive" else 2), exercised
    assert mode == "positive" or "POST /v1/images/generations" in exercised, exercised


# -- gfdit bench -------------------------------------------------------------------------------------------


def _cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "-m", "gfdit.cli", *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert out.returncode == 0, f"{args}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def test_bench_gen_run_report(elastic, static, tmp_path):
    trace = str(tmp_path / "trace.jsonl")
    _cli(
        "bench", "gen", "--model", "tiny-flux", "--duration", "3", "--phases", "0:2,1.5:4", "--seed", "3",
        "--alpha", "50", "--class", "S:size=32x32,steps=2,weight=2",
        "--class", "M:size=64x64,steps=3,weight=1",
        "--out", trace,
    )  # fmt: skip
    lines = [json.loads(x) for x in open(trace)]
    n = lines[0]["meta"]["num_requests"]
    assert n == len(lines) - 1 and n >= 3
    runs = []
    for server in (elastic, static):
        out_dir = str(tmp_path / server.name)
        replay = _cli("bench", "run", "--url", server.url, "--trace", trace, "--out", out_dir, "--progress")
        assert f"sent {n}/{n}, done {n} ({n} completed, 0 failed or refused)" in replay.stderr, replay.stderr
        runs.append(out_dir)
        rows = [json.loads(x) for x in open(os.path.join(out_dir, "results.jsonl"))]
        assert len(rows) == n and all(r["status"] == "completed" for r in rows), rows
        assert all(r["latency_s"] > 0 and r["sent_s"] >= 0 for r in rows)
    report_dir = str(tmp_path / "report")
    out = _cli("bench", "report", *runs, "--out", report_dir)
    assert "SLO attainment" in out.stdout
    report = json.load(open(os.path.join(report_dir, "report.json")))
    labels = [r["label"] for r in report["runs"]]
    assert labels == ["fcfs-elastic:max_sp=2,max_batch=1", "static:sp=1,max_batch=1"]
    for run in report["runs"]:
        s = run["summary"]
        assert s["all"]["requests"] == n and s["all"]["completed"] == n
        assert set(s["classes"]) <= {"S", "M"} and sum(c["requests"] for c in s["classes"].values()) == n
        assert 0.0 <= s["all"]["slo_attainment"] <= 1.0
        assert s["all"]["throughput_rps"] > 0
        assert s["all"]["latency_p50_s"] <= s["all"]["latency_p99_s"]
        assert run["meta"]["world_size"] == 2
        # Neither policy batches (max_batch=1): every DENOISE chunk ran alone, one or more a request.
        assert "max_batch=1" in run["meta"]["policy_spec"], run["meta"]["policy_spec"]
        b = run["chunk_batch_size"]
        assert b["chunks"] >= n and b["histogram"] == {"1": b["chunks"]}, b
        assert (b["mean"], b["max"], b["batched_share"]) == (1.0, 1, 0.0), b
    md = open(os.path.join(report_dir, "report.md")).read()
    assert "fcfs-elastic:max_sp=2,max_batch=1 | static:sp=1,max_batch=1" in md and "class S" in md
    assert "| max batch size | 1 | 1 |" in md and "| batched (size >= 2) | 0.0% | 0.0% |" in md
    for name in report["plots"]:
        with open(os.path.join(report_dir, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert len(report["plots"]) >= 3


def _batch_histogram(url: str) -> dict[str, float]:
    """The server's gfdit_chunk_batch_size samples, read here with the test's own parser: bucket
    upper bounds ("1.0", "2.0", ...), "count" and "sum"."""
    m = _metrics(url)
    out = {labels[0][1]: v for (name, labels), v in m.items() if name == "gfdit_chunk_batch_size_bucket"}
    out["count"] = _metric(m, "gfdit_chunk_batch_size_count")
    out["sum"] = _metric(m, "gfdit_chunk_batch_size_sum")
    return out


def test_bench_report_shows_chunk_batch_sizes(elastic, batch, tmp_path):
    """One burst of same-shape requests (some 36, sent within 0.02 s) against the same policy and chunks
    with max_batch=1 ("elastic") and max_batch=2 ("batch"): the report's batch sizes are the server's
    histogram over the run, exactly 1 everywhere without batching and up to 2 with it."""
    trace = str(tmp_path / "burst.jsonl")
    _cli(
        "bench", "gen", "--model", "tiny-flux", "--duration", "2", "--rate", "20", "--seed", "3",
        "--alpha", "50", "--class", "B:size=32x32,steps=8,weight=1", "--out", trace,
    )  # fmt: skip
    n = json.loads(open(trace).readline())["meta"]["num_requests"]
    assert n >= 20
    runs, deltas = [], []
    for server in (elastic, batch):
        out_dir = str(tmp_path / server.name)
        before = _batch_histogram(server.url)
        _cli("bench", "run", "--url", server.url, "--trace", trace, "--out", out_dir, "--time-scale", "0.01",
             "--save-images")  # fmt: skip
        after = _batch_histogram(server.url)
        deltas.append({k: after[k] - before.get(k, 0.0) for k in after})
        runs.append(out_dir)
        rows = [json.loads(x) for x in open(os.path.join(out_dir, "results.jsonl"))]
        assert all(r["status"] == "completed" for r in rows), rows
    report_dir = str(tmp_path / "report")
    _cli("bench", "report", *runs, "--out", report_dir)
    report = json.load(open(os.path.join(report_dir, "report.json")))
    stats = [r["chunk_batch_size"] for r in report["runs"]]
    for s, d in zip(stats, deltas, strict=True):
        # The report is the server's histogram over the run: 8 steps in chunks of 2 are 4 chunks a request.
        assert s["chunks"] == d["count"] == 4 * n, (s, d)
        assert s["mean"] == pytest.approx(d["sum"] / d["count"]), (s, d)
        assert s["histogram"].get("1", 0) == d["1.0"], (s, d)
        assert s["histogram"].get("2", 0) == d["2.0"] - d["1.0"], (s, d)
        assert s["batched_share"] == pytest.approx((d["count"] - d["1.0"]) / d["count"]), (s, d)
    alone, batched = stats
    assert alone["histogram"] == {"1": 4 * n}, alone
    assert (alone["mean"], alone["max"], alone["batched_share"]) == (1.0, 1, 0.0), alone
    # The burst leaves several same-shape chunks waiting at most chunk boundaries: some run in pairs.
    assert deltas[1]["sum"] > deltas[1]["count"], deltas[1]
    assert batched["max"] == 2 and batched["histogram"]["2"] > 0 and set(batched["histogram"]) <= {"1", "2"}
    assert batched["mean"] > 1.0 and batched["batched_share"] > 0.0, batched
    md = open(os.path.join(report_dir, "report.md")).read()
    assert "## chunk batch sizes" in md and "| max batch size | 1 | 2 |" in md, md
    # Batching changes no image: a sample of the batched run's images against the same requests sent
    # again alone (gfdit bench alone; fp32 on CPU, so the bound is far from tight).
    assert len(os.listdir(os.path.join(runs[1], "images"))) == n
    out = _cli(
        "bench", "alone", "--url", batch.url, "--run", runs[1], "--sample", "6", "--max-mean-diff", "2"
    )
    alone_check = json.load(open(os.path.join(runs[1], "alone.json")))
    assert alone_check["sample"] == 6 and alone_check["over"] == [], alone_check
    assert alone_check["largest_mean_abs_diff"] <= 0.5, alone_check
    assert "6 images" in out.stdout, out.stdout


def test_bad_policy_exits_2():
    for cmd in (
        [sys.executable, "-m", "gfdit.serve", "--model", "tiny-flux", "--policy", "bogus", "--port", "1"],
        [sys.executable, "-m", "gfdit.cli", "serve", "--nproc", "2", "--model", "tiny-flux",
         "--policy", "edf-best-fit:nope=1", "--port", "1"],
        [sys.executable, "-m", "gfdit.serve", "--model", "no-such-model", "--port", "1"],
        [sys.executable, "-m", "gfdit.serve", "--model", "tiny-flux", "--port", "1", "--task-timeout-factor", "0"],
        [sys.executable, "-m", "gfdit.serve", "--model", "tiny-flux", "--port", "1", "--cost-profile", "/nonexistent.json"],
    ):  # fmt: skip
        out = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out.stderr
        assert "error:" in out.stderr
        assert any(w in out.stderr for w in ("policy", "model", "task-timeout-factor", "cost-profile")), (
            out.stderr
        )


@pytest.mark.parametrize("failure", ["port_in_use", "broken_dependency"])
def test_rank0_failure_after_the_engine_starts_ends_every_rank(failure, tmp_path):
    """Rank 0 fails after the engine is up (its HTTP port is taken; the web framework cannot be
    imported): the job exits non-zero with the reason in its log, and no rank is left waiting."""
    import socket

    env = _env()
    if failure == "broken_dependency":
        fake = tmp_path / "site" / "fastapi"
        fake.mkdir(parents=True)
        (fake / "__init__.py").write_text("raise ImportError('fastapi test double: cannot import')\n")
        env["PYTHONPATH"] = str(tmp_path / "site") + os.pathsep + env["PYTHONPATH"]
        reason = "fastapi test double: cannot import"
    else:
        reason = "address already in use"
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1] if failure == "port_in_use" else free_port()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "gfdit.serve", "--model", "tiny-flux", "--device", "cpu", "--port", str(port)]  # fmt: skip
        log_path = tmp_path / "job.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            code = proc.wait(kStartTimeoutS)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # no rank may outlive the test
            except ProcessLookupError:
                pass
    text = log_path.read_text(errors="replace")
    assert code is not None, f"the job was still running after {kStartTimeoutS} s:\n{text[-3000:]}"
    assert code != 0
    assert reason in text.lower(), text[-3000:]
    assert "rank 0 stopped on an error" in text, text[-3000:]  # logged before anything can block
    assert "rank 1: rank 0 closed the engine; leaving" in text, text[-3000:]  # not killed by torchrun


def test_readme_main_job_runs():
    """The README's main command ends with `python3 -m gfdit.quickstart`: it must keep working."""
    out = subprocess.run(
        [sys.executable, "-m", "gfdit.quickstart"], cwd=ROOT, env=_env(), capture_output=True, text=True,
        timeout=kStartTimeoutS + 120,
    )  # fmt: skip
    assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    assert "server healthy" in out.stdout and "streamed request" in out.stdout, out.stdout
    assert out.stdout.count(" reshards, ") == 6, out.stdout  # the six requests of the batch


# -- shutdown ---------------------------------------------------------------------------------------------


@pytest.fixture
def drain_server(tmp_path):
    server = _start("drain", str(tmp_path), DRAIN_SERVER)
    try:
        server = _healthy(server, str(tmp_path), time.monotonic() + kStartTimeoutS, DRAIN_SERVER)
        yield server
    finally:
        server.stop()


def test_sigterm_drains_then_fails_the_rest_with_a_reason(drain_server):
    """--drain-timeout 0.5: requests still queued after it fail with the engine's reason; every
    stream ends with a result or an error, then [DONE]; the job exits with status 3."""
    server = drain_server
    body = {"prompt": "busy", "size": "256x256", "num_inference_steps": 32, "n": 4, "stream": True}
    results: list[list] = [[] for _ in range(4)]
    started = threading.Barrier(5, timeout=60)

    def stream(i: int) -> None:
        try:
            with httpx.stream("POST", server.url + "/v1/images/generations", json=body, timeout=120) as r:
                seen = False
                for line in r.iter_lines():
                    events = _sse_events([line])
                    results[i].extend(events)
                    if events and not seen:
                        seen = True
                        started.wait()
        except httpx.HTTPError as e:
            results[i].append(f"transport error: {e}")

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    started.wait()  # every stream has been accepted (its first event arrived)
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30  # until the server says it is shutting down (or is gone)
    while time.monotonic() < deadline:
        try:
            if httpx.get(server.url + "/health", timeout=5).status_code == 503:
                break
        except httpx.TransportError:
            break
        time.sleep(0.02)
    try:
        r = httpx.post(server.url + "/v1/images/generations", json={"prompt": "late"}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", r.text
    except httpx.TransportError:
        pass  # already gone: also a refusal
    for t in threads:
        t.join(90)
    failed = 0
    for events in results:
        assert events and events[-1] == "[DONE]", events[-3:]
        final = events[-2]
        if final["type"] == "error":
            failed += 1
            assert "shut down" in final["error"]["message"], final
        else:
            assert final["type"] == "image_generation.completed" and len(final["data"]) == 4
    assert failed >= 1  # 16 requests of 32 steps at 256x256 on 2 ranks outlast a 0.5 s drain
    from gfdit.serve import kExitDrainFailed

    assert server.proc.wait(60) == kExitDrainFailed  # `gfdit serve`: rank 0's status, the drain failed some
    assert "Traceback" not in server.log_tail(50000), server.log_tail()
    errors = [line for line in server.log_tail(50000).splitlines() if "[rank" in line and " ERROR " in line]
    assert not errors, errors


# -- a dead worker (in process; tests/multiproc/test_survival.py does it through `gfdit serve`) --------


def _dead_worker(world, flag_path: str):
    import logging

    import uvicorn

    from gfdit.runtime import Engine
    from gfdit.server import ServerConfig, create_app

    logging.basicConfig(level=logging.ERROR)
    engine = Engine(world, "tiny-flux", "fcfs-elastic:max_sp=2", chunk_steps=1)
    if world.rank == 1:
        while not os.path.exists(flag_path):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(engine, ServerConfig(policy="fcfs-elastic", max_steps=400)),
                port=port,
                log_level="error",
            )
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{port}"
        _wait_for(lambda: server.started, 30, "uvicorn")
        health_before = httpx.get(url + "/health").status_code
        body = {"prompt": "x", "size": "64x64", "num_inference_steps": 40, "seed": 3, "stream": True}
        events = []
        with httpx.stream("POST", url + "/v1/images/generations", json=body, timeout=120) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                events.extend(_sse_events([line]))
                if events and isinstance(events[-1], dict) and events[-1].get("step", 0) >= 2:
                    open(flag_path, "w").close()  # rank 1: die now
        health = _wait_for(
            lambda: (h := httpx.get(url + "/health")).json()["status"] == "degraded" and h, 30, "degraded"
        )
        again = httpx.post(url + "/v1/images/generations", json={**body, "stream": False}, timeout=120)
        metrics = httpx.get(url + "/metrics").text
        server.should_exit = True
        thread.join(30)
        return health_before, events[-2:], health.status_code, health.json(), again.status_code, metrics
    finally:
        engine.close(timeout=60)


def test_dead_worker_is_dropped_and_its_request_reruns(tmp_path):
    out = run_ranks(
        _dead_worker, 2, str(tmp_path / "die"), timeout=180, expect_exit={1}, env={"GFCOLL_TIMEOUT_S": "10"}
    )[0]
    health_before, last, health_status, health, again_status, metrics = out
    assert health_before == 200
    assert last[-1] == "[DONE]"
    assert last[0]["type"] == "image_generation.completed", last  # re-run on rank 0 from the seed
    assert health_status == 200 and health["status"] == "degraded" and "rank 1 lost" in health["reason"], (
        health
    )
    assert [(r["rank"], r["state"]) for r in health["ranks"]] == [(0, "up"), (1, "lost")], health
    assert again_status == 200
    assert "gfdit_healthy 1.0" in metrics and "gfdit_ranks_alive 1.0" in metrics
    assert "gfdit_requests_rerun_total 1.0" in metrics
