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


def test_warm_batch_sizes_parse_and_reach_the_warm_up():
    import argparse

    from gfdit.fast_options import add_arguments, check_arguments, fast_kwargs, parse_batch_sizes

    assert parse_batch_sizes("4, 1,2,2") == [1, 2, 4]
    assert parse_batch_sizes("") is None
    for bad in ("0", "a", "1,-2", ","):
        with pytest.raises(ValueError):
            parse_batch_sizes(bad)
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert fast_kwargs(p.parse_args(["--warm-batch-sizes", "1,3"]))["warm_batch_sizes"] == [1, 3]
    with pytest.raises(SystemExit):
        check_arguments(p, p.parse_args(["--warm-batch-sizes", "0"]))


def test_apply_warms_every_batch_size_of_every_warm_size():
    from gfdit.models import load_model
    from gfdit.runtime.fast import apply

    model = load_model("tiny-flux", device="cpu")
    fast = apply(model, compile="off", warm_sizes=[(64, 64, None)], warm_batch_sizes=[1, 3])
    assert [(w["width"], w["batch"]) for w in fast.warm] == [(64, 1), (64, 3)]


def test_compiling_turns_on_eager_rounding_unless_the_user_chose(monkeypatch):
    import torch._inductor.config as inductor_config

    from gfdit.models.compile import _eager_numerics

    monkeypatch.setattr(inductor_config, "emulate_precision_casts", False)
    monkeypatch.setenv("TORCHINDUCTOR_EMULATE_PRECISION_CASTS", "0")
    _eager_numerics()
    assert inductor_config.emulate_precision_casts is False  # the user's choice stands
    monkeypatch.delenv("TORCHINDUCTOR_EMULATE_PRECISION_CASTS")
    _eager_numerics()
    assert inductor_config.emulate_precision_casts is True
