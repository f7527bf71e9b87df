"""The collective correctness matrix, run on every rank of a world (CPU or CUDA tensors).

``run_matrix(world, device, sizes, seed)`` checks every operation, dtype and reduction on a set of
ordered groups against tests.reference, bitwise, and returns the number of checks made.
"""

from __future__ import annotations

import torch

import gfcoll
from tests.reference import DTYPES, OPS, make_input, random_groups, reduce_ref, splits_for


def _check(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    got = got.cpu()
    if not torch.equal(got, want):
        bad = (got != want).nonzero()
        first = bad[0].item() if bad.numel() else -1
        raise AssertionError(
            f"{what}: {bad.numel()} of {want.numel()} elements differ; first at {first}: "
            f"got {got.view(-1)[first].item()} want {want.view(-1)[first].item()}"
        )


def run_matrix(
    world: gfcoll.World,
    device: str,
    sizes: list[int],
    seed: int = 0,
    num_groups: int = 3,
    dtypes=DTYPES,
    ops=OPS,
) -> int:
    dev = torch.device(device) if device == "cpu" else world.device
    checks = 0
    groups = random_groups(seed, world.size, num_groups)
    for gi, ranks in enumerate(groups):
        g = world.group(ranks)
        if g.rank < 0:
            continue
        n, me = g.size, g.rank
        for si, numel in enumerate(sizes):
            for di, dtype in enumerate(dtypes):
                s = seed * 7919 + gi * 131 + si * 17 + di
                ins = [make_input(s, k, numel, dtype) for k in range(n)]
                tag = f"group {ranks} numel {numel} {dtype}"

                out = torch.full((n * numel,), 7, dtype=dtype, device=dev)
                g.all_gather(out, ins[me].to(dev))
                _check(out, torch.cat(ins), f"all_gather {tag}")

                rs_in = [make_input(s + 1, k, n * numel, dtype) for k in range(n)]
                for op in ops:
                    if op == "avg" and not dtype.is_floating_point:
                        continue
                    out = torch.full((numel,), 7, dtype=dtype, device=dev)
                    g.reduce_scatter(out, rs_in[me].to(dev), op=op)
                    want = reduce_ref([x[me * numel : (me + 1) * numel] for x in rs_in], op)
                    _check(out, want, f"reduce_scatter {op} {tag}")

                    t = ins[me].to(dev).clone()
                    g.all_reduce(t, op=op)
                    _check(t, reduce_ref(ins, op), f"all_reduce {op} {tag}")
                    checks += 2

                root = ranks[(s + 3) % n]
                t = ins[me].to(dev).clone()
                g.broadcast(t, root=root)
                _check(t, ins[ranks.index(root)], f"broadcast root {root} {tag}")

                # all_to_all, even (rows of 3 elements) then uneven splits.
                rows = numel % 5 + 1
                a2a_in = [make_input(s + 2, k, n * rows * 3, dtype).view(n * rows, 3) for k in range(n)]
                out = torch.full((n * rows, 3), 7, dtype=dtype, device=dev)
                g.all_to_all(out, a2a_in[me].to(dev))
                want = torch.cat([a2a_in[k][me * rows : (me + 1) * rows] for k in range(n)])
                _check(out, want, f"all_to_all even {tag}")

                sp = splits_for(s, n, rows)
                send_rows = sp[me]
                recv_rows = [sp[k][me] for k in range(n)]
                srcs = [make_input(s + 4, k, sum(sp[k]) * 3, dtype).view(sum(sp[k]), 3) for k in range(n)]
                out = torch.full((sum(recv_rows), 3), 7, dtype=dtype, device=dev)
                g.all_to_all(out, srcs[me].to(dev), out_splits=recv_rows, in_splits=send_rows)
                want = torch.cat([srcs[k][sum(sp[k][:me]) : sum(sp[k][: me + 1])] for k in range(n)])
                _check(out, want, f"all_to_all uneven {tag}")
                checks += 4
        g.barrier()
    # Point to point: a ring over the whole world, then a fused exchange with both neighbours.
    if world.size > 1:
        r, n = world.rank, world.size
        for numel in sizes:
            data = [make_input(seed + 99, k, numel, torch.float32) for k in range(n)]
            got = torch.zeros(numel, device=dev)
            if r % 2 == 0:
                world.send(data[r].to(dev), (r + 1) % n)
                world.recv(got, (r - 1) % n)
            else:
                world.recv(got, (r - 1) % n)
                world.send(data[r].to(dev), (r + 1) % n)
            _check(got, data[(r - 1) % n], f"send/recv numel {numel}")
            left, right = torch.zeros(numel, device=dev), torch.zeros(numel, device=dev)
            world.batch_p2p(
                [
                    gfcoll.P2P("recv", left, (r - 1) % n),
                    gfcoll.P2P("send", data[r].to(dev), (r + 1) % n),
                    gfcoll.P2P("send", data[r].to(dev), (r - 1) % n),
                    gfcoll.P2P("recv", right, (r + 1) % n),
                ]
            )
            _check(left, data[(r - 1) % n], "batch_p2p left")
            _check(right, data[(r + 1) % n], "batch_p2p right")
            checks += 3
    if device == "cuda":
        torch.cuda.synchronize()
    return checks
