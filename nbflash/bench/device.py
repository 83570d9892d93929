"""What the harness needs of the device: the array module, host copies, waiting for the GPU,
giving memory back, and what a failure on the device means for a record."""

import gc
import math
import sys

import numpy as np

from .._cuda import MODE
from ..errors import InputError

#: statuses a resumed run keeps; "error" points are measured again
FINAL = ("ok", "oom", "unsupported", "skipped")


class Unsupported(Exception):
    """A point an impl cannot run at all (torch missing, a dtype it does not take)."""


def xp():
    """CuPy on the GPU, NumPy in the simulator."""
    if MODE == "gpu":
        import cupy  # noqa: PLC0415
        return cupy
    return np


def to_host(x):
    """A NumPy copy of a NumPy or CuPy array."""
    if type(x).__module__.split(".")[0] == "cupy":
        return x.get()
    return np.asarray(x)


def sync():
    """Wait for all work queued on the GPU: CuPy's current stream and, if used, torch's."""
    if MODE != "gpu":
        return
    import cupy  # noqa: PLC0415
    cupy.cuda.get_current_stream().synchronize()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def free_memory(collect=False):
    """Give cached device memory back, so that one large point does not starve the next."""
    if collect:
        gc.collect()
    if MODE != "gpu":
        return
    import cupy  # noqa: PLC0415
    cupy.get_default_memory_pool().free_all_blocks()
    cupy.get_default_pinned_memory_pool().free_all_blocks()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def is_oom(exc):
    """Did `exc` come from running out of device (or host) memory?"""
    if isinstance(exc, MemoryError):  # CuPy's OutOfMemoryError is one
        return True
    cupy, torch = sys.modules.get("cupy"), sys.modules.get("torch")
    if cupy is not None and isinstance(exc, cupy.cuda.memory.OutOfMemoryError):
        return True
    if torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    # cuBLAS / cuRAND failing to allocate their workspace say so only in the message
    text = str(exc).lower()
    return any(m in text for m in ("out of memory", "out_of_memory", "cudaerrormemoryallocation"))


def failure(exc, where=""):
    """The record fields for a point that raised `exc`: status ("oom", "unsupported" for an
    InputError or Unsupported, else "error") and message."""
    if is_oom(exc):
        status = "oom"
    elif isinstance(exc, (InputError, Unsupported)):
        status = "unsupported"
    else:
        status = "error"
    return {"status": status, "error": f"{where}{type(exc).__name__}: {exc}"}


def json_number(x):
    """A float for JSON: non-finite values as the strings 'inf' / 'nan' (strict JSON has none)."""
    x = float(x)
    return x if math.isfinite(x) else str(x)
