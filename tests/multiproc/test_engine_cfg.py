"""CFG-parallel as a scheduling choice, through the Engine on 4 CPU ranks (Note [CFG-parallel in
policies]): a scripted policy moves one request between plain SP and CFG-parallel layouts from chunk
to chunk (the state resharded between a plain even split and the mirrored one); the result equals
the same request served on one rank (fp32, <= 1e-5) for tiny-wan, tiny-wan2.2 (its expert switch
inside a chunk) and tiny-qwen-image. A built-in policy with cfg=on runs CFG-parallel chunks, with
cfg=off none."""

from __future__ import annotations

import pytest

from tests.launch import run_ranks

kTol = 1e-5
CASES = {
    # 6 steps in chunks of 2; tiny-wan2.2 switches experts at its boundary timestep, inside a chunk
    "tiny-wan": dict(width=64, height=64, num_frames=5, guidance_scale=4.0, negative_prompt="blurry"),
    "tiny-wan2.2": dict(width=64, height=64, num_frames=5, guidance_scale=4.0, negative_prompt="blurry"),
    "tiny-qwen-image": dict(width=128, height=128, guidance_scale=4.0, negative_prompt="blurry"),
}
# (ranks, cfg) per task of the scripted request: ENCODE, three DENOISE chunks of kChunks steps, DECODE
kSteps, kChunks = 6, (1, 4, 1)  # the middle chunk [1, 5) holds tiny-wan2.2's expert switch (step 4)
SCRIPTS = {
    "alone": [((0,), False)] * 5,
    # one rank -> CFG 2x2 (halves [2, 0], [3, 1]) -> the same (nothing moves) -> plain SP2 on B's copy
    "mirrored": [((0,), False), ((2, 0, 3, 1), True), ((2, 0, 3, 1), True), ((3, 1), False), ((1,), False)],
    # plain SP4 -> CFG 2x1 on [1, 3] -> CFG 2x2 on [0, 1, 2, 3] (from a mirrored source) -> decode on 2
    "switch": [((1,), False), ((0, 1, 2, 3), False), ((1, 3), True), ((0, 1, 2, 3), True), ((2,), False)],
}


class ScriptPolicy:
    """Test policy: the request's k-th task runs on SCRIPTS[script][k] when those ranks are free."""

    name = "script"

    def __init__(self):
        self.script = SCRIPTS["alone"]
        self.done = {}

    def spec(self):
        return "script"

    def schedule(self, view):
        from gfdit.policy import Assignment

        out = []
        for rt in view.runnable:
            k = self.done.get(rt.request_id, 0)
            ranks, cfg = self.script[k]
            if set(ranks) <= set(view.free_ranks):
                self.done[rt.request_id] = k + 1
                steps = kChunks[k - 1] if 1 <= k <= len(kChunks) else None
                out.append(Assignment(rt.task, ranks, steps, cfg=cfg))
                break
        return out


def _scripted(world, model, scripts):
    from gfdit.runtime import Engine

    policy = ScriptPolicy()
    engine = Engine(world, model, policy, keep_latents=True, chunk_steps=2)
    try:
        if world.rank != 0:
            return None
        return _body(engine, policy, model, scripts)
    finally:
        engine.close()


def _body(engine, policy, model, scripts):
    import numpy as np

    from gfdit.request import Request

    out = {}
    ref = None
    for name in ["alone", *scripts]:
        policy.script = SCRIPTS[name]
        req = Request(f"{name}", model, "a red fox", num_inference_steps=kSteps, seed=7, **CASES[model])
        result = engine.submit(req).result(timeout=200)
        if ref is None:
            ref = result
        out[name] = {
            "latent_diff": float(np.abs(result.latents - ref.latents).max()),
            "image_diff": int(np.abs(result.images.astype(int) - ref.images.astype(int)).max()),
            "cfg": result.chunk_cfg,
            "groups": result.groups,
        }
    return out


@pytest.mark.parametrize("model", sorted(CASES))
def test_cfg_parallel_chunks_equal_one_rank(model):
    if model == "tiny-wan2.2":
        from gfdit.models import load_model
        from gfdit.request import Request

        m = load_model(model, device="cpu", components=("transformer",))
        experts = m.experts(Request("e", model, "x", num_inference_steps=kSteps, **CASES[model]))
        lo, hi = kChunks[0], kChunks[0] + kChunks[1]
        assert len(set(experts[lo:hi])) == 2 and len(set(experts[:lo] + experts[hi:])) == 2, experts
    out = run_ranks(_scripted, 4, model, ["mirrored", "switch"], timeout=400)[0]
    assert out["alone"]["cfg"] == [False] * 3, out
    assert out["mirrored"]["cfg"] == [True, True, False], out
    assert out["switch"]["cfg"] == [False, True, True], out
    for name in ("mirrored", "switch"):
        assert out[name]["latent_diff"] <= kTol, (name, out[name])
        assert out[name]["image_diff"] <= 1, (name, out[name])


def _builtin(world, model, spec):
    import numpy as np

    from gfdit.policy import make_policy
    from gfdit.request import Request
    from gfdit.runtime import Engine

    engine = Engine(world, model, make_policy(spec), keep_latents=True, chunk_steps=2)
    try:
        if world.rank != 0:
            return None
        req = Request("b", model, "a red fox", num_inference_steps=6, seed=7, **CASES[model])
        result = engine.submit(req).result(timeout=200)
        return {"cfg": result.chunk_cfg, "groups": result.groups, "latents": np.asarray(result.latents)}
    finally:
        engine.close()


def test_builtin_policy_cfg_on_and_off():
    import numpy as np

    on = run_ranks(_builtin, 4, "tiny-wan", "fcfs-elastic:cfg=on", timeout=300)[0]
    off = run_ranks(_builtin, 4, "tiny-wan", "fcfs-elastic:cfg=off", timeout=300)[0]
    assert on["cfg"] and all(on["cfg"]), on["groups"]
    assert not any(off["cfg"]), off["groups"]
    assert float(np.abs(on["latents"] - off["latents"]).max()) <= kTol
