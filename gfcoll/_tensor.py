"""The one layer that validates tensors and turns them into (pointer, size, dtype code, stream).

Accepted: torch tensors (CPU or CUDA) and, for CUDA, any object exposing ``__dlpack__`` or
``__cuda_array_interface__`` (CuPy). Such objects are viewed as torch tensors without a copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import GfcollUnsupportedError, GfcollValueError

# Codes of csrc/include/gfcoll/types.h (DType).
DTYPE_CODES = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.int8: 3,
    torch.uint8: 4,
    torch.int32: 5,
    torch.int64: 6,
}
FLOATING = (torch.float32, torch.float16, torch.bfloat16)
# Codes of RedOp.
OP_CODES = {"sum": 0, "avg": 1, "max": 2, "min": 3}


# The current stream of a device as an integer, without building a torch.cuda.Stream object (the
# public torch.cuda.current_stream(...).cuda_stream costs several microseconds per call).
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


@dataclass(slots=True)
class Buf:
    tensor: torch.Tensor  # the (possibly zero-copy) torch view, kept alive while the op runs
    ptr: int  # address of the first element
    numel: int
    nbytes: int
    dtype_code: int
    is_cuda: bool
    stream: int  # cudaStream_t the op is enqueued on (CUDA only)


def _cupy_stream(obj) -> int | None:
    module = type(obj).__module__ or ""
    if not module.startswith("cupy"):
        return None
    import cupy  # noqa: PLC0415 - only when the caller passed a CuPy array

    return cupy.cuda.get_current_stream().ptr


def as_buf(obj, name: str) -> Buf:
    """Validates `obj` and returns its raw view. Raises GfcollValueError naming `name`."""
    stream = None
    if isinstance(obj, torch.Tensor):
        t = obj
    elif hasattr(obj, "__cuda_array_interface__"):
        stream = _cupy_stream(obj)
        t = torch.as_tensor(obj, device="cuda")
    elif hasattr(obj, "__dlpack__"):
        t = torch.from_dlpack(obj)
    else:
        raise GfcollValueError(
            f"{name}: expected a torch tensor or an array with __dlpack__ or __cuda_array_interface__, "
            f"got {type(obj).__name__}"
        )
    # This runs on every call: each attribute is read once, and the cheap properties (is_cuda,
    # is_cpu, nbytes) are used instead of t.device, which builds a new object per access.
    dtype = t.dtype
    code = DTYPE_CODES.get(dtype)
    if code is None:
        names = ", ".join(str(d).removeprefix("torch.") for d in DTYPE_CODES)
        raise GfcollUnsupportedError(f"{name}: dtype {dtype} is not supported (supported: {names})")
    if not t.is_contiguous():
        raise GfcollValueError(
            f"{name}: tensor must be contiguous (shape {tuple(t.shape)}, strides {t.stride()})"
        )
    is_cuda = t.is_cuda
    if not is_cuda and not t.is_cpu:
        raise GfcollValueError(f"{name}: tensors on {t.device} are not supported (cpu or cuda only)")
    if is_cuda and stream is None:
        if _raw_stream is not None:
            stream = _raw_stream(t.get_device())
        else:
            stream = torch.cuda.current_stream(t.device).cuda_stream
    return Buf(t, t.data_ptr(), t.numel(), t.nbytes, code, is_cuda, stream or 0)


def check_same(a: Buf, b: Buf, what: str) -> None:
    if a.tensor.dtype != b.tensor.dtype:
        raise GfcollValueError(f"{what}: dtypes differ ({a.tensor.dtype} vs {b.tensor.dtype})")
    if a.is_cuda != b.is_cuda or (a.is_cuda and a.tensor.get_device() != b.tensor.get_device()):
        raise GfcollValueError(f"{what}: devices differ ({a.tensor.device} vs {b.tensor.device})")


def op_code(op: str, dtype: torch.dtype, what: str) -> int:
    if op not in OP_CODES:
        raise GfcollValueError(f"{what}: unknown op {op!r} (expected one of {', '.join(OP_CODES)})")
    if op == "avg" and dtype not in FLOATING:
        raise GfcollUnsupportedError(f"{what}: op 'avg' is not supported for integer dtype {dtype}")
    return OP_CODES[op]
