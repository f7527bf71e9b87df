"""Every message between the engine (rank 0) and the workers, typed, and its wire format.

This module is the one place that defines what crosses the control plane. Messages are msgspec
Structs encoded as MessagePack, in two tagged unions: `Command` (engine -> worker) and `Event`
(worker -> engine); the tag (field "op") names the kind. Nothing on any socket is ever unpickled.
Rank 0's own worker gets the same Command objects and answers with the same Event objects, but
in process (gfdit.runtime.channel): they are never encoded there. The third union, `Control`,
is what the handle API posts to the engine's control thread (in process only, never encoded).

Note [Control-plane messages]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
- Decoding is validation: `decode_command` / `decode_event` check the kind, every field's type and
  the constraints below, and raise `MessageError` for anything else (bytes that are not MessagePack,
  an unknown kind or field, a wrong type, an oversized message). Callers drop such a message and
  log it with its source; a bad message never ends a loop and never changes state.
- Tensors never travel here: the latent and the text conditioning move over gfcoll. The
  one exception is a finished request's result on its way to the caller, carried as an `Array`:
  raw little-endian bytes with a dtype from a fixed list and a shape, checked against each other.
- The transport (ZeroMQ with CURVE, see gfdit.runtime.auth) authenticates the peer before a byte
  of a message is read; this module makes sure an authenticated peer's bytes are still only data.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import msgspec
import numpy as np

from gfdit.layout import even_slices
from gfdit.request import Request
from gfdit.tasks import TaskKind

__all__ = [
    "Array",
    "Batch",
    "Cancel",
    "Command",
    "Control",
    "Done",
    "Event",
    "Exclude",
    "Failed",
    "MessageError",
    "Ready",
    "Release",
    "Shutdown",
    "Stop",
    "StepDone",
    "Task",
    "TensorMeta",
    "Wake",
    "decode_command",
    "decode_event",
    "encode",
    "kMaxMessageBytes",
]

# The largest message either side accepts (and the ZeroMQ sockets' MAXMSGSIZE). A result carries
# the finished images or frames: a 1280x720, 81-frame video is 224 MB of uint8, so the bound is
# well above that; commands and the other events are a few KB.
kMaxMessageBytes = 1 << 30

NonNeg = Annotated[int, msgspec.Meta(ge=0)]
Rank = Annotated[int, msgspec.Meta(ge=0, lt=1 << 20)]
Dim = Annotated[int, msgspec.Meta(ge=0, lt=1 << 40)]
Shape = Annotated[tuple[Dim, ...], msgspec.Meta(max_length=8)]
# torch dtypes a tensor's metadata may name (without the "torch." prefix).
TensorDType = Literal["float32", "float16", "bfloat16", "float64", "int8", "uint8", "int32", "int64", "bool"]
# numpy dtypes an Array may carry.
ArrayDType = Literal["uint8", "float32"]
# A slice transfer of the latent: (source rank, destination rank, first token, one past the last).
Transfer = tuple[Rank, Rank, NonNeg, NonNeg]


class MessageError(ValueError):
    """A control message that does not decode or validate; it is dropped, never acted on."""


class _Message(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="op"):
    pass


class TensorMeta(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    """Name, shape and dtype of one tensor that travels over gfcoll (the receiver allocates it)."""

    name: Annotated[str, msgspec.Meta(max_length=256)]  # its key, e.g. in Held.cond
    shape: Shape  # its shape
    dtype: TensorDType  # its torch dtype, e.g. "bfloat16"


class Array(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A numpy array as data: C-order little-endian bytes, a dtype and a shape that must agree."""

    data: bytes  # the elements, C order, little-endian
    dtype: ArrayDType  # numpy dtype name
    shape: Shape  # dimensions; prod(shape) * itemsize == len(data)

    def __post_init__(self) -> None:
        expected = math.prod(self.shape) * np.dtype(self.dtype).itemsize
        if expected != len(self.data):
            raise ValueError(f"Array: {len(self.data)} bytes for shape {self.shape} of {self.dtype}")

    @classmethod
    def from_numpy(cls, a: np.ndarray) -> Array:
        a = np.ascontiguousarray(a, dtype=np.dtype(a.dtype).newbyteorder("<"))
        return cls(a.tobytes(), a.dtype.name, tuple(a.shape))

    def to_numpy(self) -> np.ndarray:
        """A writable copy (the message's bytes are immutable)."""
        return (
            np.frombuffer(self.data, dtype=np.dtype(self.dtype).newbyteorder("<")).reshape(self.shape).copy()
        )


# -- commands: engine (rank 0) -> worker ------------------------------------------------------------
class Task(_Message, tag="task"):
    """Run this rank's part of one trajectory task (Note [Reshard execution] in gfdit.runtime.worker)."""

    task_id: NonNeg  # the engine's id of this task; events about it carry it back
    request: Request  # the request the task belongs to (validated again on decoding)
    kind: TaskKind  # which stage of the request's chain (encoded as its value, e.g. "denoise")
    start: NonNeg  # DENOISE: first step of the chunk (other kinds: as the scheduler's Task says)
    end: NonNeg  # DENOISE: one past the last step of the chunk
    ranks: Annotated[tuple[Rank, ...], msgspec.Meta(min_length=1)]  # the task's group, in order
    dim_size: Dim  # tokens of the latent along its split dimension (dim 1 of [1, S, C])
    token_dim: Dim  # C: channels of one packed token
    latent_dtype: TensorDType = "float32"  # dtype of the latent state between tasks
    keep_latents: bool = False  # DECODE also returns the final latent
    transfers: tuple[Transfer, ...] = ()  # latent slices that move between ranks, in plan order
    local: tuple[Transfer, ...] = ()  # latent slices that stay on their rank but move in its buffer
    cond_sends: tuple[tuple[Rank, Rank], ...] = ()  # (holder, member) copies of the text conditioning
    cond_meta: tuple[TensorMeta, ...] = ()  # the conditioning tensors, in name order (with cond_sends)
    # DENOISE CFG-parallel (Note [CFG-parallel] in gfdit/models/base.py): ranks[:k] conditional,
    # ranks[k:] unconditional (k = len(ranks) / 2), both halves holding the even split over k
    cfg: bool = False

    def __post_init__(self) -> None:
        if self.cfg and (self.kind is not TaskKind.DENOISE or len(self.ranks) % 2):
            raise ValueError(
                f"Task: CFG-parallel needs a DENOISE chunk on an even group, got {self.kind.value} on {self.ranks}"
            )

    def latent_slice(self, rank: int) -> tuple[int, int]:
        """The tokens (lo, hi) that member `rank` holds during and after this task: the even split
        over the group, or over each half when CFG-parallel."""
        parts = len(self.ranks) // 2 if self.cfg else len(self.ranks)
        return even_slices(self.dim_size, parts)[self.ranks.index(rank) % parts]


class Batch(_Message, tag="batch"):
    """Run this rank's part of one batched DENOISE chunk (Note [Batched chunks in the scheduler]):
    each member's reshard in member order, then one model.denoise_batch over them. Every member is
    a full Task (its own task_id, chunk and reshard plan) on the same ordered ranks; events come back
    per member task."""

    tasks: Annotated[tuple[Task, ...], msgspec.Meta(min_length=2, max_length=1024)]  # the members, in order

    def __post_init__(self) -> None:
        ranks = self.tasks[0].ranks
        ids = [t.request.request_id for t in self.tasks]
        if len(set(ids)) != len(ids):
            raise ValueError(f"Batch: a request appears twice: {ids}")
        for t in self.tasks:
            if t.kind is not TaskKind.DENOISE:
                raise ValueError(f"Batch: member {t.task_id} is {t.kind.value}, not denoise")
            if t.ranks != ranks:
                raise ValueError(f"Batch: member {t.task_id} runs on {t.ranks}, not {ranks}")


class Release(_Message, tag="release"):
    """Drop everything this rank holds for a request."""

    request_id: Annotated[str, msgspec.Meta(max_length=1024)]  # the request's id


class Exclude(_Message, tag="exclude"):
    """Ranks the engine lost: this rank's gfcoll world fails operations with them at once
    (Note [Excluded ranks] in gfcoll.world)."""

    ranks: tuple[Rank, ...]  # global ranks lost so far


class Shutdown(_Message, tag="shutdown"):
    """Leave the worker loop (the engine is closing)."""


Command = Task | Batch | Release | Exclude | Shutdown


# -- events: worker -> engine ------------------------------------------------------------------------
class Ready(_Message, tag="ready"):
    """The worker loop runs and its liveness connection is authenticated."""

    rank: Rank  # the sender's global rank
    pid: Annotated[int, msgspec.Meta(ge=0)] = 0  # the sender's process id (for /health)


class Done(_Message, tag="done"):
    """The sender finished its part of a task."""

    rank: Rank  # the sender's global rank
    task_id: NonNeg  # the task (Task.task_id)
    bytes_moved: NonNeg = 0  # bytes this rank received while resharding for the task
    reshard_s: Annotated[float, msgspec.Meta(ge=0.0)] = 0.0  # seconds spent moving state first
    compute_s: Annotated[float, msgspec.Meta(ge=0.0)] = 0.0  # seconds spent computing after that
    cond_meta: tuple[TensorMeta, ...] | None = None  # ENCODE: the conditioning it produced, by name
    result: Array | None = (
        None  # DECODE, its first member: images [N, H, W, 3] or frames [N, F, H, W, 3], uint8
    )
    latents: Array | None = None  # DECODE with keep_latents: the final latent [1, S, C], float32
    batch_size: Annotated[int, msgspec.Meta(ge=1)] = 1  # DENOISE: members of its batched chunk (msg.Batch)


class Failed(_Message, tag="failed"):
    """The sender's part of a task raised; the task and its request fail with the reason."""

    rank: Rank  # the sender's global rank
    task_id: NonNeg  # the task (Task.task_id)
    reason: str  # one line: the exception, with the rank
    trace: str = ""  # the traceback, for the log
    peer: bool = False  # a peer died, hung or was excluded (gfcoll timeout): re-runnable elsewhere


class StepDone(_Message, tag="step"):
    """A denoising step of a task finished on the sender's group (sent by its first member only,
    before its Done): what request progress follows between chunk boundaries."""

    rank: Rank  # the sender's global rank (the task group's first member)
    task_id: NonNeg  # the task (Task.task_id)
    step: NonNeg  # denoising steps of the request done so far (index of the finished step + 1)


Event = Ready | Done | Failed | StepDone


# -- control: the handle API -> the engine's control thread (in process, never encoded) ------------
class Wake(msgspec.Struct, frozen=True):
    """Something changed that the control thread must act on now (a submission): dispatch."""


class Cancel(msgspec.Struct, frozen=True):
    """A caller asked to cancel a request (RequestHandle.cancel)."""

    request_id: str  # the request's id


class Stop(msgspec.Struct, frozen=True):
    """The engine is closing: once nothing runs, fail what is left and shut the workers down."""


Control = Wake | Cancel | Stop


# -- codec ---------------------------------------------------------------------------------------
_encoder = msgspec.msgpack.Encoder()
_command_decoder = msgspec.msgpack.Decoder(Command)
_event_decoder = msgspec.msgpack.Decoder(Event)


def encode(msg: Command | Event) -> bytes:
    """The wire bytes of one message."""
    return _encoder.encode(msg)


def _decode(decoder: msgspec.msgpack.Decoder, data: bytes, what: str):
    if len(data) > kMaxMessageBytes:
        raise MessageError(f"{what}: {len(data)} bytes, more than the {kMaxMessageBytes} allowed")
    try:
        return decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise MessageError(f"{what}: {e}") from None
    except (ValueError, TypeError) as e:  # a field's own check (Request, Array) outside msgspec's
        raise MessageError(f"{what}: {type(e).__name__}: {e}") from None


def decode_command(data: bytes) -> Command:
    """A command from its bytes; MessageError if they are not exactly one valid command."""
    return _decode(_command_decoder, data, "command")


def decode_event(data: bytes) -> Event:
    """An event from its bytes; MessageError if they are not exactly one valid event."""
    return _decode(_event_decoder, data, "event")
