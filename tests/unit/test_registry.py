"""One model registry (Note [One model registry] in gfdit.cost): the cost model, the scheduler and
the models read their shapes from the presets and agree; one status vocabulary; one chunk size."""

import dataclasses
import itertools

import pytest

from gfdit.cost import AnalyticCostModel, get_profile, state_dim_size, valid_sp_degrees
from gfdit.models.presets import PRESETS, get_preset
from gfdit.request import Request
from gfdit.runtime.handle import Status
from gfdit.scheduler import Scheduler, kDefaultChunkSteps


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_cost_profile_shapes_are_the_presets(name):
    preset, profile = get_preset(name), get_profile(name)
    assert profile.preset is preset
    assert (profile.num_heads, profile.num_layers, profile.hidden, profile.text_tokens, profile.video) == (
        preset.num_heads, preset.num_blocks, preset.hidden, preset.text_tokens, preset.is_video,
    )  # fmt: skip
    assert profile.state_bytes_per_token == preset.token_dim * 4


def test_tiny_flux_is_the_model_it_builds():
    # The review's example: the cost model said 4 layers of width 256; the preset has 1 + 1 of 64.
    p = get_profile("tiny-flux")
    assert (p.num_layers, p.hidden, p.num_heads) == (2, 64, 4)


def _sizes(name):
    preset = get_preset(name)
    m = preset.size_multiple
    frames = (None,) if not preset.is_video else (1, 1 + preset.frame_step, 1 + 2 * preset.frame_step)
    for w, h, f in itertools.product((m, 3 * m, 4 * m, 6 * m), (m, 2 * m, 5 * m), frames):
        yield Request("r", name, width=w, height=h, num_frames=f)


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-wan"])
def test_models_cost_and_scheduler_agree_on_tokens_and_degrees(name):
    from gfdit.models import load_model

    model = load_model(name, device="cpu")
    for r in _sizes(name):
        s = model.seq_len(r)
        assert s == state_dim_size(r) == get_profile(name).seq_len(r.width, r.height, r.num_frames)
        assert model.init_latents(dataclasses.replace(r, seed=1)).shape[1] == s  # the tokens it really makes
        for n in (1, 3, 4, 8):
            assert tuple(model.valid_sp_degrees(r, n)) == valid_sp_degrees(r, n), (r, n)
        # The cost model's N is S plus the text tokens the transformer joins to it.
        assert (
            get_profile(name).attention_len(r.width, r.height, r.num_frames) == s + model.preset.text_tokens
        )


def test_valid_degrees_ignore_text_tokens():
    # 64 x 48 on tiny-flux: 4 x 3 = 12 latent tokens; 4 heads; 64 text tokens (replicated).
    r = Request("r", "tiny-flux", width=64, height=48)
    assert valid_sp_degrees(r, 8) == (1, 2, 4)
    r = Request("r", "tiny-flux", width=48, height=48)  # 9 tokens: only 1
    assert valid_sp_degrees(r, 8) == (1,)


def test_scheduler_uses_the_preset_rule_and_validation():
    sched = Scheduler(4, _Idle(), AnalyticCostModel())
    rec = sched.submit(Request("a", "tiny-flux", width=64, height=48))
    assert rec.dim_size == 12 and rec.valid_degrees == (1, 2, 4)
    with pytest.raises(ValueError, match="num_frames must be None for the image model"):
        sched.submit(Request("b", "tiny-flux", width=64, height=48, num_frames=5))
    with pytest.raises(ValueError, match="width must be a multiple of 16"):
        sched.submit(Request("c", "tiny-flux", width=40, height=48))


def test_presets_without_cost_constants_get_derived_ones():
    # A preset added without built-in constants is still scheduled: its family's, scaled.
    from gfdit import cost

    base = get_preset("flux-dev")
    big = dataclasses.replace(
        base, name="flux-wide", transformer_config={**base.transformer_config, "num_layers": 38}
    )
    p = cost.derive_profile(big)
    ref = get_profile("flux-dev")
    assert p.num_layers == ref.num_layers + 19 and p.step_linear_s > ref.step_linear_s


def test_one_status_vocabulary_and_one_chunk_size():
    from gfdit.serve import build_parser
    from gfdit.server import state

    assert set(state.kTerminal) == {Status.COMPLETED, Status.FAILED, Status.CANCELLED}
    assert set(Status.ALL) == {"queued", "in_progress", "completed", "failed", "cancelled"}
    args = build_parser().parse_args(["--model", "tiny-flux", "--port", "1"])
    assert args.chunk_steps == kDefaultChunkSteps == Scheduler(1, _Idle()).chunk_steps


class _Idle:
    name = "idle"

    def schedule(self, view):
        return []
