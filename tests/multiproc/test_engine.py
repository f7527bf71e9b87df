"""The elastic runtime end to end on 4 CPU ranks (host transport, tiny presets): a request whose
group changes at every chunk (1 -> 2 -> 4 -> 1, shuffled rank orders) equals the same request on
one rank; every policy completes a mixed batch; bad requests fail at submit; a failing request
does not take the engine down."""

import numpy as np
import pytest

from tests.launch import run_ranks


class ScriptedPolicy:
    """Test policy: every task of a request runs on the ranks its script names (by task kind, and
    by first step for DENOISE), one step per chunk, when those ranks are free."""

    name = "scripted"

    def __init__(self, scripts):
        self.scripts = scripts  # request id -> {"ENCODE": ranks, 0: ranks, 1: ..., "DECODE": ...}

    def spec(self):
        return "scripted"

    def schedule(self, view):
        from gfdit.policy import Assignment
        from gfdit.tasks import TaskKind

        free, out = set(view.free_ranks), []
        for rt in view.runnable:
            script = self.scripts[rt.request_id]
            key = rt.task.start if rt.kind is TaskKind.DENOISE else rt.kind.name
            ranks = tuple(script[key])
            if set(ranks) <= free:
                free -= set(ranks)
                steps = 1 if rt.kind is TaskKind.DENOISE else None
                out.append(Assignment(rt.task, ranks, steps))
        return out


ELASTIC = {"ENCODE": [1], 0: [2], 1: [3, 1], 2: [2, 0, 3, 1], 3: [0], "DECODE": [0]}
# DECODE on two ranks: rank 2 gathers rank 0's slice and decodes.
ELASTIC_B = {"ENCODE": [3], 0: [1, 2], 1: [0], 2: [3, 2, 1, 0], 3: [2, 0], "DECODE": [2, 0]}
SINGLE = {"ENCODE": [0], 0: [0], 1: [0], 2: [0], 3: [0], "DECODE": [0]}


def _elastic_equals_single(world, model, kwargs):

    scripts = {"single": SINGLE, "elastic": ELASTIC, "elastic-b": ELASTIC_B}
    return _with_engine(
        world, model, ScriptedPolicy(scripts), lambda e: _compare(e, model, kwargs, scripts),
        chunk_steps=1, keep_latents=True,
    )  # fmt: skip


def _compare(engine, model, kwargs, scripts):
    import numpy as np

    from gfdit.request import Request

    results = {}
    for rid in scripts:
        req = Request(rid, model, "a red fox in the snow", num_inference_steps=4, seed=7, **kwargs)
        results[rid] = engine.submit(req).result(timeout=240)
    ref = results["single"]
    out = {"shape": ref.images.shape}
    for rid in ("elastic", "elastic-b"):
        r = results[rid]
        out[rid] = (
            float(np.abs(r.latents - ref.latents).max()),
            int(np.abs(r.images.astype(int) - ref.images.astype(int)).max()),
            r.num_reshards,
            r.bytes_moved,
            [g for _, g in r.groups],
        )
    return out


@pytest.mark.parametrize(
    "model,kwargs",
    [("tiny-flux", {"width": 64, "height": 64}), ("tiny-wan", {"width": 64, "height": 64, "num_frames": 5})],
)
def test_elastic_sp_matches_single_rank(model, kwargs):
    out = run_ranks(_elastic_equals_single, 4, model, kwargs)[0]
    for rid in ("elastic", "elastic-b"):
        latent_diff, pixel_diff, reshards, moved, groups = out[rid]
        assert latent_diff <= 1e-5, (rid, latent_diff)
        assert pixel_diff <= 1, (rid, pixel_diff)
        assert reshards >= 4 and moved > 0, (rid, reshards, moved)
    assert out["elastic"][4][1:5] == [(2,), (3, 1), (2, 0, 3, 1), (0,)]
    assert out["elastic-b"][4][-1] == (2, 0)  # the gathering DECODE
    if model == "tiny-wan":
        assert out["shape"][1] == 5  # frames


def _with_engine(world, model, policy, body, **kwargs):
    """Runs body(engine) on rank 0 between a collective Engine() and close() on every rank."""
    from gfdit.runtime import Engine

    engine = Engine(world, model, policy, **kwargs)
    try:
        return body(engine) if world.rank == 0 else None
    finally:
        engine.close()


def _run_batch(engine):
    import random

    from gfdit.request import Request

    rng = random.Random(3)
    handles = []
    for i in range(20):
        side = rng.choice([32, 64, 96])
        steps = rng.choice([2, 3, 5])
        deadline = engine.now() + rng.choice([2.0, 5.0, 30.0])
        req = Request(
            f"q{i}", "tiny-flux", f"prompt {i}", width=side, height=side,
            num_inference_steps=steps, seed=i, deadline_s=deadline,
        )  # fmt: skip
        handles.append(engine.submit(req))
    results = [h.result(timeout=300) for h in handles]
    return {
        "groups": {
            h.request_id: [list(g) for _, g in r.groups] for h, r in zip(handles, results, strict=True)
        },
        "steps": {r.request_id: r.num_inference_steps for r in (h.request for h in handles)},
        "shapes": sorted({r.images.shape for r in results}),
        "degrees": sorted({len(g) for r in results for _, g in r.groups}),
        "denoise_degrees": sorted({len(g) for r in results for t, g in r.groups if ":denoise" in t}),
        "states": [h.progress().state for h in handles],
        "kept": len(engine.scheduler.records),
        "active": len(engine.scheduler.active),
    }


def _mixed_batch(world, policy, task_log):
    return _with_engine(
        world, "tiny-flux", policy, _run_batch, chunk_steps=2, keep_finished=5, task_log=task_log
    )


@pytest.mark.parametrize(
    "policy", ["static:sp=2", "fcfs-elastic:max_sp=4", "edf-best-fit:max_sp=4", "srtf:max_sp=4"]
)
def test_every_policy_completes_a_mixed_batch(policy, tmp_path):
    import json

    log = str(tmp_path / "tasks.jsonl")
    out = run_ranks(_mixed_batch, 4, policy, log, timeout=400)[0]
    assert out["states"] == ["completed"] * 20
    assert (1, 32, 32, 3) in out["shapes"] and (1, 96, 96, 3) in out["shapes"]
    assert out["kept"] == 5 and out["active"] == 0  # keep_finished=5 of the 20
    if policy.startswith("static"):
        assert out["denoise_degrees"] == [2], out  # the fixed SP degree, for every chunk
    else:
        assert out["denoise_degrees"] and set(out["denoise_degrees"]) <= {1, 2, 4}, out  # max_sp=4
    assert set(out["degrees"]) <= {1, 2, 4}, out
    # The task log (Note [Task log]): every finished task once, in order, on the group it ran on.
    rows = [json.loads(line) for line in open(log)]
    assert {r["request_id"] for r in rows} == set(out["groups"])
    for rid, groups in out["groups"].items():
        mine = sorted((r for r in rows if r["request_id"] == rid), key=lambda r: r["dispatch_s"])
        assert [r["ranks"] for r in mine] == groups, rid
        assert mine[0]["kind"] == "ENCODE" and mine[-1]["kind"] == "DECODE", rid
        denoise = [(r["start"], r["end"]) for r in mine if r["kind"] == "DENOISE"]
        assert denoise[0][0] == 0 and denoise[-1][1] == out["steps"][rid], (rid, denoise)
        assert all(a[1] == b[0] for a, b in zip(denoise, denoise[1:], strict=False)), (rid, denoise)
        for r in mine:
            assert (
                r["arrival_s"] <= r["dispatch_s"] <= r["end_s"]
                and 0 <= r["reshard_s"] <= r["end_s"] - r["dispatch_s"]
            )
        assert all(a["end_s"] <= b["dispatch_s"] for a, b in zip(mine, mine[1:], strict=False)), rid


def _bad_requests_and_failures(world):
    from gfdit.models import load_model
    from tests.fault_model import FaultyModel

    model = FaultyModel(load_model("tiny-flux", device=world.device))
    # Unbatched: this test is about one failing request; batched failures are in test_engine_batch.py.
    return _with_engine(world, "tiny-flux", "fcfs-elastic:max_sp=1,max_batch=1", _bad_body, model_obj=model)


def _bad_body(engine):
    from gfdit.request import Request

    errors = []
    bad = [
        dict(width=63, height=64),  # not a multiple of the patch size
        dict(width=64, height=64, num_inference_steps=0),
        dict(width=64, height=64, num_frames=5),  # frames for an image model
        dict(width=100000, height=64),
    ]
    for i, kw in enumerate(bad):
        kw.setdefault("num_inference_steps", 2)
        try:
            engine.submit(Request(f"bad{i}", "tiny-flux", "x", **kw))
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))
    try:
        engine.submit(Request("other", "tiny-wan", "x", width=64, height=64, num_inference_steps=2))
        errors.append(None)
    except ValueError as e:
        errors.append(str(e))
    faulty = engine.submit(Request("f", "tiny-flux", "FAIL now", width=64, height=64, num_inference_steps=2))
    good = [
        engine.submit(Request(f"g{i}", "tiny-flux", "fine", width=64, height=64, num_inference_steps=2))
        for i in range(3)
    ]
    try:
        faulty.result(timeout=120)
        failure = None
    except RuntimeError as e:
        failure = str(e)
    states = [h.result(timeout=120) is not None for h in good]
    # Cancel a long request while it waits or runs: it ends cancelled, ranks freed.
    long = engine.submit(Request("long", "tiny-flux", "slow", width=96, height=96, num_inference_steps=40))
    long.cancel()
    try:
        long.result(timeout=120)
        cancelled = None
    except RuntimeError as e:
        cancelled = str(e)
    after = engine.submit(Request("after", "tiny-flux", "ok", width=64, height=64, num_inference_steps=2))
    return (errors, failure, states, cancelled, after.result(timeout=120).images.shape)


def test_bad_requests_rejected_and_failures_contained():
    errors, failure, states, cancelled, shape = run_ranks(_bad_requests_and_failures, 2)[0]
    assert all(e is not None for e in errors), errors
    assert "width" in errors[0] and "steps" in errors[1] and "frames" in errors[2] and "width" in errors[3]
    assert "tiny-wan" in errors[4]
    assert failure is not None and "injected fault" in failure
    assert states == [True, True, True]
    assert cancelled is not None and "cancelled" in cancelled
    assert shape == (1, 64, 64, 3)


def _bad_policy(world):
    from gfdit.policy import PolicySpecError
    from gfdit.runtime import Engine

    try:
        Engine(world, "tiny-flux", "no-such-policy:x=1")
    except PolicySpecError as e:
        return str(e)
    return None


def test_bad_policy_fails_on_every_rank_without_hanging():
    messages = run_ranks(_bad_policy, 2, timeout=120)
    assert all(m is not None and "no-such-policy" in m for m in messages), messages


kHangS = 20.0  # how long the injected hang lasts (bounded, so the process can still exit)
kHangGfcollTimeoutS = 3.0  # GFCOLL_TIMEOUT_S of the hang test: the watchdog's grace is this + 5 s


def _hung_worker(world):
    import time

    from gfdit.models import load_model
    from gfdit.request import Request
    from tests.fault_model import ModelWrapper

    class Hanging(ModelWrapper):
        """The real model, except that rank 1 denoising a prompt containing HANG blocks for kHangS."""

        def before(self, requests) -> None:
            if world.rank == 1 and any("HANG" in r.prompt for r in requests):
                time.sleep(kHangS)

    def body(engine):
        ok = engine.submit(Request("ok", "tiny-flux", "fine", width=64, height=64, num_inference_steps=2))
        ok_shape = ok.result(timeout=120).images.shape  # normal tasks are not mistaken for hung ones
        health_before = engine.health().status
        t0 = time.monotonic()
        # static:sp=1 puts one on rank 0 and one on rank 1, where it hangs; same seed, same image.
        handles = [
            engine.submit(
                Request(f"h{i}", "tiny-flux", "HANG", width=64, height=64, num_inference_steps=2, seed=5)
            )
            for i in range(2)
        ]
        images = [h.result(timeout=120).images for h in handles]
        reruns = [h.result(timeout=0).num_reruns for h in handles]
        detected_s = time.monotonic() - t0
        health = engine.health()
        late = engine.submit(Request("late", "tiny-flux", "x", width=64, height=64, num_inference_steps=2))
        late_groups = late.result(timeout=120).groups
        return ok_shape, health_before, images, reruns, detected_s, health, late_groups, engine.num_reruns

    model = Hanging(load_model("tiny-flux", device=world.device))
    return _with_engine(
        world,
        "tiny-flux",
        "static:sp=1",
        body,
        model_obj=model,
        task_timeout_factor=1.0,
        task_timeout_floor_s=2.0,
    )


def test_hung_rank_is_dropped_and_its_request_reruns_on_the_others():
    out = run_ranks(_hung_worker, 2, timeout=240, env={"GFCOLL_TIMEOUT_S": str(kHangGfcollTimeoutS)})[0]
    ok_shape, health_before, images, reruns, detected_s, health, late_groups, total_reruns = out
    assert ok_shape == (1, 64, 64, 3) and health_before == "ok"
    assert sorted(reruns) == [0, 1] and total_reruns == 1, reruns
    assert np.array_equal(images[0], images[1])  # the re-run from the seed gives the same image
    assert detected_s < kHangS, detected_s  # found by the watchdog, not by the task ending
    assert health.status == "degraded" and "rank 1 hung" in health.reason, health
    assert [(i.rank, i.state) for i in health.ranks] == [(0, "up"), (1, "hung")], health.ranks
    assert all(ranks == (0,) for _, ranks in late_groups), late_groups  # served on the survivor


def _bad_task_timeout(world):
    from gfdit.runtime import Engine

    try:
        Engine(world, "tiny-flux", "static", task_timeout_factor=0.0)
    except ValueError as e:
        return str(e)
    return None


def test_bad_task_timeout_is_refused():
    messages = run_ranks(_bad_task_timeout, 1, timeout=120)
    assert messages[0] is not None and "task timeout" in messages[0], messages


# -- the control thread: woken by a submission, and never dead silently --------------------------------


def _wake_and_fault(world):
    import statistics

    from fastapi.testclient import TestClient

    from gfdit.request import Request
    from gfdit.runtime import channel
    from gfdit.server import ServerConfig, create_app

    def body(engine):
        # Idle, the control loop sleeps in its poll for up to kMaxPollS: a submission must wake it.
        queue_s = []
        for i in range(5):
            h = engine.submit(Request(f"w{i}", "tiny-flux", "x", width=32, height=32, num_inference_steps=1))
            queue_s.append(h.result(timeout=60).queue_s)
        client = TestClient(create_app(engine, ServerConfig(policy="fcfs-elastic")))
        before = client.get("/health")

        def broken(now):  # an injected bug in the control thread
            raise KeyError("injected")

        engine.scheduler.schedule = broken
        h = engine.submit(Request("f", "tiny-flux", "x", width=32, height=32, num_inference_steps=1))
        try:
            h.result(timeout=60)
            failure = None
        except RuntimeError as e:
            failure = str(e)
        after = client.get("/health")
        try:
            engine.submit(Request("g", "tiny-flux", "x", width=32, height=32, num_inference_steps=1))
            refused = None
        except RuntimeError as e:
            refused = str(e)
        return (
            statistics.median(queue_s), channel.kMaxPollS, before.status_code, before.json(),
            failure, after.status_code, after.json(), refused,
        )  # fmt: skip

    return _with_engine(world, "tiny-flux", "fcfs-elastic", body)


def test_submission_wakes_the_loop_and_a_control_thread_fault_fails_requests_and_health():
    out = run_ranks(_wake_and_fault, 2, timeout=180)[0]
    median_queue_s, max_poll_s, before_code, before, failure, after_code, after, refused = out
    assert median_queue_s < max_poll_s / 5, (median_queue_s, max_poll_s)  # not waiting for a poll tick
    assert before_code == 200 and before["status"] == "ok", before
    assert [r["state"] for r in before["ranks"]] == ["up", "up"] and all(
        r["pid"] > 0 for r in before["ranks"]
    )
    assert failure is not None and "engine error: KeyError" in failure and "injected" in failure, failure
    assert after_code == 503 and after["status"] == "unavailable" and "injected" in after["reason"], after
    assert refused is not None and "injected" in refused, refused
