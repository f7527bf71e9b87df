"""One-process checks of the security pieces: the control-plane message codec (round trips,
malformed input rejected), the launch secret and liveness proofs, internal bind addresses, the
HTTP API-key middleware and the request-cost bound."""

from __future__ import annotations

import os
import pickle
import stat

import httpx
import msgspec
import numpy as np
import pytest

from gfdit.request import Request
from gfdit.runtime import auth
from gfdit.runtime import messages as msg
from gfdit.tasks import TaskKind


def _task(**kw) -> msg.Task:
    fields = dict(
        task_id=7, request=Request("r1", "tiny-flux", "a cat", width=64, height=48, seed=3), kind=TaskKind.DENOISE,
        start=2, end=4, ranks=(1, 0), dim_size=12, token_dim=64,
        transfers=((0, 1, 0, 6),), local=((1, 1, 6, 12),), cond_sends=((1, 0),),
        cond_meta=(msg.TensorMeta("prompt_embeds", (1, 8, 32), "bfloat16"),),
    )  # fmt: skip
    fields.update(kw)
    return msg.Task(**fields)


# -- codec ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "command",
    [_task(), _task(kind=TaskKind.DECODE, keep_latents=True),
     msg.Release(request_id="r1"), msg.Exclude(ranks=(2, 3)), msg.Shutdown()],
)  # fmt: skip
def test_commands_round_trip(command):
    back = msg.decode_command(msg.encode(command))
    assert back == command and type(back) is type(command)


def test_events_round_trip_with_array_payload():
    pixels = np.random.default_rng(0).integers(0, 256, (1, 5, 7, 3), dtype=np.uint8)
    latents = np.random.default_rng(1).standard_normal((1, 12, 64)).astype(np.float32)
    for ev in (
        msg.Ready(rank=1, pid=1234),
        msg.Done(
            rank=0,
            task_id=3,
            bytes_moved=10,
            reshard_s=0.5,
            compute_s=1.0,
            cond_meta=(msg.TensorMeta("a", (2,), "float32"),),
        ),  # fmt: skip
        msg.Done(
            rank=1, task_id=4, result=msg.Array.from_numpy(pixels), latents=msg.Array.from_numpy(latents)
        ),
        msg.Failed(rank=1, task_id=5, reason="rank 1: RuntimeError: boom", trace="..."),
        msg.Failed(rank=2, task_id=6, reason="rank 2: GfcollPeerDiedError: rank 3 died", peer=True),
    ):
        back = msg.decode_event(msg.encode(ev))
        assert back == ev
    back = msg.decode_event(msg.encode(msg.Done(rank=1, task_id=4, result=msg.Array.from_numpy(pixels))))
    out = back.result.to_numpy()
    assert out.dtype == np.uint8 and np.array_equal(out, pixels)
    out[0, 0, 0, 0] ^= 1  # a writable copy


class _Evil:
    def __reduce__(self):
        return (os.system, ("true",))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        os.urandom(1000),
        pickle.dumps({"op": "ready", "rank": 0}),
        pickle.dumps(_Evil()),
        msgspec.msgpack.encode({"op": "ready"}),  # missing field
        msgspec.msgpack.encode({"op": "ready", "rank": -1}),  # out of range
        msgspec.msgpack.encode({"op": "ready", "rank": "0"}),  # wrong type
        msgspec.msgpack.encode({"op": "ready", "rank": 0, "extra": 1}),  # unknown field
        msgspec.msgpack.encode({"op": "exec", "code": "import os"}),  # unknown kind
        msgspec.msgpack.encode({"op": "done", "rank": 0, "task_id": 1,
                                "result": {"data": b"12", "dtype": "uint8", "shape": [3]}}),  # size mismatch
        msgspec.msgpack.encode({"op": "done", "rank": 0, "task_id": 1,
                                "result": {"data": b"1234", "dtype": "object", "shape": [4]}}),  # bad dtype
        msg.encode(msg.Shutdown()),  # a command is not an event
        msg.encode(msg.Ready(rank=0))[:-1],  # truncated
        msg.encode(msg.Ready(rank=0)) + b"\x00",  # trailing bytes
    ],
)  # fmt: skip
def test_malformed_events_rejected(data):
    with pytest.raises(msg.MessageError):
        msg.decode_event(data)


def test_malformed_commands_rejected():
    good = msgspec.msgpack.decode(msg.encode(_task()))
    for change in (
        {"kind": "EXEC"},
        {"ranks": []},
        {"request": {**good["request"], "width": 0}},  # Request's own validation
        {"request": {**good["request"], "request_id": ""}},
        {"cond_meta": [["x", [1], "object"]]},
        {"transfers": [[0, 1, 2]]},
    ):
        with pytest.raises(msg.MessageError):
            msg.decode_command(msgspec.msgpack.encode({**good, **change}))
    with pytest.raises(msg.MessageError):
        msg.decode_command(msg.encode(msg.Ready(rank=0)))  # an event is not a command


def test_oversized_message_rejected_before_decoding(monkeypatch):
    monkeypatch.setattr(msg, "kMaxMessageBytes", 64)
    with pytest.raises(msg.MessageError, match="more than the 64"):
        msg.decode_event(msg.encode(msg.Failed(rank=0, task_id=0, reason="x" * 100)))


# -- secrets, proofs, addresses ------------------------------------------------------------------
def test_secret_from_env_and_private_file(tmp_path):
    assert auth.load_secret({}) is None
    assert auth.load_secret({"GFDIT_SECRET": "ab" * 16}) == b"ab" * 16
    with pytest.raises(auth.SecretError, match="at least 16"):
        auth.load_secret({"GFDIT_SECRET": "short"})
    path = tmp_path / "secret"
    path.write_text("cd" * 32 + "\n")
    os.chmod(path, 0o600)
    assert auth.load_secret({"GFDIT_SECRET_FILE": str(path)}) == b"cd" * 32
    os.chmod(path, 0o644)
    with pytest.raises(auth.SecretError, match="chmod 600"):
        auth.load_secret({"GFDIT_SECRET_FILE": str(path)})
    with pytest.raises(auth.SecretError, match="cannot open"):
        auth.load_secret({"GFDIT_SECRET_FILE": str(tmp_path / "missing")})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_liveness_proof_needs_the_secret_and_the_nonce():
    keys, other = auth.derive_keys(b"s" * 32), auth.derive_keys(b"t" * 32)
    nonce = os.urandom(auth.kLivenessNonceBytes)
    proof = auth.liveness_proof(keys.liveness, nonce, 1)
    assert auth.check_liveness_proof(keys.liveness, nonce, proof) == 1
    assert auth.check_liveness_proof(keys.liveness, os.urandom(32), proof) is None  # replayed
    assert (
        auth.check_liveness_proof(keys.liveness, nonce, auth.liveness_proof(other.liveness, nonce, 1)) is None
    )
    forged = (2).to_bytes(8, "big") + proof[8:]  # another rank with rank 1's MAC
    assert auth.check_liveness_proof(keys.liveness, nonce, forged) is None
    assert auth.check_liveness_proof(keys.liveness, nonce, (1).to_bytes(8, "big")) is None
    assert keys.server_public != other.server_public and keys.client_public != keys.server_public
    assert "s" * 8 not in repr(keys)


def test_internal_bind_address():
    assert auth.control_bind_host(True, None, "10.1.2.3") == "127.0.0.1"
    assert auth.control_bind_host(False, None, "127.0.0.1") == "127.0.0.1"  # MASTER_ADDR's interface
    assert auth.control_bind_host(False, "0.0.0.0", None) == "0.0.0.0"  # only when asked
    with pytest.raises(ValueError, match="--control-host"):
        auth.control_bind_host(False, None, "192.0.2.1")  # TEST-NET: not this machine's
    assert auth.control_connect_host(True, None, "10.1.2.3") == "127.0.0.1"
    assert auth.control_connect_host(False, None, "10.1.2.3") == "10.1.2.3"
    assert auth.control_connect_host(False, "0.0.0.0", "10.1.2.3") == "10.1.2.3"


# -- HTTP ----------------------------------------------------------------------------------------
def _app(protect_metrics: bool):
    from fastapi import FastAPI

    from gfdit.server.auth import ApiKeyAuth

    app = FastAPI()
    errors = []

    @app.get("/v1/models")
    async def models():
        return {"ok": True}

    @app.get("/health")
    async def health():
        return {"ok": True}

    @app.get("/metrics")
    async def metrics():
        return {"ok": True}

    app.add_middleware(
        ApiKeyAuth, api_key="key-12345", protect_metrics=protect_metrics, on_error=errors.append
    )
    return app, errors


@pytest.mark.parametrize("protect_metrics", [False, True])
def test_api_key_middleware(protect_metrics):
    import asyncio

    app, errors = _app(protect_metrics)

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            out = {}
            for name, headers in {
                "none": {},
                "wrong": {"Authorization": "Bearer key-12346"},
                "prefix": {"Authorization": "Bearer key-1234"},
                "scheme": {"Authorization": "Token key-12345"},
                "right": {"Authorization": "Bearer key-12345"},
                "lower": {"authorization": "bearer key-12345"},
            }.items():
                out[name] = {
                    p: (await c.get(p, headers=headers)) for p in ("/v1/models", "/health", "/metrics")
                }
            return out

    out = asyncio.run(run())
    for name in ("none", "wrong", "prefix", "scheme"):
        r = out[name]["/v1/models"]
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (name, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error" and "key-12345" not in r.text
        assert out[name]["/health"].status_code == 200
        assert out[name]["/metrics"].status_code == (401 if protect_metrics else 200)
    for name in ("right", "lower"):
        assert all(r.status_code == 200 for r in out[name].values()), name
    assert errors and set(errors) == {401}


def test_request_cost():
    from gfdit.models.presets import PRESETS
    from gfdit.server.state import default_max_request_cost, kDefaultMaxRequestCost, request_cost

    reqs = [Request(f"r{i}", "tiny-flux", width=256, height=128, num_inference_steps=10) for i in range(3)]
    assert request_cost(reqs) == pytest.approx(3 * 256 * 128 * 10 / 1e6)
    video = Request("v", "tiny-wan", width=64, height=48, num_frames=9, num_inference_steps=3)
    assert request_cost([video]) == pytest.approx(64 * 48 * 9 * 3 / 1e6)
    for name, preset in PRESETS.items():
        assert default_max_request_cost(preset) == kDefaultMaxRequestCost[name] > 0


# -- the launcher ----------------------------------------------------------------------------------
def test_gfdit_serve_moves_the_key_off_the_command_line_and_makes_a_secret(monkeypatch):
    from gfdit import cli

    rest, key = cli._without_api_key(
        ["--model", "tiny-flux", "--api-key", "k1", "--port", "1", "--api-key=k2"]
    )
    assert rest == ["--model", "tiny-flux", "--port", "1"] and key == "k2"
    env = cli.launch_env({})
    assert auth.load_secret(env) is not None and len(env["GFDIT_SECRET"]) == 64
    assert cli.launch_env({})["GFDIT_SECRET"] != env["GFDIT_SECRET"]  # per launch
    assert cli.launch_env({"GFDIT_SECRET_FILE": "/x"}).get("GFDIT_SECRET") is None  # the caller's
    monkeypatch.setattr(
        "sys.argv", ["gfdit", "bench", "run", "--api-key", "k3", "--url", "u", "--api-key=k4"]
    )
    redacted = cli._redacted_command()
    assert "k3" not in redacted and "k4" not in redacted and "REDACTED" in redacted


def test_local_rendezvous_store_listens_on_loopback_only():
    import psutil
    from torch.distributed.elastic.rendezvous import RendezvousParameters

    from gfdit.rendezvous import create_handler

    handler = create_handler(RendezvousParameters("gfdit-local", "127.0.0.1:0", "run-1", 1, 1))
    info = handler.next_rendezvous()
    port = info.bootstrap_store_info.master_port
    info.store.set("k", "v")
    mine = [c for c in psutil.Process().net_connections("inet") if c.status == psutil.CONN_LISTEN]
    assert [c.laddr.ip for c in mine if c.laddr.port == port] == ["127.0.0.1"]
    with pytest.raises(ValueError, match="one node"):
        create_handler(RendezvousParameters("gfdit-local", "127.0.0.1:0", "run-2", 1, 2))
