"""Wan2.2 on CPU ranks (host transport): tiny-wan2.2's two experts under Ulysses SP (groups of 2 and 4,
shuffled orders) and with a request moved between SP degrees at chunks whose boundaries fall before,
on and after the expert switch, equal the single-rank run (fp32, <= 1e-5); the elastic engine with chunks
straddling the switch gives the single-rank result; tiny-wan2.2-ti2v (16x VAE) under SP; and a 2-rank
`gfdit serve` of tiny-wan2.2 answers a 9-frame video job at its default size."""

from __future__ import annotations

import io
import time

import httpx
import pytest

from tests.launch import run_ranks
from tests.multiproc.test_engine import ScriptedPolicy, _with_engine
from tests.multiproc.test_server import _healthy, _start, _video_end, kStartTimeoutS
from tests.multiproc.test_sp_attention import _move, _slices, _sp_scenarios

TWO = "tiny-wan2.2"
TI2V = "tiny-wan2.2-ti2v"
kTol = 1e-5
# 5 frames of 64x64: 2x4x4 = 32 latent tokens; 4 heads; CFG. 4 steps: steps 0-1 high noise, 2-3 low noise.
REQ = dict(width=64, height=64, num_frames=5, guidance_scale=4.0, negative_prompt="blurry")


def _straddling_chunks(world, name, req_kwargs):
    """Chunks [0, 1) on [1, 0], [1, 3) on [3, 1, 0, 2] (across the switch at step 2, under SP4), [3, 4)
    on [2]; every rank checks its experts, rank 2 the result against the single-rank run."""
    from gfdit.models import load_model
    from gfdit.models.wan22 import kHighNoise, kLowNoise
    from gfdit.request import Request

    model = load_model(name, device="cpu")
    req = Request("sp", name, prompt="a red fox", num_inference_steps=4, seed=7, **req_kwargs)
    assert model.experts(req) == [kHighNoise, kHighNoise, kLowNoise, kLowNoise]
    cond, x0 = model.encode(req), model.init_latents(req)
    n, c = model.seq_len(req), model.token_dim
    ref = model.denoise(x0, (0, n), cond, 0, 4, req)
    x, holders = x0[:, slice(*_slices(n, 4)[world.rank])].clone(), [0, 1, 2, 3]
    for ranks, start, end in [([1, 0], 0, 1), ([3, 1, 0, 2], 1, 3), ([2], 3, 4)]:
        x = _move(world, x, holders, ranks, n, c)
        holders = ranks
        if world.rank in ranks:
            g = world.group(ranks) if len(ranks) > 1 else None
            lo, hi = _slices(n, len(ranks))[ranks.index(world.rank)]
            x = model.denoise(x, (lo, hi), cond, start, end, req, group=g)
    return (x - ref).abs().max().item() if world.rank == 2 else None


@pytest.mark.parametrize("name", [TWO, TI2V])
def test_sp_groups_and_chunks_match_single_rank(name):
    kwargs = REQ if name == TWO else {**REQ, "width": 128, "height": 128}  # TI2V: 2x4x4 = 32 tokens too
    per_rank = run_ranks(_sp_scenarios, 4, name, kwargs, 4, timeout=240)
    for rank, diffs in enumerate(per_rank):
        for key in ("sp2", "sp4[0, 1, 2, 3]", "sp4[2, 0, 3, 1]"):
            assert diffs[key] <= kTol, f"{name} rank {rank} {key}: max abs diff {diffs[key]:.3g}"
    assert per_rank[1]["chunked"] <= kTol, f"{name} 1->2->4->1: {per_rank[1]['chunked']:.3g}"


def test_chunk_across_the_expert_switch_under_sp():
    diff = run_ranks(_straddling_chunks, 4, TWO, REQ, timeout=240)[2]
    assert diff <= kTol, diff


class _ChunkedScript(ScriptedPolicy):
    """ScriptedPolicy whose DENOISE entries are (ranks, steps): chunks of several steps."""

    def schedule(self, view):
        from gfdit.policy import Assignment
        from gfdit.tasks import TaskKind

        free, out = set(view.free_ranks), []
        for rt in view.runnable:
            script = self.scripts[rt.request_id]
            if rt.kind is TaskKind.DENOISE:
                ranks, steps = script[rt.task.start]
            else:
                ranks, steps = script[rt.kind.name], None
            if set(ranks) <= free:
                free -= set(ranks)
                out.append(Assignment(rt.task, tuple(ranks), steps))
        return out


SINGLE = {"ENCODE": [0], 0: ([0], 4), "DECODE": [0]}
ACROSS = {"ENCODE": [1], 0: ([2], 1), 1: ([3, 1], 2), 3: ([2, 0, 3, 1], 1), "DECODE": [0]}
ON = {"ENCODE": [3], 0: ([1, 2], 2), 2: ([0, 3, 2, 1], 2), "DECODE": [2]}


def _engine_runs(world):
    def body(engine):
        import numpy as np

        from gfdit.request import Request

        out = {}
        for rid in ("single", "across", "on"):
            req = Request(rid, TWO, "a red fox in the snow", num_inference_steps=4, seed=7, **REQ)
            out[rid] = engine.submit(req).result(timeout=240)
        ref = out["single"]
        return {
            rid: (
                float(np.abs(out[rid].latents - ref.latents).max()),
                int(np.abs(out[rid].images.astype(int) - ref.images.astype(int)).max()),
                [g for _, g in out[rid].groups],
            )
            for rid in ("across", "on")
        } | {"shape": ref.images.shape}

    scripts = {"single": SINGLE, "across": ACROSS, "on": ON}
    return _with_engine(world, TWO, _ChunkedScript(scripts), body, chunk_steps=1, keep_latents=True)


def test_elastic_engine_with_chunks_across_and_on_the_switch():
    out = run_ranks(_engine_runs, 4, timeout=300)[0]
    for rid in ("across", "on"):
        latent_diff, pixel_diff, groups = out[rid]
        assert latent_diff <= kTol and pixel_diff <= 1, (rid, latent_diff, pixel_diff)
    assert out["across"][2][1:4] == [(2,), (3, 1), (2, 0, 3, 1)]
    assert out["shape"] == (1, 5, 64, 64, 3)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("wan22-server"))
    config = (TWO, "fcfs-elastic", ["--chunk-steps", "3", "--max-steps", "50"])
    s = _start("wan22", tmp, config)
    try:
        s = _healthy(s, tmp, time.monotonic() + kStartTimeoutS, config)
        yield s
    finally:
        s.stop()


def test_video_job_of_nine_frames_at_the_default_size(server):
    import av

    r = httpx.post(
        server.url + "/v1/videos", json={"prompt": "waves", "num_frames": 9, "seed": 4}, timeout=30
    )
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["num_frames"] == 9 and job["size"] == "128x128"  # 832x480 clamped to the preset's 128
    job = _video_end(server.url, job["id"], 240)
    assert job["status"] == "completed" and job["error"] is None, job
    content = httpx.get(f"{server.url}/v1/videos/{job['id']}/content", timeout=30)
    assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
    with av.open(io.BytesIO(content.content)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (128, 128, 3)


def test_engine_compiled_regional_matches_eager_single_rank():
    """Engine(compile="regional"): both experts share the compiled block; SP over 1 -> 2 -> 4 -> 1 ranks,
    one step per chunk across the switch, equals the eager single-rank run (fp32, <= 1e-5)."""
    from tests.multiproc.test_compile import _engine_compiled

    diff, groups, _ = run_ranks(_engine_compiled, 4, TWO, REQ, timeout=900)[0]
    assert diff <= kTol, diff
    assert [len(g) for g in groups[1:5]] == [1, 2, 4, 1], groups
