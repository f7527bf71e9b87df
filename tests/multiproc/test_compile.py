"""torch.compile over gfcoll groups on CPU ranks (host transport).

1. The gfcoll custom operators (gfcoll.ops) trace with no graph break (fullgraph=True), give the eager
   collectives' results, and a second group of the same size (this rank at the same member index) reuses
   the compiled graph: dynamo runs under error_on_recompile.
2. The tiny Flux and Wan models compiled (regional; inductor on CPU) denoise under SP 2 and 4 and across
   a 1 -> 2 -> 4 -> 1 chunk sequence exactly like the single-rank eager run (fp32, <= 1e-5).

One spawn per case; inductor's compiled artefacts are shared between ranks and runs through its on-disk
cache, so later ranks and runs mostly load instead of compiling."""

import pytest

from tests.launch import run_ranks
from tests.multiproc.test_sp_attention import REQUESTS, _move, _slices

kTol = 1e-5


def _ops_no_recompile(world):
    import torch
    import torch._dynamo

    from gfcoll.ops import traceable
    from gfdit.models.sp import gather_heads, heads_to_seq, seq_to_heads

    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        from torch._dynamo.backends.common import aot_autograd

        # aot_eager: functionalises the graph, so the operators' fake kernels and declared mutations
        # are exercised as inductor would see them.
        return aot_autograd(fw_compiler=lambda g, _: g)(gm, example_inputs)

    def sp_roundtrip(x, txt, group):
        q = seq_to_heads(x, group)  # [N, B, S, H/d, D]
        y = heads_to_seq(q[0] * 2.0 + 1.0, group)
        t = gather_heads(
            txt.narrow(2, group.rank * (txt.shape[2] // group.size), txt.shape[2] // group.size), group
        )
        s = torch.empty(group.size * 3, dtype=x.dtype)
        group.all_gather(s, x.flatten()[:3].contiguous())
        r = y.sum().reshape(1).clone()
        group.all_reduce(r)
        return y, t, s, r

    compiled = torch.compile(sp_roundtrip, backend=backend, fullgraph=True)
    # Ranks 0 and 2 are always member 0, ranks 1 and 3 member 1: two different groups per rank.
    rounds = [[0, 1], [2, 3]], [[0, 3], [2, 1]]
    gen = torch.Generator().manual_seed(world.rank)
    results = []
    for k, pairs in enumerate(rounds):
        ranks = next(p for p in pairs if world.rank in p)
        g = world.group(ranks)
        x = torch.randn(3, 1, 8, 4, 2, generator=gen)
        txt = torch.randn(1, 5, 4, 2, generator=gen)
        eager = sp_roundtrip(x, txt, g)
        with torch._dynamo.config.patch(error_on_recompile=k > 0):
            got = compiled(x, txt, traceable(g))
        results.append(max((a - b).abs().max().item() for a, b in zip(eager, got, strict=True)))
    return {"graphs": len(graphs), "diffs": results}


def test_gfcoll_ops_trace_without_breaks_or_recompiles():
    per_rank = run_ranks(_ops_no_recompile, 4, timeout=240)
    for rank, r in enumerate(per_rank):
        assert r["graphs"] == 1, f"rank {rank}: {r['graphs']} graphs compiled for two groups of size 2"
        assert max(r["diffs"]) == 0.0, f"rank {rank}: compiled != eager: {r['diffs']}"


def _compiled_sp(world, name, req_kwargs, steps, mode):
    import torch

    from gfdit.models import load_model
    from gfdit.models.compile import compile_model
    from gfdit.request import Request

    model = load_model(name, device="cpu")
    req = Request("c", name, prompt="a red fox", num_inference_steps=steps, seed=7, **req_kwargs)
    cond = model.encode(req)
    x0 = model.init_latents(req)
    n, c = model.seq_len(req), model.token_dim
    ref = model.denoise(x0, (0, n), cond, 0, steps, req)  # single rank, eager
    compile_model(model, mode, dynamic=None)
    diffs = {}

    def run_group(ranks):
        g = world.group(ranks)
        lo, hi = _slices(n, g.size)[g.rank]
        local = model.denoise(x0[:, lo:hi].clone(), (lo, hi), cond, 0, steps, req, group=g)
        full = torch.empty(g.size, *local.shape)
        g.all_gather(full, local.contiguous())
        return full.permute(1, 0, 2, 3).reshape(1, n, c)

    pair = [0, 1] if world.rank < 2 else [3, 2]
    diffs["sp2"] = (run_group(pair) - ref).abs().max().item()
    diffs["sp4"] = (run_group([2, 0, 3, 1]) - ref).abs().max().item()
    # 1 -> 2 -> 4 -> 1 between chunks (one step each).
    chunks = [([0], 0, 1), ([2, 0], 1, 2), ([3, 1, 0, 2], 2, 3), ([1], 3, 4)]
    x = x0[:, _slices(n, 4)[world.rank][0] : _slices(n, 4)[world.rank][1]].clone()
    holders = [0, 1, 2, 3]
    for ranks, start, end in chunks:
        x = _move(world, x, holders, ranks, n, c)
        holders = ranks
        if world.rank in ranks:
            g = world.group(ranks) if len(ranks) > 1 else None
            lo, hi = _slices(n, len(ranks))[ranks.index(world.rank)]
            x = model.denoise(x, (lo, hi), cond, start, end, req, group=g)
    if world.rank == 1:
        diffs["chunked"] = (x - ref).abs().max().item()
    return diffs


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_compiled_sp_matches_single_rank_eager(name):
    per_rank = run_ranks(_compiled_sp, 4, name, REQUESTS[name], 4, "regional", timeout=900)
    for rank, diffs in enumerate(per_rank):
        for key, value in diffs.items():
            assert value <= kTol, f"{name} rank {rank} {key}: max abs diff {value:.3g}"
    assert "chunked" in per_rank[1]


def _engine_compiled(world):
    import numpy as np

    from gfdit.models import load_model
    from gfdit.request import Request
    from tests.multiproc.test_engine import ELASTIC, ScriptedPolicy, _with_engine

    kwargs = {"width": 64, "height": 64}
    eager = load_model("tiny-flux", device="cpu")
    req = Request("elastic", "tiny-flux", "a red fox in the snow", num_inference_steps=4, seed=7, **kwargs)
    x0 = eager.init_latents(req)
    ref = eager.denoise(x0, (0, x0.shape[1]), eager.encode(req), 0, 4, req).numpy()

    def body(engine):
        assert engine.fast.compile == "regional" and not engine.fast.cuda_graphs  # ignored on CPU
        assert [w["width"] for w in engine.fast.warm] == [64]
        stats = engine.graph_pool_stats()
        r = engine.submit(req).result(timeout=600)
        return float(np.abs(r.latents - ref).max()), [g for _, g in r.groups], stats

    return _with_engine(
        world, "tiny-flux", ScriptedPolicy({"elastic": ELASTIC}), body, chunk_steps=1, keep_latents=True,
        compile="regional", cuda_graphs=True, warm_sizes=[(64, 64, None)],
    )  # fmt: skip


def test_engine_compiled_elastic_request_matches_eager_single_rank():
    """Engine(compile="regional") on 4 ranks: a request on groups 1 -> 2 -> 4 -> 1 equals the eager
    single-rank denoising; the warm size is compiled at start-up; CUDA graphs are ignored on CPU."""
    diff, groups, stats = run_ranks(_engine_compiled, 4, timeout=900)[0]
    assert diff <= kTol, f"compiled elastic vs eager single rank: max abs diff {diff:.3g}"
    assert {len(g) for g in groups} >= {1, 2, 4}, groups
    assert stats["graphs"] == 0 and stats["bytes"] == 0
