"""The one place that builds kernels, and the host side that allocates buffers and launches them.

Tile sizes, head dim, causal flag and output cast are compile-time constants of a kernel, so
each combination is built once by :func:`build` and cached. Numba compiles the built kernel for
the argument dtypes at its first launch.
"""

import contextlib
import functools
import sys

from .._cuda import SIMULATOR, cuda
from . import fa1

#: Threads per block. On the H200 (experiments/fa1_threads.py, its data in figures/data/)
#: 256 ran fa1 forward+backward 1.25-1.3x faster than 128 when B*H fills few SMs (32 or 128
#: blocks) and as fast at B*H = 512; 512 was faster still on small grids but slower on large
#: ones. The simulator runs each CUDA thread as a Python thread, so it gets fewer.
GPU_THREADS, SIM_THREADS = 256, 16
DEFAULT_THREADS = SIM_THREADS if SIMULATOR else GPU_THREADS

#: The simulator's scheduler polls its threads under the GIL; with Python's default 5 ms switch
#: interval a block spends most of its time waiting. 0.1 ms made simulated kernels ~10x faster.
SIM_SWITCH_INTERVAL = 1e-4

MAKERS = {
    "fa1_forward": fa1.make_forward,
    "fa1_backward": fa1.make_backward,
}


@functools.lru_cache(maxsize=None)
def build(name, tiles, causal, cast):
    """The kernel `name` for these compile-time constants (a Numba CUDA dispatcher)."""
    return cuda.jit(MAKERS[name](tiles, causal, cast))


def _launch(kernel, grid, threads, *args):
    """kernel[grid, threads](*args); in the simulator with a short GIL switch interval."""
    if not SIMULATOR:
        kernel[grid, threads](*args)
        return
    with _switch_interval(SIM_SWITCH_INTERVAL):
        kernel[grid, threads](*args)


@contextlib.contextmanager
def _switch_interval(seconds):
    before = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def _placeholder(xp):
    return xp.empty((1, 1, 1, 1), xp.float32)


def fa1_forward(xp, q, k, v, *, causal, scale, tiles):
    """Run Algorithm 1 on contiguous, checked arrays; returns (o, lse)."""
    B, H, Nq, d = q.shape
    f32 = xp.float32
    cast = q.dtype != f32
    o_acc = xp.empty(q.shape, f32)
    # With a float32 output the kernel writes o_acc only; `o` is then a placeholder (the
    # simulator copies every argument separately, so one array must not be passed twice).
    o = xp.empty(q.shape, q.dtype) if cast else _placeholder(xp)
    m = xp.empty((B, H, Nq), f32)   # running max; holds lse when the kernel returns
    l = xp.empty((B, H, Nq), f32)
    kernel = build("fa1_forward", tiles, bool(causal), cast)
    _launch(kernel, B * H, tiles.threads, q, k, v, o_acc, o, m, l, f32(scale))
    return (o if cast else o_acc), m


def fa1_backward(xp, do, q, k, v, o, lse, *, causal, scale, tiles):
    """Run Algorithm 4 on contiguous, checked arrays; returns (dq, dk, dv)."""
    B, H = q.shape[:2]
    f32 = xp.float32
    cast = q.dtype != f32
    dq_acc = xp.empty(q.shape, f32)
    dq = xp.empty(q.shape, q.dtype) if cast else _placeholder(xp)
    dk = xp.empty(k.shape, k.dtype)
    dv = xp.empty(v.shape, v.dtype)
    kernel = build("fa1_backward", tiles, bool(causal), cast)
    _launch(kernel, B * H, tiles.threads, q, k, v, o, do, lse, dq_acc, dq, dk, dv, f32(scale))
    return (dq if cast else dq_acc), dk, dv


def signature(name, dtype, cast):
    """Numba signature of kernel `name` for inputs of `dtype` (as :func:`fa1_forward` and
    :func:`fa1_backward` launch it), for compiling without a GPU."""
    from numba import types  # noqa: PLC0415

    io = types.Array(types.float16 if str(dtype) == "float16" else types.float32, 4, "C")
    f32_4d = types.Array(types.float32, 4, "C")
    f32_3d = types.Array(types.float32, 3, "C")
    out = io if cast else f32_4d  # the placeholder is float32
    if name == "fa1_forward":
        args = (io, io, io, f32_4d, out, f32_3d, f32_3d, types.float32)
    else:
        args = (io, io, io, io, io, f32_3d, f32_4d, out, io, io, types.float32)
    return types.void(*args)
