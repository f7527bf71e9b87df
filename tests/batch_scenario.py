"""The batched-denoising scenario shared by tests/unit/test_batch_denoise.py (one rank) and
tests/multiproc/test_batch_sp.py (SP over a group): three requests of one model and shape with different
seeds, step counts and guidance, run in chunks where they join and leave a batch at different step
indices, compared with each request denoised alone on one rank (Note [Batched steps])."""

from __future__ import annotations

from tests.multiproc.test_sp_attention import _move, _slices

REQUESTS = {
    # 128x128 image: 8x8 = 64 latent tokens; 4 heads; distilled guidance per request.
    "tiny-flux": dict(width=128, height=128),
    # 5 frames of 64x64: 2x4x4 = 32 latent tokens; 4 heads; CFG for guidance > 1 (request 1 has none).
    "tiny-wan": dict(width=64, height=64, num_frames=5, negative_prompt="blurry"),
}
STEPS = (4, 6, 5)
SEEDS = (1, 2, 3)
GUIDANCE = {"tiny-flux": (3.5, 2.0, 5.0), "tiny-wan": (5.0, 1.0, 3.0)}
PROMPTS = ("a red fox in the snow", "a lighthouse at dusk", "a bowl of ramen")

# Chunks in order: each a list of (request index, start, end) run together (one item: a request alone).
#   chunk 0: request 0 alone for one step;
#   chunk 1: all three batched at different step indices and lengths (the batch shrinks 3 -> 2);
#   chunk 2: request 1 leaves and finishes alone; requests 0 and 2 stay batched (2 -> 1).
CHUNKS = [
    [(0, 0, 1)],
    [(1, 0, 2), (0, 1, 3), (2, 0, 3)],
    [(0, 3, 4), (2, 3, 5)],
    [(1, 2, 6)],
]


def make_requests(name: str):
    from gfdit.request import Request

    out = []
    for k in range(3):
        out.append(
            Request(
                f"r{k}",
                name,
                prompt=PROMPTS[k],
                num_inference_steps=STEPS[k],
                seed=SEEDS[k],
                guidance_scale=GUIDANCE[name][k],
                **REQUESTS[name],
            )  # fmt: skip
        )
    return out


def run(model, name: str, group=None, *, batched_alone: bool = False):
    """Runs the scenario on this rank (member of `group`, or alone with None) and returns
    (max abs diff of each request's final latent against its solo run, the on_step calls of the batched
    chunks as (request index, step), each request's max abs change from its initial noise).
    With a group, the final latents are all_gathered over it. batched_alone: run one-item chunks through
    denoise_batch too (a batch of one), instead of denoise()."""
    import torch

    from gfdit.models.batch import BatchItem

    reqs = make_requests(name)
    conds, x0 = [], []
    for r in reqs:
        model.validate(r)
        conds.append(model.encode(r))
        x0.append(model.init_latents(r))
    s, c = model.seq_len(reqs[0]), model.token_dim
    refs = [model.denoise(x0[k], (0, s), conds[k], 0, r.num_inference_steps, r) for k, r in enumerate(reqs)]
    d = 1 if group is None else group.size
    me = 0 if group is None else group.rank
    lo, hi = me * s // d, (me + 1) * s // d
    xs = [x[:, lo:hi].clone() for x in x0]
    calls = []
    for chunk in CHUNKS:
        if len(chunk) == 1 and not batched_alone:
            k, a, b = chunk[0]
            xs[k] = model.denoise(xs[k], (lo, hi), conds[k], a, b, reqs[k], group=group)
            continue
        items = [BatchItem(reqs[k], xs[k], conds[k], a, b) for k, a, b in chunk]

        def note(i, step, ch=chunk):
            calls.append((ch[i][0], step))

        out = model.denoise_batch(items, (lo, hi), group, on_step=note)
        for (k, _, _), y in zip(chunk, out, strict=True):
            assert y.shape == (1, hi - lo, c)
            xs[k] = y
    finals = []
    for x in xs:
        if group is None:
            finals.append(x)
        else:
            full = torch.empty(d, *x.shape)
            group.all_gather(full, x.contiguous())
            finals.append(full.permute(1, 0, 2, 3).reshape(1, s, c))
    diffs = [(f - r).abs().max().item() for f, r in zip(finals, refs, strict=True)]
    moved = [(f - x).abs().max().item() for f, x in zip(finals, x0, strict=True)]
    return diffs, calls, moved


# The same requests and chunks with a group per chunk on 2 ranks (requests change groups and SP degree
# between chunks, and leave or join the batch there): (ranks, chunk).
ELASTIC_CHUNKS = [
    ([0], CHUNKS[0]),  # request 0 alone on rank 0 (SP1)
    ([0, 1], CHUNKS[1]),  # all three batched on SP2
    ([1, 0], CHUNKS[2]),  # requests 0 and 2 batched on SP2, members in the other order
    ([1], CHUNKS[3]),  # request 1 alone on rank 1 (SP1)
]
# On 4 ranks: 1 -> 2 -> 4 -> 1.
ELASTIC_CHUNKS_4 = [([0], CHUNKS[0]), ([2, 0], CHUNKS[1]), ([3, 1, 0, 2], CHUNKS[2]), ([1], CHUNKS[3])]


def run_elastic(world, model, name: str, chunks=ELASTIC_CHUNKS):
    """`chunks` (ELASTIC_CHUNKS: 2 ranks or more) on the ranks of `world`; ranks outside a chunk's
    group take part in the moves only.
    Returns rank 0's max abs diff of each request's final latent against its solo run (None elsewhere)."""
    from gfdit.models.batch import BatchItem

    reqs = make_requests(name)
    conds = [model.encode(r) for r in reqs]
    x0 = [model.init_latents(r) for r in reqs]
    s, c = model.seq_len(reqs[0]), model.token_dim
    refs = [model.denoise(x0[k], (0, s), conds[k], 0, r.num_inference_steps, r) for k, r in enumerate(reqs)]
    holders: list[list[int] | None] = [None] * 3  # None: not started, every rank has x0
    local = [None] * 3
    me = world.rank
    for ranks, chunk in chunks:
        d = len(ranks)
        for k, _, _ in chunk:  # move each member's state onto this chunk's group
            if holders[k] is None:
                if me in ranks:
                    lo, hi = _slices(s, d)[ranks.index(me)]
                    local[k] = x0[k][:, lo:hi].clone()
            else:
                local[k] = _move(world, local[k], holders[k], ranks, s, c)
            holders[k] = list(ranks)
        if me not in ranks:
            continue
        group = world.group(ranks) if d > 1 else None
        lo, hi = _slices(s, d)[ranks.index(me)]
        items = [BatchItem(reqs[k], local[k], conds[k], a, b) for k, a, b in chunk]
        if len(items) == 1:
            k, a, b = chunk[0]
            local[k] = model.denoise(local[k], (lo, hi), conds[k], a, b, reqs[k], group=group)
        else:
            for (k, _, _), y in zip(chunk, model.denoise_batch(items, (lo, hi), group), strict=True):
                local[k] = y
    diffs = []
    for k in range(3):
        full = _move(world, local[k], holders[k], [0], s, c)
        if me == 0:
            diffs.append((full - refs[k]).abs().max().item())
    return diffs if me == 0 else None
