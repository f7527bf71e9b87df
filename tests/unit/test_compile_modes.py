"""`--compile full` on CPU (inductor): the whole compiled forward of the tiny presets denoises like
eager (fp32, <= 1e-5); bad modes are refused; a compiled model cannot switch modes. (Regional mode,
with SP over gfcoll groups: tests/multiproc/test_compile.py.) About 45 s of cold compilation."""

import pytest

CASES = {
    "tiny-flux": dict(width=64, height=64),
    "tiny-wan": dict(width=64, height=64, num_frames=5),
    "tiny-qwen-image": dict(width=64, height=64, guidance_scale=4.0),
    "tiny-wan2.2": dict(width=64, height=64, num_frames=5),  # both experts (the switch at step 1 of 2)
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_full_compile_matches_eager_on_cpu(name):
    from gfdit.models import load_model
    from gfdit.models.compile import compile_model
    from gfdit.request import Request

    model = load_model(name, device="cpu")
    req = Request("c", name, "a fox", num_inference_steps=2, seed=1, **CASES[name])
    cond, x0 = model.encode(req), model.init_latents(req)
    ref = model.denoise(x0, (0, x0.shape[1]), cond, 0, 2, req)
    with pytest.raises(ValueError, match="compile mode"):
        compile_model(model, "fast")
    compile_model(model, "full", dynamic=None)
    assert model.compile_mode == "full"
    out = model.denoise(x0, (0, x0.shape[1]), cond, 0, 2, req)
    assert float((out - ref).abs().max()) <= 1e-5
    with pytest.raises(ValueError, match="already compiled"):
        compile_model(model, "regional")


def test_fast_options_parse_and_defaults():
    from gfdit.fast_options import parse_sizes
    from gfdit.models.compile import default_mode

    assert parse_sizes("512, 1024x768,832x480x81") == [(512, 512, None), (1024, 768, None), (832, 480, 81)]
    assert parse_sizes("") == []
    for bad in ("x", "0", "1x2x3x4", "64,-1"):
        with pytest.raises(ValueError):
            parse_sizes(bad)
    assert default_mode("cpu") == "off" and default_mode("cuda") == "regional"
