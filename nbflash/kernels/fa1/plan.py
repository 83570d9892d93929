"""fa1's host side: what it can run, its kernels' argument types, and the plan that launches
Algorithms 1 and 4.

fa1's kernels take the (B, H, N, d) arrays themselves (4-D, so that the kernels index them as
the paper writes Q_i, K_j), so they are Numba dispatchers launched by Numba
(nbflash.kernels.common.factory: dispatcher, launch), typed at their first launch: one block per
(batch, head), ``tiles.threads`` threads. Their tiles follow from the on-chip memory M and the
block rule (nbflash.kernels.fa1.tiles).
"""

import numpy as np
from numba import types

from ..._cuda import shared_memory_per_block
from ...errors import InputError
from ..common import factory
from ..common.factory import Spec
from ..common.options import NONE, Features, OptionArguments, argument_types as _option_types
from . import tiles as _tiles
from .backward import make_backward
from .forward import make_forward

#: the kernels, as the compile check and the SASS report name them
KERNELS = ("forward", "backward")


def smem_limit():
    """Static shared memory a block gets: the device's figure on a GPU (48 KB on every CUDA GPU
    since Volta), at most the 48 KB static shared arrays may use."""
    limits = shared_memory_per_block()
    if limits is None:
        return _tiles.STATIC_SMEM_BYTES
    return min(_tiles.STATIC_SMEM_BYTES, limits[0])


def check(d, pass_, dropout=False, M=None, block_rule=None):
    """fa1's own checks (the shared ones are nbflash.inputs'): the block rule and M, and the
    shared memory of the tiles they give; returns the Tiles of the `pass_` ("forward" or
    "backward") kernel."""
    rule = "paper" if block_rule is None else block_rule
    if rule not in _tiles.RULES:
        raise InputError(f"block_rule={block_rule!r} is not a rule; use one of {_tiles.RULES}")
    limit = smem_limit()
    if M is None:
        M = _tiles.default_M(d, pass_, rule, limit)
    elif isinstance(M, bool) or not isinstance(M, (int, np.integer)) or M < 1:
        raise InputError(f"M (on-chip memory in elements) must be a positive integer; got {M!r}")
    tiles = _tiles.tiles_for(int(M), d, rule, _tiles.DEFAULT_THREADS)
    need = tiles.smem_bytes(pass_)
    if need > limit:
        raise InputError(
            f"M={M} gives Br={tiles.Br}, Bc={tiles.Bc} at head_dim {d}, and the fa1 {pass_} "
            f"kernel would need {need} bytes of shared memory, above the {limit} a block "
            f"gets; use a smaller M (default: largest that fits, "
            f"{_tiles.default_M(d, pass_, rule, limit)})")
    return tiles


def argument_types(kernel, dtype):
    """The Numba argument types kernel `kernel` is launched with for inputs of `dtype` (as
    :class:`Fa1Plan` launches it)."""
    cast = str(dtype) != "float32"
    io = types.Array(types.float16 if str(dtype) == "float16" else types.float32, 4, "C")
    f32_4d = types.Array(types.float32, 4, "C")
    f32_3d = types.Array(types.float32, 3, "C")
    out = io if cast else f32_4d    # the placeholder is float32
    opt_arrays, opt_scalars = _option_types()
    opts = (*opt_arrays, *opt_scalars)
    if kernel == "forward":    # q, k, v, o_acc, o, m, l, τ
        return (io, io, io, f32_4d, out, f32_3d, f32_3d, types.float32, *opts)
    # q, k, v, o, do, lse, dq_acc, dq, dk, dv, τ
    return (io, io, io, io, io, f32_3d, f32_4d, out, io, io, types.float32, *opts)


def spec(kernel, tiles, causal, dtype, features=Features()):
    """fa1's `kernel` ("forward" or "backward") for these constants (a factory Spec); inputs of
    a dtype other than float32 have their float32 accumulator cast into the output."""
    make = make_forward if kernel == "forward" else make_backward
    return Spec(make(tiles, bool(causal), str(dtype) != "float32", features),
                argument_types(kernel, dtype), static_smem=tiles.smem_bytes(kernel))


def _placeholder(xp):
    return xp.empty((1, 1, 1, 1), xp.float32)


class Fa1Plan(OptionArguments):
    """An fa1 call: its tiles (one Tiles per pass), causal flag, scale τ and options' layout.
    forward and backward take contiguous, checked arrays and the options' arrays, seed and
    offset."""

    def __init__(self, tiles, causal, scale, layout=NONE):
        self.tiles, self.causal, self.scale, self.layout = tiles, bool(causal), scale, layout

    def _extra(self, xp, key_lengths, block_mask, seed, offset):
        *ints, drop_scale = self.layout.scalars(seed, offset)
        return (*self.option_arrays(xp, key_lengths, block_mask), *ints, xp.float32(drop_scale))

    def forward(self, xp, q, k, v, stream=0, key_lengths=None, block_mask=None, seed=0,
                offset=0, alibi_slopes=None):
        """Algorithm 1; returns (o, lse)."""
        B, H, Nq, d = q.shape
        f32 = xp.float32
        cast = q.dtype != f32
        o_acc = xp.empty(q.shape, f32)
        # With a float32 output the kernel writes o_acc only; `o` is then a placeholder (the
        # simulator copies every argument separately, so one array must not be passed twice).
        o = xp.empty(q.shape, q.dtype) if cast else _placeholder(xp)
        m = xp.empty((B, H, Nq), f32)   # running max; holds lse when the kernel returns
        l = xp.empty((B, H, Nq), f32)
        kernel = factory.dispatcher(spec, "forward", self.tiles, self.causal, str(q.dtype),
                            self.layout.features)
        factory.launch(kernel, B * H, self.tiles.threads, q, k, v, o_acc, o, m, l, f32(self.scale),
               *self._extra(xp, key_lengths, block_mask, seed, offset))
        return (o if cast else o_acc), m

    def backward(self, xp, do, q, k, v, o, lse, stream=0, key_lengths=None, block_mask=None,
                 seed=0, offset=0, alibi_slopes=None):
        """Algorithm 4; returns (dq, dk, dv)."""
        B, H = q.shape[:2]
        f32 = xp.float32
        cast = q.dtype != f32
        dq_acc = xp.empty(q.shape, f32)
        dq = xp.empty(q.shape, q.dtype) if cast else _placeholder(xp)
        dk = xp.empty(k.shape, k.dtype)
        dv = xp.empty(v.shape, v.dtype)
        kernel = factory.dispatcher(spec, "backward", self.tiles, self.causal, str(q.dtype),
                            self.layout.features)
        factory.launch(kernel, B * H, self.tiles.threads, q, k, v, o, do, lse, dq_acc, dq, dk, dv,
               f32(self.scale), *self._extra(xp, key_lengths, block_mask, seed, offset))
        return (dq if cast else dq_acc), dk, dv
