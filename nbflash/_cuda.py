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

import contextlib
import ctypes
import functools
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


# ---------------------------------------------------- global-memory traffic (simulator only)

class GlobalMemoryTally:
    """Bytes that simulated kernels move in global memory, while :func:`count_global_memory`
    is active: ``moved[(kernel, array)] = [read, write, atomic, merged]``, with `kernel` the
    kernel function's name and `array` the name of its parameter.

    What counts (the rule nbflash.iomodel documents and models):

    - a load or store of one element of a kernel's array argument counts the element's size;
      a store to a slice counts the slice's bytes;
    - a view (an array indexed by slices) moves nothing: its elements count when they are read
      or written (by indexing, iteration, or a NumPy ufunc taking the view);
    - an atomic operation counts its element's size once, as `atomic` (not as a read and a
      write);
    - loads of the same element by threads of one block between two barriers count once (a
      broadcast: the GPU serves the threads of a warp with one request, and the block's other
      warps from L1); the repeats go to `merged` instead of `read`;
    - shared and local arrays are not kernel arguments and are not counted.

    Attribute access that would read a global array without indexing it (``x.sum()``) raises
    instead of going uncounted. Updates take a lock: the simulator runs threads concurrently.
    """

    def __init__(self):
        self.moved = {}
        self._lock = threading.Lock()
        self._kernel, self._launch = None, 0
        self._phase, self._seen = None, set()   # the loads of the current (block, barrier)

    def launch(self, name):
        with self._lock:
            self._kernel, self._launch = name, self._launch + 1

    def _row(self, array):
        return self.moved.setdefault((self._kernel, array), [0, 0, 0, 0])

    def load(self, array, addresses, itemsize):
        t = threading.current_thread()
        phase = (self._launch, tuple(t.blockIdx), getattr(t, "_nbflash_barriers", 0))
        with self._lock:
            if phase != self._phase:    # every thread of the block has passed a barrier
                self._phase, self._seen = phase, set()
            row = self._row(array)
            for a in addresses:
                if a in self._seen:
                    row[3] += itemsize
                else:
                    self._seen.add(a)
                    row[0] += itemsize

    def add(self, array, column, nbytes):
        with self._lock:
            self._row(array)[column] += nbytes


_METADATA = frozenset(("dtype", "size", "ndim", "strides", "itemsize", "flags"))


def _counting_patches(tally):
    """(owner, attribute, replacement) for the simulator to report to `tally`."""
    import inspect  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from numba.cuda.simulator import kernel as sim, kernelapi  # noqa: PLC0415
    from numba.cuda.simulator.args import ArgHint, InOut  # noqa: PLC0415
    from numba.cuda.simulator.cudadrv.devicearray import (  # noqa: PLC0415
        FakeCUDAArray, FakeWithinKernelCUDAArray)

    quiet = threading.local()    # inside an atomic: its element reads and writes are not loads

    class Counted(FakeCUDAArray):
        """A kernel's global array (the simulator's wrapper) that reports what moves."""

        def __init__(self, ary, name):
            super().__init__(ary)
            self._name = name
            self._base = ary.__array_interface__["data"][0]

        def addresses(self):
            a = self._ary
            offsets = sum(i * s for i, s in zip(np.indices(a.shape), a.strides))
            return (self._base + np.asarray(offsets, dtype=np.int64)).ravel().tolist()

        def __getitem__(self, idx):
            got = self._ary[idx]
            if isinstance(got, np.ndarray):
                return Counted(got, self._name)      # a view: nothing has moved yet
            if not getattr(quiet, "on", False):
                a = self._ary
                at = self._base + sum(int(i) % n * s for i, n, s in zip(
                    idx if isinstance(idx, tuple) else (idx,), a.shape, a.strides))
                tally.load(self._name, (at,), a.itemsize)
            return got

        def __setitem__(self, idx, val):
            self._ary[idx] = val
            if not getattr(quiet, "on", False):
                tally.add(self._name, 1, self._ary[idx].nbytes)

        def __getattr__(self, name):
            if name in _METADATA:
                return getattr(self._ary, name)
            if name.startswith("__"):
                raise AttributeError(name)
            raise RuntimeError(f"{name!r} of global array {self._name!r}: the global-memory "
                               "counter counts element and slice accesses only")

    def view_method(name):
        return lambda self, *a, **k: Counted(getattr(self._ary, name)(*a, **k), self._name)

    class Argument(ArgHint):
        """An array argument as the simulator passes it (a copy, written back), counted."""

        def __init__(self, value, name):
            super().__init__(value)
            self.name = name

        def to_device(self, retr, stream=0):
            return Counted(InOut(self.value).to_device(retr, stream)._ary, self.name)

    launch = sim.FakeCUDAKernel.__call__

    def counted_launch(self, *args):
        if self._device or sim._get_kernel_context() is not None:
            return launch(self, *args)              # a device function, inside a kernel
        names = list(inspect.signature(self.fn).parameters)
        tally.launch(self.fn.__name__)
        return launch(self, *(
            Argument(a, names[i] if i < len(names) else f"arg{i}")
            if isinstance(a, np.ndarray) and a.ndim > 0 else a for i, a in enumerate(args)))

    barrier = sim.BlockThread.syncthreads

    def counted_barrier(self):
        barrier(self)
        self._nbflash_barriers = getattr(self, "_nbflash_barriers", 0) + 1

    def counted_atomic(op):
        def atomic(self, array, *args):
            item = array.__dict__.get("_item") if isinstance(
                array, FakeWithinKernelCUDAArray) else None
            if not isinstance(item, Counted):
                return op(self, array, *args)       # shared or local memory
            quiet.on = True
            try:
                old = op(self, array, *args)
            finally:
                quiet.on = False
            tally.add(item._name, 2, item._ary.itemsize)
            return old
        return atomic

    ufunc = FakeWithinKernelCUDAArray.__array_ufunc__

    def counted_ufunc(self, uf, method, *args, **kwargs):
        result = ufunc(self, uf, method, *args, **kwargs)
        for x in args:
            if isinstance(x, FakeWithinKernelCUDAArray) and isinstance(x._item, Counted):
                tally.load(x._item._name, x._item.addresses(), x._item._ary.itemsize)
        for x in kwargs.get("out") or ():
            if isinstance(x, FakeWithinKernelCUDAArray) and isinstance(x._item, Counted):
                tally.add(x._item._name, 1, x._item._ary.nbytes)
        return result

    atomics = [n for n, f in vars(kernelapi.FakeCUDAAtomic).items()
               if callable(f) and not n.startswith("_")]
    for name in ("reshape", "ravel", "view", "transpose"):
        setattr(Counted, name, view_method(name))
    return ([(sim.FakeCUDAKernel, "__call__", counted_launch),
             (sim.BlockThread, "syncthreads", counted_barrier),
             (FakeWithinKernelCUDAArray, "__array_ufunc__", counted_ufunc)]
            + [(kernelapi.FakeCUDAAtomic, n, counted_atomic(getattr(kernelapi.FakeCUDAAtomic, n)))
               for n in atomics])


_counting_lock = threading.Lock()
_counting = []


@contextlib.contextmanager
def count_global_memory():
    """Count the global-memory bytes of every kernel launched inside the ``with`` block (Numba's
    CUDA simulator only); yields a :class:`GlobalMemoryTally`. The simulator is patched on entry
    and restored on exit, so nothing is counted, or slowed, outside. Not nestable."""
    if not SIMULATOR:
        raise RuntimeError("counting global-memory accesses needs the simulator "
                           f"(NBFLASH_DEVICE=sim; the device mode is {MODE!r})")
    tally = GlobalMemoryTally()
    with _counting_lock:
        if _counting:
            raise RuntimeError("count_global_memory() is already active")
        patches = _counting_patches(tally)
        saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in patches]
        for owner, name, new in patches:
            setattr(owner, name, new)
        _counting.append(tally)
    try:
        yield tally
    finally:
        with _counting_lock:
            for owner, name, old in saved:
                setattr(owner, name, old)
            _counting.clear()


def _simulated_mul_rn(x, y):
    import numpy as np  # noqa: PLC0415
    return np.float32(np.float32(x) * np.float32(y))


if SIMULATOR:
    mul_rn = cuda.jit(device=True)(_simulated_mul_rn)
    intrinsic = None
else:
    from numba.cuda import libdevice
    from numba.cuda.extending import intrinsic  # for nbflash.kernels.common.primitives

    #: float32 x * y rounded to nearest and never contracted into an FMA (libdevice __nv_fmul_rn),
    #: so that two kernels computing the same product get the same float32
    mul_rn = libdevice.fmul_rn



@functools.lru_cache(maxsize=None)
def shared_memory_per_block():
    """(default, opt-in maximum): bytes of shared memory a block of the current GPU gets, and
    may ask for (dynamic shared memory, opted in per kernel); None without a GPU."""
    if not ON_GPU:
        return None
    dev = cuda.get_current_device()
    return dev.MAX_SHARED_MEMORY_PER_BLOCK, dev.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN


__all__ = ["cuda", "mul_rn", "intrinsic", "MODE", "SIMULATOR", "ON_GPU", "DeviceModeError",
           "count_global_memory", "GlobalMemoryTally", "shared_memory_per_block"]
