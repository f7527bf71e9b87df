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
