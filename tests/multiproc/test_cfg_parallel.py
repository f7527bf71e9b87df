"""CFG-parallel on CPU ranks (host transport; Note [CFG-parallel] in gfdit/models/base.py): the
conditional and unconditional predictions on two halves of a group, each half running Ulysses SP
over its own subgroup, the guided prediction combined over a 2-member pair group. For tiny-wan,
tiny-wan2.2 (a chunk across the expert switch) and tiny-qwen-image: 2x1 and 2x2 equal the
single-rank run (fp32, <= 1e-5), both halves hold identical slices, and a request that switches
between CFG-parallel and plain SP between chunks equals it too."""

from __future__ import annotations

import pytest

from tests.launch import run_ranks
from tests.multiproc.test_sp_attention import _move, _slices

kTol = 1e-5
CASES = {
    "tiny-wan": dict(width=64, height=64, num_frames=5, guidance_scale=4.0, negative_prompt="blurry"),
    "tiny-wan2.2": dict(width=64, height=64, num_frames=5, guidance_scale=4.0, negative_prompt="blurry"),
    "tiny-qwen-image": dict(width=128, height=128, guidance_scale=4.0, negative_prompt="blurry"),
}


def _cfg_parallel(world, name, kwargs):
    """Rank 0 reports the max abs differences against the single-rank run:
    "2x1": halves [0] and [1]; "2x2": halves [0, 1] and [2, 3], pairs [0, 2] and [1, 3], ranks 1 and 3
    compared slice by slice; "switch": steps [0, 1) plain SP on [0, 1, 2, 3], [1, 3) CFG-parallel 2x2
    (halves [2, 0] and [3, 1]), [3, 4) plain SP on [1, 0] (from half A's copy)."""
    import torch

    from gfdit.models import load_model
    from gfdit.request import Request

    model = load_model(name, device="cpu")
    req = Request("cfg", name, prompt="a red fox", num_inference_steps=4, seed=7, **kwargs)
    assert model.uses_cfg(req)
    cond, x0 = model.encode(req), model.init_latents(req)
    n, c = model.seq_len(req), model.token_dim
    ref = model.denoise(x0, (0, n), cond, 0, 4, req)
    r = world.rank
    out = {}

    # 2x1: ranks 0 and 1 hold everything, one branch each.
    if r in (0, 1):
        pair = world.group([0, 1])
        x = model.denoise(x0.clone(), (0, n), cond, 0, 4, req, cfg_group=pair)
        out["2x1"] = (x - ref).abs().max().item()
    # 2x2: half A = [0, 1] (conditional), half B = [2, 3]; member i of A pairs with member i of B.
    half = [0, 1] if r in (0, 1) else [2, 3]
    i = half.index(r)
    lo, hi = _slices(n, 2)[i]
    pair = world.group([[0, 2], [1, 3]][i])
    x = model.denoise(
        x0[:, lo:hi].clone(), (lo, hi), cond, 0, 4, req, group=world.group(half), cfg_group=pair
    )
    out["2x2"] = (x - ref[:, lo:hi]).abs().max().item()
    # The two halves hold bit-identical copies.
    other = torch.empty_like(x)
    world.batch_p2p(
        [_p2p("send", x, pair.ranks[1 - pair.rank]), _p2p("recv", other, pair.ranks[1 - pair.rank])]
    )
    out["halves_equal"] = bool(torch.equal(x, other))
    # Plain SP4 -> CFG-parallel 2x2 (halves [2, 0] and [3, 1]) -> plain SP2 on [1, 0].
    holders = [0, 1, 2, 3]
    x = x0[:, slice(*_slices(n, 4)[r])].clone()
    x = model.denoise(x, _slices(n, 4)[r], cond, 0, 1, req, group=world.group(holders))
    a, b = [2, 0], [3, 1]
    x_a = _move(world, x, holders, a, n, c)  # A's slices (on 2 and 0)
    x_b = _move(world, x, holders, b, n, c)  # the same slices for B (on 3 and 1)
    mine = x_a if r in a else x_b
    h = a if r in a else b
    j = h.index(r)
    pair = world.group([a[j], b[j]])
    mine = model.denoise(mine, _slices(n, 2)[j], cond, 1, 3, req, group=world.group(h), cfg_group=pair)
    x = _move(world, mine if r in a else None, a, [1, 0], n, c)  # plain SP from A's copy; B's is dropped
    if r in (1, 0):
        k = [1, 0].index(r)
        x = model.denoise(x, _slices(n, 2)[k], cond, 3, 4, req, group=world.group([1, 0]))
        lo, hi = _slices(n, 2)[k]
        out["switch"] = (x - ref[:, lo:hi]).abs().max().item()
    return out


def _p2p(op, t, peer):
    import gfcoll

    return gfcoll.P2P(op, t, peer)


@pytest.mark.parametrize("name", sorted(CASES))
def test_cfg_parallel_matches_single_rank(name):
    per_rank = run_ranks(_cfg_parallel, 4, name, CASES[name], timeout=300)
    for rank, diffs in enumerate(per_rank):
        assert diffs["2x2"] <= kTol, f"{name} rank {rank} 2x2: {diffs['2x2']:.3g}"
        assert diffs["halves_equal"], f"{name} rank {rank}: the halves' slices differ"
        if rank in (0, 1):
            assert diffs["2x1"] <= kTol, f"{name} rank {rank} 2x1: {diffs['2x1']:.3g}"
            assert diffs["switch"] <= kTol, f"{name} rank {rank} SP4 -> 2x2 -> SP2: {diffs['switch']:.3g}"


def test_cfg_parallel_is_refused_without_guidance():
    from gfdit.models import load_model
    from gfdit.request import Request

    model = load_model("tiny-flux", device="cpu", components=("transformer",))
    req = Request("f", "tiny-flux", "x", width=64, height=64, num_inference_steps=2, seed=1)
    x = model.init_latents(req)

    class Pair:  # never used: the check comes first
        size, rank = 2, 0

    with pytest.raises(ValueError, match="no classifier-free guidance"):
        model.denoise(x, (0, x.shape[1]), {}, 0, 1, req, cfg_group=Pair())
