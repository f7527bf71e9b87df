"""Where the compiled Wan step departs from eager (issue 12's bf16 bar): one step of wan2.1-1.3b (random
bf16 weights) with every block run eager and compiled (regional, static shapes; inductor's
emulate_precision_casts as gfdit.models.compile sets it) on the same input. Prints, per block, the
relative L2 of compiled vs eager and of eager bf16 vs the block in fp32 (its local rounding error) when
the step follows the eager outputs (lockstep), then the whole step's divergence when it follows the
compiled outputs (free running). Diagnostic, not a test.
    python tests/gpu/diag/wan_block_numerics.py [WIDTHxHEIGHTxFRAMES [MODEL [DEVICE]]]
"""

import copy
import json
import sys

import torch

from gfdit.breakdown import synthetic_cond
from gfdit.models import load_model, sp
from gfdit.request import Request


def rel(a, b):
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main():
    w, h, f = (int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "832x480x81").split("x"))
    torch._inductor.config.emulate_precision_casts = True
    name = sys.argv[2] if len(sys.argv) > 2 else "wan2.1-1.3b"
    device = torch.device(sys.argv[3] if len(sys.argv) > 3 else "cuda")
    model = load_model(name, device=device, components=("transformer",))
    req = Request("diag", model.preset.name, "a lighthouse", width=w, height=h, num_frames=f,
                  num_inference_steps=8, seed=1)  # fmt: skip
    model.validate(req)
    cond = synthetic_cond(model, req)
    x = model.init_latents(req).to(device)
    t = model.timesteps(req).timesteps[0]
    ctx = model.prepare(cond, req, None)
    compiled = torch.compile(sp.wan_block, fullgraph=True, dynamic=False)
    rows = []

    def lockstep(block, xb, context, temb, rotary, group):
        ye = sp.wan_block(block, xb, context, temb, rotary, group)
        yc = compiled(block, xb, context, temb, rotary, group)
        b32 = copy.deepcopy(block).float()
        y32 = sp.wan_block(b32, xb.float(), context.float(), temb.float(),
                           tuple(r.float() for r in rotary) if isinstance(rotary, tuple) else rotary, group)  # fmt: skip
        del b32
        rows.append({"block": len(rows), "compiled_vs_eager": rel(yc, ye), "eager_vs_fp32": rel(ye, y32),
                     "compiled_vs_fp32": rel(yc, y32)})  # fmt: skip
        return ye

    with torch.no_grad():
        model.transformer.gfdit_block_fn = lockstep
        v_eager = model.velocity(x, t, ctx, None).clone()
        model.transformer.gfdit_block_fn = compiled
        v_comp = model.velocity(x, t, ctx, None).clone()
    for r in rows:
        print(json.dumps(r), flush=True)
    worst = max(rows, key=lambda r: r["compiled_vs_eager"])
    print(json.dumps({"size": [w, h, f], "blocks": len(rows),
                      "max_local_compiled_vs_eager": worst["compiled_vs_eager"],
                      "max_local_eager_vs_fp32": max(r["eager_vs_fp32"] for r in rows),
                      "free_running_step_compiled_vs_eager": rel(v_comp, v_eager)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
