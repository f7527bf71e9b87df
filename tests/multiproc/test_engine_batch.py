"""Batched DENOISE chunks through the Engine on 2 CPU ranks (Note [Batching in policies]): three
requests of one shape with different seeds, step counts and guidance, runnable together under
edf-best-fit:max_batch=4, run at least one batched chunk, and each result equals the same request
served alone; with max_batch=1 no chunk is batched."""

import pytest

from tests.launch import run_ranks


class GatherPolicy:
    """Test policy: `inner`'s decisions, except that DENOISE waits until `gather` requests are
    runnable at DENOISE together (once); gather 0 delegates at once."""

    name = "gather"

    def __init__(self, inner: str):
        from gfdit.policy import make_policy

        self.inner = make_policy(inner)
        self.gather = 0

    def spec(self):
        return f"gather({self.inner.spec()})"

    def schedule(self, view):
        import dataclasses

        from gfdit.tasks import TaskKind

        if self.gather:
            ready = [rt for rt in view.runnable if rt.kind is TaskKind.DENOISE]
            if len(ready) < self.gather:  # the others' tasks only, on every free rank
                others = tuple(rt for rt in view.runnable if rt.kind is not TaskKind.DENOISE)
                return self.inner.schedule(dataclasses.replace(view, runnable=others)) if others else []
            self.gather = 0
            # Released on one rank: the policy places one chunk there and the others, left waiting,
            # join its batch (chunks with ranks of their own are never pulled into a batch).
            return self.inner.schedule(dataclasses.replace(view, free_ranks=view.free_ranks[:1]))
        return self.inner.schedule(view)


CASES = {
    "tiny-flux": dict(width=64, height=64),
    "tiny-wan": dict(width=64, height=64, num_frames=5),
}
# (seed, steps, guidance) of the three requests
MEMBERS = [(11, 3, 3.5), (12, 5, 5.0), (13, 4, 2.0)]


def _batched_vs_alone(world, model, max_batch):
    from gfdit.runtime import Engine

    policy = GatherPolicy(f"edf-best-fit:max_batch={max_batch}")
    engine = Engine(world, model, policy, keep_latents=True)
    try:
        if world.rank != 0:
            return None
        return _body(engine, policy, model)
    finally:
        engine.close()


def _body(engine, policy, model):
    import numpy as np

    from gfdit.request import Request

    def request(tag, i):
        seed, steps, guidance = MEMBERS[i]
        return Request(
            f"{tag}{i}", model, f"prompt number {i}", num_inference_steps=steps, seed=seed,
            guidance_scale=guidance, **CASES[model],
        )  # fmt: skip

    alone = [engine.submit(request("alone", i)).result(timeout=120) for i in range(len(MEMBERS))]
    policy.gather = len(MEMBERS)
    handles = [engine.submit(request("together", i)) for i in range(len(MEMBERS))]
    together = [h.result(timeout=120) for h in handles]
    return {
        "alone_sizes": [r.chunk_batch_sizes for r in alone],
        "sizes": [r.chunk_batch_sizes for r in together],
        "latent_diff": [
            float(np.abs(t.latents - a.latents).max()) for t, a in zip(together, alone, strict=True)
        ],
        "image_diff": [
            int(np.abs(t.images.astype(int) - a.images.astype(int)).max())
            for t, a in zip(together, alone, strict=True)
        ],
        "shapes_equal": all(t.images.shape == a.images.shape for t, a in zip(together, alone, strict=True)),
    }


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-wan"])
def test_batched_chunks_equal_requests_alone(model):
    out = run_ranks(_batched_vs_alone, 2, model, 4, timeout=400)[0]
    assert all(s == [1] * len(s) for s in out["alone_sizes"]), out
    # Every request ran at least one chunk in a batch of two or more.
    assert all(max(s) >= 2 for s in out["sizes"]), out
    assert max(max(s) for s in out["sizes"]) <= 4, out
    assert out["shapes_equal"], out
    assert max(out["latent_diff"]) <= 1e-5, out
    assert max(out["image_diff"]) <= 1, out


def test_batched_chunks_on_four_ranks_equal_requests_alone():
    # Members encoded on different ranks move onto the batch's group, some from ranks outside it.
    out = run_ranks(_batched_vs_alone, 4, "tiny-flux", 3, timeout=400)[0]
    assert all(max(s) >= 2 for s in out["sizes"]), out
    assert max(out["latent_diff"]) <= 1e-5, out


def test_max_batch_one_runs_no_batched_chunk():
    out = run_ranks(_batched_vs_alone, 2, "tiny-flux", 1, timeout=400)[0]
    assert all(s == [1] * len(s) for s in out["sizes"]), out
    assert max(out["latent_diff"]) <= 1e-5, out


def _burst_on_one_rank(world, max_batch):
    """A burst of four same-shape requests on one rank (Note [Encoding ahead for batches]); then the
    same requests one at a time. Returns each burst request's chunk batch sizes and its largest
    latent difference from its run alone."""
    import numpy as np

    from gfdit.policy import make_policy
    from gfdit.request import Request
    from gfdit.runtime import Engine

    engine = Engine(world, "tiny-flux", make_policy(f"fcfs-elastic:max_batch={max_batch}"), keep_latents=True)
    try:

        def request(tag, i):
            return Request(
                f"{tag}{i}", "tiny-flux", f"prompt number {i}", width=64, height=64,
                num_inference_steps=4, seed=20 + i, guidance_scale=2.0 + i,
            )  # fmt: skip

        handles = [engine.submit(request("burst", i)) for i in range(4)]
        burst = [h.result(timeout=120) for h in handles]
        alone = [engine.submit(request("alone", i)).result(timeout=120) for i in range(4)]
        return {
            "sizes": [r.chunk_batch_sizes for r in burst],
            "alone_sizes": [r.chunk_batch_sizes for r in alone],
            "latent_diff": [
                float(np.abs(b.latents - a.latents).max()) for b, a in zip(burst, alone, strict=True)
            ],
        }
    finally:
        engine.close()


def test_a_burst_on_one_rank_runs_batched_chunks():
    """One rank serves requests one after the other; with max_batch=4 the queued requests are encoded
    ahead, so the burst's chunks run batched, and each result still equals the request served alone."""
    out = run_ranks(_burst_on_one_rank, 1, 4, timeout=300)[0]
    assert all(s == [1] * len(s) for s in out["alone_sizes"]), out
    assert max(max(s) for s in out["sizes"]) >= 2, out
    assert sum(max(s) >= 2 for s in out["sizes"]) >= 2, out  # at least two requests ran batched
    assert max(out["latent_diff"]) <= 1e-5, out


def _faulty_member(world):
    """Three same-shape requests gathered into one batch on one rank, one of them faulty (its
    prompt makes denoising raise, batched or not): the batch fails, every member re-runs alone, and
    only the faulty one ends failed."""
    from gfdit.models import load_model
    from gfdit.request import Request
    from gfdit.runtime import Engine
    from tests.fault_model import FaultyModel

    policy = GatherPolicy("edf-best-fit:max_batch=4")
    engine = Engine(
        world, "tiny-flux", policy, model_obj=FaultyModel(load_model("tiny-flux", device=world.device))
    )
    try:
        if world.rank != 0:
            return None
        policy.gather = 3
        prompts = ["fine one", "FAIL here", "fine two"]
        handles = [
            engine.submit(
                Request(f"m{i}", "tiny-flux", p, width=64, height=64, num_inference_steps=4, seed=i)
            )
            for i, p in enumerate(prompts)
        ]
        out = []
        for h in handles:
            try:
                r = h.result(timeout=120)
                out.append(("ok", r.num_reruns, r.chunk_batch_sizes))
            except RuntimeError as e:
                out.append(("failed", str(e)))
        return out
    finally:
        engine.close()


def test_a_failed_batch_reruns_its_members_alone():
    out = run_ranks(_faulty_member, 2, timeout=400)[0]
    assert [o[0] for o in out] == ["ok", "failed", "ok"], out
    (ok0, reruns0, sizes0), failed, (ok2, reruns2, sizes2) = out
    assert ok0 == ok2 == "ok" and failed[0] == "failed" and "injected fault" in failed[1], out
    # Both good requests were in the failed batch, re-ran once, and then never joined a batch.
    assert reruns0 == reruns2 == 1 and set(sizes0) == set(sizes2) == {1}, out
