"""The one module that imports ``numba.cuda``; it decides the device mode first.

Numba chooses between the real CUDA target and its CPU simulator when ``numba.cuda`` is first
imported (from ``NUMBA_ENABLE_CUDASIM``), so the choice has to be made before that import.
``NBFLASH_DEVICE`` selects it:

- ``gpu``: the real target; an error if no CUDA driver and device are present.
- ``sim``: Numba's CUDA simulator (kernels run as Python threads; NumPy arrays).
- ``auto`` (default): ``gpu`` when a CUDA driver reports at least one device, else ``sim``.
- ``compile``: the real target without a GPU. Kernels can be compiled to PTX / cubin for
  inspection (``python -m nbflash compile``) but not run.

Every other nbflash module takes ``cuda`` (and the mode) from here, so moving to another Numba
CUDA package is a change to this file alone.
"""

import ctypes
import os
import sys
import threading

MODES = ("gpu", "sim", "auto", "compile")


class DeviceModeError(RuntimeError):
    """The requested device mode cannot be had on this machine."""


def _gpu_count():
    """Number of CUDA devices the driver reports, or 0 if there is no usable driver.

    Asks libcuda directly through ctypes so that ``numba.cuda`` is not imported yet.
    """
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        try:
            if lib.cuInit(0) != 0:
                return 0
            count = ctypes.c_int(0)
            if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
                return 0
            return count.value
        except AttributeError:
            return 0
    return 0


def _decide_mode():
    requested = os.environ.get("NBFLASH_DEVICE", "auto").strip().lower() or "auto"
    if requested not in MODES:
        raise DeviceModeError(
            f"NBFLASH_DEVICE={requested!r} is not a device mode; use one of {', '.join(MODES)}")
    if "numba.cuda" in sys.modules:
        # Someone imported numba.cuda before nbflash: its choice stands; refuse a contradiction.
        from numba.cuda import config as _cfg  # noqa: PLC0415
        actual = "sim" if _cfg.ENABLE_CUDASIM else "gpu"
        if requested in ("gpu", "sim") and requested != actual:
            raise DeviceModeError(
                f"NBFLASH_DEVICE={requested} but numba.cuda was already imported in "
                f"{'simulator' if actual == 'sim' else 'GPU'} mode; set NBFLASH_DEVICE before "
                "anything imports numba.cuda")
        if requested == "compile":
            return "compile" if actual == "gpu" else "sim"
        if actual == "gpu" and requested == "auto" and _gpu_count() == 0:
            return "compile"
        return actual
    if requested == "sim":
        return "sim"
    if requested == "compile":
        return "compile"
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0") and requested == "auto":
        return "sim"
    n = _gpu_count()
    if requested == "gpu" and n == 0:
        raise DeviceModeError(
            "NBFLASH_DEVICE=gpu, but no CUDA driver with a device was found on this machine; "
            "unset it (auto) or use NBFLASH_DEVICE=sim to run kernels in Numba's CUDA simulator")
    return "gpu" if n > 0 else "sim"


MODE = _decide_mode()
os.environ["NUMBA_ENABLE_CUDASIM"] = "1" if MODE == "sim" else "0"

from numba import cuda  # noqa: E402  (must follow the mode decision)

SIMULATOR = MODE == "sim"
ON_GPU = MODE == "gpu"


def _lock_simulator_shared_arrays():
    """Make the simulator's cuda.shared.array thread-safe.

    numba-cuda 0.30's simulator gives every thread of a block the same shared array by looking
    its call site up in a dict and inserting a new array when it is missing, without a lock.
    Two threads that get there together can each insert one; a thread then works on an array
    the others never see, and the kernel's result changes from run to run (seen: 1 launch in
    200 of an 8-array kernel). This replacement does the same look-up under a lock, keyed the
    same way (the caller's file and line).
    """
    import numpy as np  # noqa: PLC0415
    from numba.core import types  # noqa: PLC0415
    from numba.np import numpy_support  # noqa: PLC0415
    from numba.cuda.simulator import kernelapi  # noqa: PLC0415

    original = kernelapi.FakeCUDAShared.array
    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic shared memory: no look-up
            return original(self, shape, dtype, alignment)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)
        with lock:
            res = self._allocations.get(key)
            if res is None:
                if isinstance(dtype, types.Type):
                    dtype = numpy_support.as_dtype(dtype)
                res = self._allocations[key] = np.empty(shape, dtype)
        return res

    kernelapi.FakeCUDAShared.array = array


if SIMULATOR:
    _lock_simulator_shared_arrays()


def _simulated_mul_rn(x, y):
    import numpy as np  # noqa: PLC0415
    return np.float32(np.float32(x) * np.float32(y))


if SIMULATOR:
    mul_rn = cuda.jit(device=True)(_simulated_mul_rn)
    intrinsic = None
else:
    from numba.cuda import libdevice
    from numba.cuda.extending import intrinsic  # for nbflash.kernels.primitives

    #: float32 x * y rounded to nearest and never contracted into an FMA (libdevice __nv_fmul_rn),
    #: so that two kernels computing the same product get the same float32
    mul_rn = libdevice.fmul_rn

__all__ = ["cuda", "mul_rn", "intrinsic", "MODE", "SIMULATOR", "ON_GPU", "DeviceModeError"]
