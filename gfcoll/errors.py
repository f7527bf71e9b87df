"""Exceptions raised by gfcoll. The native core raises these by name (csrc/bindings/module.cc)."""


class GfcollError(RuntimeError):
    """Base class of every gfcoll error."""


class GfcollValueError(GfcollError, ValueError):
    """Bad arguments: ranks, sizes, dtypes, splits, tensors (non-contiguous, wrong device)."""


class GfcollUnsupportedError(GfcollValueError):
    """A valid request that this build or transport cannot serve (e.g. avg on integers)."""


class GfcollMismatchError(GfcollError):
    """Members of a group disagree about an operation (sizes, dtype). Raised by the ranks that
    detect it; the others may time out."""


class GfcollTimeoutError(GfcollError, TimeoutError):
    """A peer did not take part within the timeout (GFCOLL_TIMEOUT_S)."""


class GfcollPeerDiedError(GfcollTimeoutError):
    """A peer process died during an operation (detected before the timeout expires)."""


class GfcollClosedError(GfcollError):
    """The world was closed."""


class GfcollSystemError(GfcollError, OSError):
    """An operating-system call failed (shared memory, mmap)."""


class GfcollCudaError(GfcollError):
    """A CUDA runtime call failed."""


class GfcollNcclError(GfcollError):
    """An NCCL call failed."""
