"""The replay client of `gfdit bench run`: sends a trace's requests to a running server at their
arrival times (asyncio + httpx, as many in flight as the trace makes), and writes what happened.

Latency is measured by the client, from sending a request to having its result (images: the
response; video: the poll that sees the job completed, the poll period being `poll_s`). A request
meets its SLO when it completed within the trace's `slo_s`; one that failed, was refused or timed
out misses it. The server also gets the deadline (`slo_ms`), so deadline-aware policies can use it.

Output directory: results.jsonl (one line per request) and run.json (the server's model, policy and
ranks from /health, the trace, timings, how late the client sent, which should stay near 0, and
`chunk_batch_size`: the server's chunk batch-size histogram over the run, from GET /metrics scraped
before the first request and after the last result; gfdit.bench.batches says what it counts).
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import httpx

from . import batches
from .workload import RequestClass, TraceRecord

__all__ = [
    "RequestOutcome",
    "ReplayProgress",
    "replay",
    "run_trace",
    "calibrate",
    "scrape_batch_sizes",
    "request_body",
    "error_text",
    "response_png",
    "save_image",
    "auth_headers",
]

kPollS = 0.1  # video: seconds between status polls
kTerminalVideo = ("completed", "failed")


@dataclass
class RequestOutcome:
    """What happened to one trace request (a line of results.jsonl)."""

    request_id: str  # the trace's id
    cls: str  # its class
    kind: str  # "image" or "video"
    arrival_s: float  # scheduled send time, from the start of the replay
    sent_s: float  # actual send time, from the start of the replay
    status: str  # "completed", "failed", "rejected" (4xx), "error" (transport, 5xx, timeout)
    http_status: int | None  # the status of the generation call
    latency_s: float | None  # send to result, when completed
    slo_s: float  # the trace's latency target
    met_slo: bool  # completed within slo_s
    server_latency_s: float | None  # the server's acceptance-to-result latency (gfdit.latency_ms)
    reshards: int | None  # reshards the request's tasks made
    error: str | None  # why it did not complete


def request_body(rec: TraceRecord) -> dict:
    body = {
        "prompt": rec.prompt,
        "model": rec.model,
        "size": f"{rec.width}x{rec.height}",
        "num_inference_steps": rec.num_inference_steps,
        "seed": rec.seed,
        "slo_ms": max(1e-3, rec.slo_s * 1000.0),
        "priority": rec.priority,
        "preemptible": rec.preemptible,
        "slo_class": rec.cls,
    }
    if rec.kind == "video":
        body["num_frames"] = rec.num_frames
    else:
        body["n"] = 1
        body["response_format"] = "b64_json"
    return body


def error_text(r: httpx.Response) -> str:
    try:
        return r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return r.text[:500]


class ReplayProgress:
    """What a replay has done so far, redrawn on one terminal line (`gfdit bench run` on a terminal):
    requests sent of the total, ended (completed / failed or refused), elapsed seconds."""

    def __init__(self, total: int, stream=None, min_interval_s: float = 0.2):
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.min_interval_s = min_interval_s
        self.num_sent = self.num_completed = self.num_failed = 0
        self._start = time.monotonic()
        self._last_draw = -math.inf

    def line(self) -> str:
        ended = self.num_completed + self.num_failed
        return (
            f"sent {self.num_sent}/{self.total}, done {ended} ({self.num_completed} completed, "
            f"{self.num_failed} failed or refused), {time.monotonic() - self._start:.0f} s"
        )

    def sent(self) -> None:
        self.num_sent += 1
        self.draw()

    def ended(self, outcome: RequestOutcome) -> None:
        if outcome.status == "completed":
            self.num_completed += 1
        else:
            self.num_failed += 1
        self.draw()

    def draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_draw >= self.min_interval_s:
            self._last_draw = now
            self.stream.write("\r\033[K" + self.line())
            self.stream.flush()

    def close(self) -> None:
        self.draw(force=True)
        self.stream.write("\n")
        self.stream.flush()


async def _one(
    client: httpx.AsyncClient, rec: TraceRecord, start: float, timeout_s: float, images_dir: str | None = None
) -> RequestOutcome:
    loop = asyncio.get_running_loop()
    sent = loop.time()
    out = RequestOutcome(
        rec.request_id, rec.cls, rec.kind, rec.arrival_s, sent - start, "error", None, None,
        rec.slo_s, False, None, None, None,
    )  # fmt: skip
    try:
        await asyncio.wait_for(_send(client, rec, out, images_dir), timeout_s)
    except (asyncio.TimeoutError, TimeoutError):
        out.status, out.error = "error", f"no result within {timeout_s} s"
    except httpx.HTTPError as e:
        out.status, out.error = "error", f"{type(e).__name__}: {e}"
    if out.status == "completed":
        out.latency_s = loop.time() - sent
        out.met_slo = out.latency_s <= rec.slo_s
    return out


async def _send(
    client: httpx.AsyncClient, rec: TraceRecord, out: RequestOutcome, images_dir: str | None = None
) -> None:
    if rec.kind == "video":
        return await _video(client, rec, out)
    r = await client.post("/v1/images/generations", json=request_body(rec))
    out.http_status = r.status_code
    if r.status_code == 200:
        body = r.json()
        info = body["gfdit"]
        if images_dir is not None:
            save_image(body, os.path.join(images_dir, f"{rec.request_id}.png"))
        out.status = "completed"
        out.server_latency_s = info["latency_ms"] / 1000.0
        out.reshards = info["reshards"]
    else:
        out.status = "rejected" if r.status_code < 500 else "failed"
        out.error = error_text(r)


async def _video(client: httpx.AsyncClient, rec: TraceRecord, out: RequestOutcome) -> None:
    r = await client.post("/v1/videos", json=request_body(rec))
    out.http_status = r.status_code
    if r.status_code != 200:
        out.status = "rejected" if r.status_code < 500 else "failed"
        out.error = error_text(r)
        return
    job = r.json()
    while job["status"] not in kTerminalVideo:
        await asyncio.sleep(kPollS)
        r = await client.get(f"/v1/videos/{job['id']}")
        r.raise_for_status()
        job = r.json()
    if job["status"] == "completed":
        out.status = "completed"
        out.server_latency_s = job["gfdit"]["latency_ms"] / 1000.0
        out.reshards = job["gfdit"]["reshards"]
    else:
        out.status, out.error = "failed", (job.get("error") or {}).get("message", "failed")


async def _tracked(progress: ReplayProgress, coro) -> RequestOutcome:
    out = await coro
    progress.ended(out)
    return out


async def _redraw(progress: ReplayProgress, period_s: float = 1.0) -> None:
    while True:  # keeps the elapsed time moving while nothing else happens; cancelled at the end
        await asyncio.sleep(period_s)
        progress.draw()


def response_png(body: dict) -> bytes:
    """The first image of an images response (response_format b64_json): PNG bytes."""
    return base64.b64decode(body["data"][0]["b64_json"])


def save_image(body: dict, path: str) -> None:
    """Writes the first image of an images response to `path` (PNG)."""
    with open(path, "wb") as f:
        f.write(response_png(body))


def auth_headers(api_key: str | None) -> dict[str, str]:
    """The headers that carry an API key (gfdit.serve --api-key) as OpenAI's SDKs send it."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def replay(
    url: str, records: Sequence[TraceRecord], *, time_scale: float = 1.0, timeout_s: float = 600.0,
    progress: ReplayProgress | None = None, api_key: str | None = None, images_dir: str | None = None,
) -> tuple[dict, list[RequestOutcome]]:  # fmt: skip
    """Sends every record at start + arrival_s * time_scale; returns (server info, outcomes in
    trace order). The server must answer /health with 200. `progress`, if given, is told of every
    request sent and ended; `images_dir`, if given, receives each completed image as
    REQUEST_ID.png."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(
        base_url=url, timeout=httpx.Timeout(timeout_s), limits=limits, headers=auth_headers(api_key)
    ) as client:
        health = await client.get("/health")
        if health.status_code != 200:
            raise RuntimeError(f"{url}/health answered {health.status_code}: {health.text[:300]}")
        loop = asyncio.get_running_loop()
        start = loop.time()
        tasks = []
        redraw = asyncio.create_task(_redraw(progress)) if progress is not None else None
        try:
            for rec in records:
                delay = start + rec.arrival_s * time_scale - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                one = _one(client, rec, start, timeout_s, images_dir)
                tasks.append(asyncio.create_task(one if progress is None else _tracked(progress, one)))
                if progress is not None:
                    progress.sent()
            outcomes = await asyncio.gather(*tasks)
        finally:
            if redraw is not None:
                redraw.cancel()
                progress.close()
        return health.json(), list(outcomes)


def run_trace(
    url: str, trace_path: str, out_dir: str, *, label: str | None = None, time_scale: float = 1.0,
    timeout_s: float = 600.0, command: str | None = None, show_progress: bool = False,
    api_key: str | None = None, save_images: bool = False,
) -> dict:  # fmt: skip
    """Replays a trace file against `url` and writes results.jsonl and run.json under out_dir.
    Returns run.json's content. `show_progress`: a progress line on stderr (ReplayProgress);
    `save_images`: every completed image as out_dir/images/REQUEST_ID.png."""
    from .workload import read_trace

    meta, records = read_trace(trace_path)
    before, before_error = scrape_batch_sizes(url, api_key)
    t0 = time.time()
    progress = ReplayProgress(len(records)) if show_progress else None
    images_dir = os.path.join(out_dir, "images") if save_images else None
    if images_dir is not None:
        os.makedirs(images_dir, exist_ok=True)
    server, outcomes = asyncio.run(
        replay(
            url,
            records,
            time_scale=time_scale,
            timeout_s=timeout_s,
            progress=progress,
            api_key=api_key,
            images_dir=images_dir,
        )  # fmt: skip
    )
    wall = time.time() - t0
    after, after_error = scrape_batch_sizes(url, api_key)
    batch_sizes, batch_error = None, before_error or after_error
    if batch_error is None:
        try:
            batch_sizes = batches.delta(before, after)
        except ValueError as e:
            batch_error = str(e)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.jsonl"), "w") as f:
        for o in outcomes:
            f.write(json.dumps(asdict(o)) + "\n")
    lag = [o.sent_s - o.arrival_s * time_scale for o in outcomes]
    run = {
        "label": label or server.get("policy", "run"),
        "url": url,
        "model": server.get("model"),
        "policy": server.get("policy"),
        "policy_spec": server.get("policy_spec"),
        "world_size": server.get("world_size"),
        "trace": os.path.abspath(trace_path),
        "trace_meta": meta,
        "num_requests": len(records),
        "time_scale": time_scale,
        "started_at": t0,
        "wall_s": wall,
        "max_send_lag_s": max(lag, default=0.0),
        "command": command or " ".join(sys.argv),
        "client_host": platform.node(),
        "chunk_batch_size": batch_sizes,  # gfdit.bench.batches delta over the run, or None
        "chunk_batch_size_error": batch_error,  # why it is None
    }
    with open(os.path.join(out_dir, "run.json"), "w") as f:
        json.dump(run, f, indent=2)
    return run


def scrape_batch_sizes(
    url: str, api_key: str | None = None, timeout_s: float = 30.0
) -> tuple[dict | None, str | None]:
    """(snapshot of the server's gfdit_chunk_batch_size histogram, None), or (None, why not): /metrics
    refused or unreachable, or a server that does not export it. Never raises for those: a run
    without batch sizes is still a run."""
    try:
        r = httpx.get(url.rstrip("/") + "/metrics", headers=auth_headers(api_key), timeout=timeout_s)
    except httpx.HTTPError as e:
        return None, f"GET /metrics failed: {type(e).__name__}: {e}"
    if r.status_code != 200:
        return None, f"GET /metrics answered {r.status_code}"
    try:
        snapshot = batches.parse_histogram(r.text)
    except ValueError as e:
        return None, f"GET /metrics: {e}"
    if snapshot is None:
        return None, f"the server exports no {batches.kMetricName} histogram"
    return snapshot, None


async def _calibrate(
    url: str, model: str, classes: Sequence[RequestClass], repeats: int, timeout_s: float, api_key: str | None,
    after: list[float] | None = None,
):  # fmt: skip
    out = {}
    headers = auth_headers(api_key)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(timeout_s), headers=headers) as client:
        for c in classes:
            best = None
            for i in range(repeats + 1):  # the first is a warm-up
                rec = TraceRecord(
                    f"calib-{c.name}-{i}", 0.0, c.name, "video" if c.num_frames else "image", model,
                    "calibration", c.width, c.height, c.num_frames, c.num_inference_steps, i,
                    0.0, 3600.0, 3600.0,
                )  # fmt: skip
                o = await _one(client, rec, asyncio.get_running_loop().time(), timeout_s)
                if o.status != "completed":
                    raise RuntimeError(f"calibration request of class {c.name} did not complete: {o.error}")
                if i > 0:
                    best = o.latency_s if best is None else min(best, o.latency_s)
                    if after is not None and o.server_latency_s is not None:
                        after.append(o.latency_s - o.server_latency_s)
            out[c.name] = best
    return out


def calibrate(
    url: str, model: str, classes: Sequence[RequestClass], repeats: int = 2, timeout_s: float = 600.0,
    api_key: str | None = None, after: list[float] | None = None,
) -> dict[str, float]:  # fmt: skip
    """class name -> the fastest of `repeats` latencies of one request of that class sent alone
    (after a warm-up), to an otherwise idle server: a measured standalone latency (alone on the
    server, at whatever degree its policy gives a lone request). `after` receives each timed
    request's latency here less the server's own (its result's encoding, the answer, the client)."""
    return asyncio.run(_calibrate(url, model, classes, repeats, timeout_s, api_key, after))
