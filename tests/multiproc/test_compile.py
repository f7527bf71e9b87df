"""torch.compile over gfcoll groups on CPU ranks (host transport).

1. The gfcoll custom operators (gfcoll.ops) trace with no graph break (fullgraph=True), give the eager
   collectives' results, and a second group of the same size (this rank at the same member index) reuses
   the compiled graph: dynamo runs under error_on_recompile.
2. An Engine serving the tiny Flux and Wan models compiled (regional; inductor on CPU) runs a request
   whose chunks move over groups of 1 -> 2 -> 4 -> 1 ranks exactly like the single-rank eager run (fp32,
   <= 1e-5): compiled SP on 2 and 4 ranks, and a group change between chunks.

One spawn per case. CPU time: inductor compiles each block class for the first two shapes a rank sees
(then dynamic shapes) and member index; cold, on a loaded 2-core machine, about 5 minutes for the file.
Its on-disk cache shares compiled artefacts between ranks and runs."""

import pytest

from tests.launch import run_ranks
from tests.multiproc.test_sp_attention import REQUESTS

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


def _engine_compiled(world, name, kwargs):
    import numpy as np

    from gfdit.models import load_model
    from gfdit.request import Request
    from tests.multiproc.test_engine import ELASTIC, ScriptedPolicy, _with_engine

    eager = load_model(name, device="cpu")
    req = Request("elastic", name, "a red fox in the snow", num_inference_steps=4, seed=7, **kwargs)
    x0 = eager.init_latents(req)
    ref = eager.denoise(x0, (0, x0.shape[1]), eager.encode(req), 0, 4, req).numpy()
    warm = (kwargs["width"], kwargs["height"], kwargs.get("num_frames"))

    def body(engine):
        assert engine.fast.compile == "regional" and not engine.fast.cuda_graphs  # ignored on CPU
        assert [(w["width"], w["height"], w["frames"]) for w in engine.fast.warm] == [warm]
        stats = engine.graph_pool_stats()
        r = engine.submit(req).result(timeout=600)
        return float(np.abs(r.latents - ref).max()), [g for _, g in r.groups], stats

    return _with_engine(
        world, name, ScriptedPolicy({"elastic": ELASTIC}), body, chunk_steps=1, keep_latents=True,
        compile="regional", cuda_graphs=True, warm_sizes=[warm],
    )  # fmt: skip


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_engine_compiled_elastic_request_matches_eager_single_rank(name):
    """Engine(compile="regional") on 4 ranks: a request whose chunks run on groups of 1 -> 2 -> 4 -> 1
    ranks (tests/multiproc/test_engine.py ELASTIC) equals the eager single-rank denoising (fp32,
    <= 1e-5); the warm size is compiled at start-up; CUDA graphs are ignored on CPU."""
    diff, groups, stats = run_ranks(_engine_compiled, 4, name, REQUESTS[name], timeout=900)[0]
    assert diff <= kTol, f"{name}: compiled elastic vs eager single rank: max abs diff {diff:.3g}"
    assert [len(g) for g in groups[1:5]] == [1, 2, 4, 1], groups
    assert stats["graphs"] == 0 and stats["bytes"] == 0
