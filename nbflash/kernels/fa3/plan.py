"""fa3's host side: its kernel for a set of compile-time constants, the TMA tensor maps of a
call's q, k and v, and the launch plan (forward only so far).

Arrays are float16, or uint16 holding bfloat16 bits (as tc's); the kernel is compiled once per
signature and launched through the driver (nbflash.kernels.common.fastlaunch), for sm_90a
(numba-cuda picks the arch-specific target on a Hopper device). The tensor maps are encoded by
the driver at each call (they hold the arrays' addresses) and passed in global memory.
"""

import functools
import math

import numpy as np
from numba import types

from ..._cuda import SIMULATOR
from ..common.factory import Spec, flat, kernel
from ..common.fastlaunch import Bound
from ..common.tma import device_tensor_map_3d
from .forward import make_forward
from .tiles import ROWS, THREADS, tiles as default_tiles

KERNELS = ("forward",)


def spec(name, tiles, causal, dtype):
    """fa3 kernel `name` ("forward") for these constants (a factory Spec)."""
    if name != "forward":
        raise ValueError(name)
    u16 = types.Array(types.uint16, 1, "C")
    u64 = types.Array(types.uint64, 1, "C")
    f32 = types.Array(types.float32, 1, "C")
    argtypes = (u16, u16, u16, u64, u64, u64, u16, f32, types.int64, types.int64, types.int64,
                types.float32)
    fn = make_forward(tiles, causal, str(dtype) == "bfloat16")
    return Spec(fn, argtypes, tiles.smem_bytes(), (THREADS, 1))


class Fa3Plan:
    """A call's tiles, compiled kernel, grid and packed arguments; forward only. Takes float16
    arrays, or uint16 arrays of bfloat16 bits, of shape (B, H, N, d), and returns (o, lse)."""

    def __init__(self, B, H, Nq, Nk, d, dtype, causal, scale, tiles=None):
        if not scale > 0:
            raise ValueError(f"fa3 takes softmax_scale > 0 so far; got {scale}")
        t = tiles or default_tiles("forward", d)
        self.tiles, self.shape = t, (B, H, Nq, Nk, d)
        self.q_shape, self.lse_shape = (B, H, Nq, d), (B, H, Nq)
        sc = float(np.float32(scale * math.log2(math.e)))
        nq, nk = B * H * Nq * d, B * H * Nk * d
        Q, K, L, M = (nq, 2), (nk, 2), (B * H * Nq, 4), (16, 8)
        self.fwd = Bound(kernel(spec, "forward", t, bool(causal), str(dtype)),
                         (-(-Nq // ROWS), H, B), THREADS, t.smem_bytes(),
                         (Q, K, K, M, M, M, Q, L), (Nq, Nk, H, sc))

    def _maps(self, q, k, v):
        """The TMA tensor maps of q, k and v (3-D: B·H heads of N rows of d), or the
        simulator's placeholders."""
        B, H, Nq, Nk, d = self.shape
        C = self.tiles.cols
        if SIMULATOR:
            return (np.zeros(16, np.uint64),) * 3
        return (device_tensor_map_3d(q, B * H, Nq, d, ROWS),
                device_tensor_map_3d(k, B * H, Nk, d, C),
                device_tensor_map_3d(v, B * H, Nk, d, C))

    def forward(self, xp, q, k, v, stream):
        """(o, lse) for q, k, v of the plan's shapes (16-bit bits, contiguous)."""
        dtype = q.dtype
        bits = (lambda x: x.view(xp.uint16)) if SIMULATOR else (lambda x: x)
        q, k, v = (bits(x) for x in (q, k, v))
        o = xp.empty(self.q_shape, xp.uint16 if SIMULATOR else dtype)
        lse = xp.empty(self.lse_shape, xp.float32)
        self.fwd(stream, flat((q, k, v, *self._maps(q, k, v), o, lse)))
        return (o if o.dtype == dtype else o.view(dtype)), lse   # (the inputs' kind of array)


@functools.lru_cache(maxsize=64)
def plan_for(B, H, Nq, Nk, d, dtype, causal, scale, tiles=None):
    return Fa3Plan(B, H, Nq, Nk, d, str(dtype), causal, scale, tiles)
