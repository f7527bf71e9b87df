"""The embedded-default demo of the runtime: ``torchrun --nproc-per-node 4 -m gfdit.demo``.

Every rank joins one gfcoll world on the CPU and one Engine serving a tiny random-weight model;
rank 0 submits a mixed batch (small and large images, tight and loose deadlines) under a policy,
and prints where each request ran at every chunk, how much state moved, and whether it met its
deadline, then writes the images as PNG files.
"""

from __future__ import annotations

import argparse
import os

import gfcoll
from gfdit.request import Request
from gfdit.runtime import Engine


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-flux")
    p.add_argument("--policy", default="edf-best-fit:max_sp=4")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--requests", type=int, default=6)
    p.add_argument("--out", default="gfdit-demo-out", help="folder for the PNG files (rank 0)")
    args = p.parse_args(argv)

    world = gfcoll.init(device=args.device)
    engine = Engine(world, args.model, args.policy, chunk_steps=2)
    try:
        if world.rank == 0:
            _run(engine, args)
    finally:
        engine.close()
        world.close()
    return 0


def _run(engine: Engine, args) -> None:
    from PIL import Image  # noqa: PLC0415 - a dependency of diffusers

    video = engine.model.preset.is_video
    handles = []
    for i in range(args.requests):
        big = i % 3 == 0
        side = 128 if big else 64
        req = Request(
            f"req{i}", args.model, f"demo prompt {i}", width=side, height=side,
            num_frames=5 if video else None, num_inference_steps=6 if big else 4, seed=i,
            deadline_s=engine.now() + (3.0 if i % 2 else 20.0),
        )  # fmt: skip
        handles.append(engine.submit(req))
    os.makedirs(args.out, exist_ok=True)
    print(
        f"gfdit demo: {args.model}, policy {engine.policy.spec()}, {engine.world.size} ranks on {engine.world.device}"
    )
    for h in handles:
        r = h.result(timeout=600)
        req = h.request
        met = "met" if req.deadline_s is None or req.arrival_s + r.latency_s <= req.deadline_s else "missed"
        chunks = " ".join(f"{task.split(':')[1]}@{list(g)}" for task, g in r.groups)
        print(f"  {h.request_id}: {req.width}x{req.height}, {r.latency_s * 1e3:.0f} ms ({met} deadline), "
              f"{r.num_reshards} reshards moving {r.bytes_moved} B in {r.reshard_s * 1e3:.2f} ms")  # fmt: skip
        print(f"      {chunks}")
        frame = r.images[0] if not video else r.images[0, 0]
        Image.fromarray(frame).save(os.path.join(args.out, f"{h.request_id}.png"))
    print(f"  images written to {args.out}/")


if __name__ == "__main__":
    raise SystemExit(main())
