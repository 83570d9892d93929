"""Launch compiled Numba kernels with little host overhead.

A Numba launch (``kernel[grid, block](*args)``) inspects every argument on every call, about
33 us per CuPy array on the H200 (measured there, 2026-11-24), far more than a FlashAttention call
on a small problem takes on the GPU. fa2's kernels are compiled once per signature; this module
then launches them through the driver directly: it takes the compiled kernel's handle from
Numba, packs the arguments the way Numba's ABI lays them out (an array is meminfo, parent,
nitems, itemsize, data, shape and strides; nbflash passes only 1-D contiguous arrays, so that is
7 machine words), and calls ``cuLaunchKernel`` through ctypes.

The kernels also take more than the 48 KB of shared memory a block gets by default: their
dynamic shared memory size is raised with ``cuFuncSetAttribute``.

In the simulator the same kernels run through Numba's simulated launch instead.
"""

import contextlib
import ctypes
import struct
import sys
import threading

from ..._cuda import SIMULATOR, cuda

#: The simulator's scheduler polls its threads under the GIL; with Python's default 5 ms switch
#: interval a block spends most of its time waiting. 0.1 ms made simulated kernels ~10x faster.
SIM_SWITCH_INTERVAL = 1e-4


@contextlib.contextmanager
def switch_interval(seconds=SIM_SWITCH_INTERVAL):
    """Python's thread switch interval set to `seconds` for the duration (simulated launches)."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


#: CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
_MAX_DYNAMIC_SMEM = 8
_libcuda = None


def _driver():
    global _libcuda
    if _libcuda is None:
        lib = ctypes.CDLL("libcuda.so.1")
        vp, u = ctypes.c_void_p, ctypes.c_uint
        lib.cuLaunchKernel.argtypes = [vp, u, u, u, u, u, u, u, vp,
                                       ctypes.POINTER(vp), ctypes.POINTER(vp)]
        lib.cuKernelGetFunction.argtypes = [ctypes.POINTER(vp), vp]
        lib.cuFuncSetAttribute.argtypes = [vp, ctypes.c_int, ctypes.c_int]
        lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        lib.cuCtxGetCurrent.argtypes = [ctypes.POINTER(vp)]
        lib.cuCtxSetCurrent.argtypes = [vp]
        _libcuda = lib
    return _libcuda


def _check(rc, what):
    if rc != 0:
        msg = ctypes.c_char_p()
        _driver().cuGetErrorString(rc, ctypes.byref(msg))
        raise RuntimeError(f"{what} failed: CUDA error {rc} "
                           f"({(msg.value or b'?').decode()})")


class Kernel:
    """A kernel compiled for one signature: ``k(grid, block, smem, stream, arrays, scalars)``
    launches it once (packing every argument); :class:`Bound` packs them once for many launches.

    `argtypes`: Numba types, the 1-D contiguous arrays first, then the scalars (int64 or
    float32). At a call, `arrays` are array objects (anything with the CUDA array interface; on
    the fast path CuPy arrays or torch tensors) and `scalars` Python numbers.
    """

    def __init__(self, pyfunc, argtypes, max_smem=0, launch_bounds=None):
        from numba import types  # noqa: PLC0415

        n_arrays = sum(isinstance(t, types.Array) for t in argtypes)
        if any(isinstance(t, types.Array) for t in argtypes[n_arrays:]):
            raise ValueError("arrays must come before scalars")
        for t in argtypes[:n_arrays]:
            if t.ndim != 1 or t.layout != "C":
                raise ValueError(f"{t}: only 1-D contiguous arrays are passed")
        fmt = "<" + "qqqqqqq" * n_arrays
        for t in argtypes[n_arrays:]:
            if t == types.float32:
                fmt += "f4x"
            elif t == types.int64:
                fmt += "q"
            else:
                raise ValueError(f"scalar type {t} is not supported")
        self.name = pyfunc.__name__
        self.max_smem = max_smem
        self._fmt = fmt      # the parameters as Numba lays them out, 8 bytes each
        self._scalar_fmt = "<" + fmt[1 + 7 * n_arrays:]
        self._scalar_off = 8 * 7 * n_arrays
        if SIMULATOR:
            self._dispatcher = cuda.jit(pyfunc)
            return
        opts = {"launch_bounds": launch_bounds} if launch_bounds else {}
        self._dispatcher = cuda.jit(types.void(*argtypes), **opts)(pyfunc)
        self._funcs = {}     # device id -> CUfunction in that device's primary context
        self._argtypes = tuple(argtypes)

    def _function(self, device):
        """The CUfunction for `device`, whose context is current (loaded at first use)."""
        func = self._funcs.get(device)
        if func is None:
            overload = self._dispatcher.overloads[self._argtypes]
            kernel = overload._codelibrary.get_cufunc().handle   # a CUkernel (cuda.core)
            func = ctypes.c_void_p()
            lib = _driver()
            _check(lib.cuKernelGetFunction(ctypes.byref(func), int(kernel)),
                   f"cuKernelGetFunction({self.name})")
            if self.max_smem > 48 * 1024:
                _check(lib.cuFuncSetAttribute(func, _MAX_DYNAMIC_SMEM, self.max_smem),
                       f"raising {self.name}'s shared memory to {self.max_smem} bytes")
            ctx = ctypes.c_void_p()
            _check(lib.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
            _CONTEXTS[func.value] = ctx.value     # before the function is published: another
            func = self._funcs[device] = func.value   # thread may launch it at once
        return func

    def resources(self):
        """Registers, local memory bytes and static shared bytes of the compiled kernel."""
        attrs = self._dispatcher.overloads[self._argtypes]._codelibrary.get_cufunc().attrs
        return {"registers": attrs.regs, "local_bytes": attrs.local,
                "static_shared_bytes": attrs.shared}

    def __call__(self, grid, block, smem, stream, arrays, scalars):
        sizes = () if SIMULATOR else [_describe(a)[1:] for a in arrays]
        Bound(self, grid, block, smem, sizes, scalars)(stream, arrays)

    def _simulate(self, grid, block, smem, arrays, scalars):
        with switch_interval():
            self._dispatcher[grid, block, 0, smem](*arrays, *scalars)


class Bound:
    """A kernel with its grid, block, shared memory, array sizes and scalar arguments fixed,
    packed once: a launch only writes the arrays' device pointers into the parameter buffer
    (and, given `scalars`, packs those anew; they then stay for later launches).
    `sizes`: (number of items, itemsize) of each array argument, in order."""

    def __init__(self, kernel, grid, block, smem, sizes, scalars):
        if smem > kernel.max_smem:
            raise ValueError(f"{kernel.name}: {smem} bytes of shared memory requested, "
                             f"{kernel.max_smem} allowed")
        self.kernel, self.grid, self.block, self.smem = kernel, tuple(grid), block, smem
        self.scalars = tuple(scalars)
        if SIMULATOR:
            return
        values, self._slots = [], []
        for n, itemsize in sizes:
            self._slots.append(len(values) + 4)        # every parameter takes 8 bytes
            values += (0, 0, n, itemsize, 0, n, itemsize)
        values += self.scalars
        count = struct.calcsize(kernel._fmt) // 8
        self._buf = (ctypes.c_uint64 * count)()
        struct.pack_into(kernel._fmt, self._buf, 0, *values)
        base = ctypes.addressof(self._buf)
        self._params = (ctypes.c_void_p * count)(*(base + 8 * i for i in range(count)))
        self._lock = threading.Lock()

    def __call__(self, stream, arrays, scalars=None):
        if SIMULATOR:
            if scalars is not None:
                self.scalars = tuple(scalars)
            self.kernel._simulate(self.grid, self.block, self.smem, arrays, self.scalars)
            return
        first = arrays[0]
        device = (_ACCESS.get(type(first)) or _access(first))[1](first)
        func = self.kernel._funcs.get(device) or self.kernel._function(device)
        _make_current(_CONTEXTS[func])
        gx, gy, gz = self.grid
        with self._lock:   # (a call's scalars, e.g. dropout's seed, packed under the lock:
            buf = self._buf   # threads sharing a cached plan must not launch each other's)
            if scalars is not None:
                self.scalars = tuple(scalars)
                struct.pack_into(self.kernel._scalar_fmt, buf, self.kernel._scalar_off,
                                 *self.scalars)
            for slot, a in zip(self._slots, arrays):   # (the options' placeholders may be
                buf[slot] = (_ACCESS.get(type(a)) or _access(a))[0](a)   # of another kind)
            rc = _driver().cuLaunchKernel(func, gx, gy, gz, self.block, 1, 1, self.smem,
                                          stream, self._params, None)
        if rc:
            _check(rc, f"launching {self.kernel.name}")


#: CUfunction -> the context it was loaded in (the device's primary context, Numba's)
_CONTEXTS = {}


def _make_current(ctx):
    """Make `ctx` the calling thread's current context if it is not: a launch through the
    driver needs it, and a thread that only ran torch's (runtime API) work since Numba last
    touched the context may have none bound (CUDA error 201 at the launch, seen on the H200)."""
    lib, current = _driver(), ctypes.c_void_p()
    lib.cuCtxGetCurrent(ctypes.byref(current))
    if current.value != ctx:
        _check(lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")


#: array type -> (its device pointer, its device number): looked up once per type, since a
#: launch takes tens of arrays and torch's `.data` makes a new tensor at every access
_ACCESS = {}


def _access(a):
    """(pointer(a), device(a)) functions for arrays of a's type, found and remembered."""
    kind = type(a)
    found = _ACCESS.get(kind)
    if found is None:
        if hasattr(a, "data_ptr") and hasattr(a, "get_device"):      # torch
            found = (kind.data_ptr, kind.get_device)
        elif hasattr(getattr(a, "data", None), "ptr"):                # CuPy
            found = (lambda x: x.data.ptr, lambda x: x.data.device_id)
        else:
            found = (lambda x: _describe(x)[0], _device)
        _ACCESS[kind] = found
    return found


def _device(a):
    """The CUDA device an array lives on (the kernels are loaded per device)."""
    data = getattr(a, "data", None)
    if data is not None and hasattr(data, "device_id"):     # CuPy
        return data.device_id
    if hasattr(a, "get_device"):                              # torch
        return a.get_device()
    return 0


def _describe(a):
    """(device pointer, number of items, itemsize) of a contiguous device array."""
    data = getattr(a, "data", None)
    if data is not None and hasattr(data, "ptr"):           # CuPy
        return data.ptr, a.size, a.itemsize
    if hasattr(a, "data_ptr"):                               # torch
        return a.data_ptr(), a.numel(), a.element_size()
    iface = a.__cuda_array_interface__                       # anything else (e.g. Numba)
    n = 1
    for s in iface["shape"]:
        n *= s
    import numpy as np  # noqa: PLC0415
    return iface["data"][0], n, np.dtype(iface["typestr"]).itemsize
