"""Access to the compiled core (gfcoll/_gfcoll*.so)."""

from __future__ import annotations

import functools

from .errors import GfcollError


@functools.cache
def lib():
    try:
        from . import _gfcoll  # noqa: PLC0415
    except ImportError as e:
        raise GfcollError(
            f"the gfcoll native module is not built ({e}); install the package with `pip install .`"
        ) from e
    return _gfcoll


def build_info() -> dict:
    """Which transports were built, and the CUDA and NCCL versions the build saw."""
    info = dict(lib().build_info())
    info["nccl_runtime"] = None
    if "nccl" in info["transports"]:
        try:
            from ._bootstrap import load_nccl  # noqa: PLC0415

            t = load_nccl()
            v = t.version()
            info["nccl_runtime"] = f"{v // 10000}.{v // 100 % 100}.{v % 100}"
            info["nccl_library"] = t.library_path()
        except GfcollError as e:
            info["nccl_runtime_error"] = str(e)
    return info
