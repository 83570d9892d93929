"""The one place that builds kernels, and the host side that allocates buffers and launches them.

Tile sizes, head dim, causal flag and output cast (fa1) or storage dtype (fa2) are compile-time
constants of a kernel, so each combination is built once and cached: fa1's by :func:`build`
(Numba compiles it for the argument dtypes at its first launch), fa2's by :func:`build_fa2`
(compiled for one signature and launched through nbflash.kernels.fastlaunch). An fa2 call's
sizes and options make a :class:`Fa2Plan`, also cached.
"""

import functools

from .. import tiling
from .._cuda import SIMULATOR, cuda
from . import dropout, fa1, fa2, options, tc, warp
from .fastlaunch import Bound, Kernel, switch_interval

#: Threads per block. On the H200 (experiments/fa1_threads.py, its data in figures/data/)
#: 256 ran fa1 forward+backward 1.25-1.3x faster than 128 when B*H fills few SMs (32 or 128
#: blocks) and as fast at B*H = 512; 512 was faster still on small grids but slower on large
#: ones. The simulator runs each CUDA thread as a Python thread, so it gets fewer.
GPU_THREADS, SIM_THREADS = 256, 16
DEFAULT_THREADS = SIM_THREADS if SIMULATOR else GPU_THREADS

MAKERS = {
    "fa1_forward": fa1.make_forward,
    "fa1_backward": fa1.make_backward,
}


@functools.lru_cache(maxsize=None)
def build(name, tiles, causal, cast, features=options.Features()):
    """The kernel `name` for these compile-time constants (a Numba CUDA dispatcher)."""
    return cuda.jit(MAKERS[name](tiles, causal, cast, features))


def _launch(kernel, grid, threads, *args):
    """kernel[grid, threads](*args); in the simulator with a short GIL switch interval."""
    if not SIMULATOR:
        kernel[grid, threads](*args)
        return
    with switch_interval():
        kernel[grid, threads](*args)


def _placeholder(xp):
    return xp.empty((1, 1, 1, 1), xp.float32)


def _option_args(xp, masking):
    """(Features, the options' arguments) for fa1's kernels (see nbflash.kernels.options):
    arrays flattened, placeholders where an option is off, float32 1/(1-p)."""
    lay, (key_lengths, block_mask, seed, offset) = options.layout(**(masking or {}))
    kl = key_lengths if key_lengths is not None else xp.zeros(1, xp.int32)
    bm = block_mask.reshape(-1) if block_mask is not None else xp.zeros(1, xp.uint8)
    *ints, drop_scale = lay.scalars(seed, offset)
    return lay.features, (kl, bm, *ints, xp.float32(drop_scale))


def fa1_forward(xp, q, k, v, *, causal, scale, tiles, masking=None):
    """Run Algorithm 1 on contiguous, checked arrays; returns (o, lse). `masking`: the mask
    and dropout options as nbflash.inputs.Problem.masking gives them."""
    B, H, Nq, d = q.shape
    f32 = xp.float32
    cast = q.dtype != f32
    o_acc = xp.empty(q.shape, f32)
    # With a float32 output the kernel writes o_acc only; `o` is then a placeholder (the
    # simulator copies every argument separately, so one array must not be passed twice).
    o = xp.empty(q.shape, q.dtype) if cast else _placeholder(xp)
    m = xp.empty((B, H, Nq), f32)   # running max; holds lse when the kernel returns
    l = xp.empty((B, H, Nq), f32)
    features, extra = _option_args(xp, masking)
    kernel = build("fa1_forward", tiles, bool(causal), cast, features)
    _launch(kernel, B * H, tiles.threads, q, k, v, o_acc, o, m, l, f32(scale), *extra)
    return (o if cast else o_acc), m


def fa1_backward(xp, do, q, k, v, o, lse, *, causal, scale, tiles, masking=None):
    """Run Algorithm 4 on contiguous, checked arrays; returns (dq, dk, dv)."""
    B, H = q.shape[:2]
    f32 = xp.float32
    cast = q.dtype != f32
    dq_acc = xp.empty(q.shape, f32)
    dq = xp.empty(q.shape, q.dtype) if cast else _placeholder(xp)
    dk = xp.empty(k.shape, k.dtype)
    dv = xp.empty(v.shape, v.dtype)
    features, extra = _option_args(xp, masking)
    kernel = build("fa1_backward", tiles, bool(causal), cast, features)
    _launch(kernel, B * H, tiles.threads, q, k, v, o, do, lse, dq_acc, dq, dk, dv, f32(scale),
            *extra)
    return (dq if cast else dq_acc), dk, dv


# ---------------------------------------------------------------------------------------- fa2

FA2_TABLE = tiling.SIM_FA2_TILES if SIMULATOR else tiling.GPU_FA2_TILES
DELTA_THREADS = 128


def _fa2_types(name, dtype):
    """Numba argument types of fa2 kernel `name` for storage dtype `dtype` (tc's forward and
    dK/dV kernels take the same arguments, with 16-bit data as "uint16")."""
    from numba import types  # noqa: PLC0415

    elem = {"float16": types.float16, "uint16": types.uint16}.get(str(dtype), types.float32)
    io = types.Array(elem, 1, "C")
    f32 = types.Array(types.float32, 1, "C")
    i64, f = types.int64, types.float32
    # the options' arguments (nbflash.kernels.options): key_lengths, block mask; 9 integers
    # (mask strides, key blocks and block size, seed words, offset, threshold) and 1/(1-p)
    opt_arrays = (types.Array(types.int32, 1, "C"), types.Array(types.uint8, 1, "C"))
    opt_scalars = (i64,) * 9 + (f,)
    if name == "forward":    # q, k, v, o, lse, Nq, Nk, H, τ log2 e (hi, lo)
        return (io, io, io, io, f32, *opt_arrays, i64, i64, i64, f, f, *opt_scalars)
    if name == "delta":      # o, do, delta, dq_acc, n_rows, d, zero_dq
        return (io, io, f32, f32, i64, i64, i64)
    if name == "dkdv":   # q, k, v, do, lse, delta, dq_acc, dk, dv, Nq, Nk, H, τ log2 e (2), τ
        return (io, io, io, io, f32, f32, f32, io, io, *opt_arrays, i64, i64, i64, f, f, f,
                *opt_scalars)
    if name == "dq":     # q, k, v, do, lse, delta, dq, Nq, Nk, H, τ log2 e (hi, lo), τ
        return (io, io, io, io, f32, f32, io, *opt_arrays, i64, i64, i64, f, f, f,
                *opt_scalars)
    raise ValueError(name)


def fa2_function(name, tiles, causal, dtype, atomic=False, features=options.Features()):
    """The Python kernel of fa2 kernel `name` ("forward", "delta", "dkdv", "dq") for these
    constants, and its Numba argument types."""
    if name == "forward":
        fn = fa2.make_forward(tiles, causal, dtype, features)
    elif name == "delta":
        fn = fa2.make_delta(DELTA_THREADS)
    elif name == "dkdv":
        fn = fa2.make_dkdv(tiles, causal, atomic, dtype, features)
    else:
        fn = fa2.make_dq(tiles, causal, features)
    return fn, _fa2_types(name, dtype)


@functools.lru_cache(maxsize=None)
def build_fa2(name, tiles, causal, dtype, atomic=False, features=options.Features()):
    """fa2 kernel `name` compiled for these constants (a fastlaunch.Kernel)."""
    fn, argtypes = fa2_function(name, tiles, causal, dtype, atomic, features)
    smem = 0 if name == "delta" else tiles.smem_bytes(name, features.dropout)
    return Kernel(fn, argtypes, max_smem=smem)


@functools.lru_cache(maxsize=None)
def fa2_tiles(kernel, d):
    """The RegTiles fa2 `kernel` uses at head dim d on this device (GPU or simulator table)."""
    return tiling.fa2_tiles(kernel, d, FA2_TABLE)


class _Options:
    """The options' arrays and scalars of a call, for plans (see Fa2Plan)."""

    _placeholders = None

    def _options(self, xp, key_lengths, block_mask, seed, offset):
        """The options' arrays (placeholders where off), and with dropout the options' scalars
        for this call's seed and offset (packed anew at each launch; else None)."""
        if self._placeholders is None:
            self._placeholders = (xp.zeros(1, xp.int32), xp.zeros(1, xp.uint8))
        arrays = (self._placeholders[0] if key_lengths is None else key_lengths,
                  self._placeholders[1] if block_mask is None else block_mask.reshape(-1))
        if not self.layout.features.dropout:
            return arrays, None
        return arrays, self.layout.scalars(seed, offset)

    def _scalars_of(self, bound, opt_scalars):
        if opt_scalars is None:
            return None
        return bound.scalars[:len(bound.scalars) - len(opt_scalars)] + opt_scalars


class Fa2Plan(_Options):
    """Everything about an fa2 call that depends only on its sizes and options, worked out once:
    tiles, compiled kernels, grids and arguments, packed for launching (fastlaunch.Bound).
    :func:`fa2_plan` caches plans, so that a repeated call only allocates its outputs and
    writes pointers into ready parameter buffers. `layout`: the options'
    nbflash.kernels.options.Layout; a call brings their arrays, seed and offset."""

    def __init__(self, B, H, Nq, Nk, d, dtype, causal, scale, deterministic, tiles,
                 layout=options.NONE):
        causal = bool(causal)
        self.q_shape, self.k_shape, self.lse_shape = (B, H, Nq, d), (B, H, Nk, d), (B, H, Nq)
        self.dtype = dtype
        self.layout = layout
        features, drop = layout.features, layout.features.dropout
        io = 2 if dtype == "float16" else 4
        nq, nk, rows = B * H * Nq * d, B * H * Nk * d, B * H * Nq
        Q, K, L = (nq, io), (nk, io), (rows, 4)     # (items, itemsize) of q-, k-, lse-shaped
        opt = layout.array_sizes(B)
        opt_scalars = layout.scalars()
        sc = fa2.split_scale(scale)
        tiles = dict(tiles or ())
        t = tiles.get("forward") or fa2_tiles("forward", d)
        self.fwd = Bound(build_fa2("forward", t, causal, dtype, False, features),
                         (-(-Nq // t.R), H, B), t.threads, t.smem_bytes("forward", drop),
                         (Q, K, K, Q, L, *opt), (Nq, Nk, H, *sc, *opt_scalars))
        self.atomic = not deterministic
        acc = (nq, 4) if self.atomic else (1, 4)
        self.delta = Bound(build_fa2("delta", None, False, dtype),
                           (-(-rows // DELTA_THREADS), 1, 1), DELTA_THREADS, 0,
                           (Q, Q, L, acc), (rows, d, int(self.atomic)))
        inputs = (Q, K, K, Q, L, L)                 # q, k, v, do, lse, delta
        grads = (Nq, Nk, H, *sc, float(scale))
        t = tiles.get("dkdv") or fa2_tiles("dkdv", d)
        self.dkdv = Bound(build_fa2("dkdv", t, causal, dtype, self.atomic, features),
                          (-(-Nk // t.R), H, B), t.threads, t.smem_bytes("dkdv", drop),
                          inputs + (acc, K, K, *opt), grads + opt_scalars)
        t = tiles.get("dq") or fa2_tiles("dq", d)
        self.dq = None if self.atomic else Bound(
            build_fa2("dq", t, causal, dtype, False, features), (-(-Nq // t.R), H, B),
            t.threads, t.smem_bytes("dq", drop), inputs + (Q, *opt), grads + opt_scalars)

    def forward(self, xp, q, k, v, stream, key_lengths=None, block_mask=None, seed=0, offset=0):
        o = xp.empty(self.q_shape, self.dtype)
        lse = xp.empty(self.lse_shape, xp.float32)
        opt, scalars = self._options(xp, key_lengths, block_mask, seed, offset)
        self.fwd(stream, _arrays((q, k, v, o, lse, *opt)), self._scalars_of(self.fwd, scalars))
        return o, lse

    def backward(self, xp, do, q, k, v, o, lse, stream, key_lengths=None, block_mask=None,
                 seed=0, offset=0):
        f32 = xp.float32
        opt, scalars = self._options(xp, key_lengths, block_mask, seed, offset)
        delta = xp.empty(self.lse_shape, f32)
        dk = xp.empty(self.k_shape, self.dtype)
        dv = xp.empty(self.k_shape, self.dtype)
        dq_acc = xp.empty(self.q_shape if self.atomic else (1,), f32)
        self.delta(stream, _arrays((o, do, delta, dq_acc)))       # and zeroes dq_acc
        inputs = (q, k, v, do, lse, delta)
        self.dkdv(stream, _arrays(inputs + (dq_acc, dk, dv, *opt)),
                  self._scalars_of(self.dkdv, scalars))
        if self.atomic:
            return (dq_acc if self.dtype == "float32" else dq_acc.astype(self.dtype)), dk, dv
        dq = xp.empty(self.q_shape, self.dtype)
        self.dq(stream, _arrays(inputs + (dq, *opt)), self._scalars_of(self.dq, scalars))
        return dq, dk, dv


def _arrays(arrays):
    """In the simulator: the 1-D views the kernels are typed for (on the GPU the launch only
    takes the pointers)."""
    if SIMULATOR:
        return tuple(x.reshape(-1) for x in arrays)
    return arrays


@functools.lru_cache(maxsize=256)
def fa2_plan(B, H, Nq, Nk, d, dtype, causal, scale, deterministic=False, tiles=None,
             layout=options.NONE):
    """The cached :class:`Fa2Plan`; `tiles`: None or a tuple of (kernel, RegTiles) pairs."""
    return Fa2Plan(B, H, Nq, Nk, d, str(dtype), causal, scale, deterministic, tiles, layout)


def fa2_forward(xp, q, k, v, *, causal, scale, stream=0, tiles=None, masking=None):
    """FA2 forward on contiguous, checked arrays; returns (o, lse). `tiles`: a RegTiles for the
    forward kernel instead of the default. `masking`: the mask and dropout options as
    nbflash.inputs.Problem.masking gives them."""
    B, H, Nq, d = q.shape
    layout, (key_lengths, block_mask, seed, offset) = options.layout(**(masking or {}))
    plan = fa2_plan(B, H, Nq, k.shape[2], d, str(q.dtype), bool(causal), float(scale),
                    tiles=(("forward", tiles),) if tiles else None, layout=layout)
    return plan.forward(xp, q, k, v, stream, key_lengths, block_mask, seed, offset)


def fa2_backward(xp, do, q, k, v, o, lse, *, causal, scale, deterministic=False, stream=0,
                 tiles=None, masking=None):
    """FA2 backward on contiguous, checked arrays; returns (dq, dk, dv).

    deterministic: dQ from a separate pass over key blocks (bitwise reproducible) instead of
    atomic adds from the dK/dV pass. `tiles`: optional {"dkdv": RegTiles, "dq": RegTiles}.
    """
    B, H, Nq, d = q.shape
    layout, (key_lengths, block_mask, seed, offset) = options.layout(**(masking or {}))
    plan = fa2_plan(B, H, Nq, k.shape[2], d, str(q.dtype), bool(causal), float(scale),
                    bool(deterministic), tuple(sorted(tiles.items())) if tiles else None,
                    layout)
    return plan.backward(xp, do, q, k, v, o, lse, stream, key_lengths, block_mask, seed,
                         offset)


# ----------------------------------------------------------------------------------------- tc

TC_TABLE = tiling.SIM_TC_TILES if SIMULATOR else tiling.GPU_TC_TILES
CONVERT_THREADS = 256


def _tc_types(name):
    """Numba argument types of tc kernel `name` (16-bit data as uint16 bits)."""
    from numba import types  # noqa: PLC0415

    if name in ("forward", "dkdv", "delta"):   # fa2's arguments (dkdv always has dq_acc)
        return _fa2_types(name, "uint16")
    io, f32 = types.Array(types.uint16, 1, "C"), types.Array(types.float32, 1, "C")
    if name == "convert":    # dq_acc, dq, pairs
        return (f32, io, types.int64)
    raise ValueError(name)


def tc_function(name, tiles, causal, dtype, features=options.Features()):
    """The Python kernel of tc kernel `name` ("forward", "delta", "dkdv", "convert") for these
    constants, and its Numba argument types."""
    bf16 = str(dtype) == "bfloat16"
    if name == "forward":
        fn = tc.make_forward(tiles, causal, bf16, features)
    elif name == "dkdv":
        fn = tc.make_dkdv(tiles, causal, bf16, features)
    elif name == "delta":    # fa2's, on the 16-bit bits
        fn = fa2.make_delta(DELTA_THREADS, warp.make_warp_ops(DELTA_THREADS, bf16)[4])
    else:
        fn = tc.make_convert(CONVERT_THREADS, bf16)
    return fn, _tc_types(name)


@functools.lru_cache(maxsize=None)
def build_tc(name, tiles, causal, dtype, features=options.Features()):
    """tc kernel `name` compiled for these constants (a fastlaunch.Kernel)."""
    fn, argtypes = tc_function(name, tiles, causal, dtype, features)
    if name not in tiling.TC_KERNELS:
        return Kernel(fn, argtypes)
    return Kernel(fn, argtypes, max_smem=tiles.smem_bytes(name, features.dropout),
                  launch_bounds=tc_launch_bounds(tiles, features))


def tc_launch_bounds(tiles, features=options.Features()):
    """(threads, min_blocks) for a tc kernel: the tiles' min_blocks for the plain kernels; the
    options' extra state needs the registers, so with any option 1."""
    return tiles.threads, (1 if any(features) else tiles.min_blocks)


@functools.lru_cache(maxsize=None)
def tc_tiles(kernel, d):
    """The TcTiles tc `kernel` uses at head dim d on this device (GPU or simulator table)."""
    return tiling.tc_tiles(kernel, d, TC_TABLE)


def _bits(xp, x):
    """A 16-bit array as its uint16 bits (a view; bfloat16 data already is)."""
    return x if x.dtype == xp.uint16 else x.view(xp.uint16)


class TcPlan(_Options):
    """An tc call's tiles, compiled kernels, grids and packed arguments (as :class:`Fa2Plan`).
    Takes float16 arrays, or uint16 arrays holding bfloat16 bits, and returns the same kind.
    The backward adds dQ atomically (no deterministic pass)."""

    def __init__(self, B, H, Nq, Nk, d, dtype, causal, scale, tiles, layout=options.NONE):
        causal = bool(causal)
        self.q_shape, self.k_shape, self.lse_shape = (B, H, Nq, d), (B, H, Nk, d), (B, H, Nq)
        self.dtype, self.layout = dtype, layout
        features, drop = layout.features, layout.features.dropout
        nq, nk, rows = B * H * Nq * d, B * H * Nk * d, B * H * Nq
        Q, K, L, ACC = (nq, 2), (nk, 2), (rows, 4), (nq, 4)
        opt, opt_scalars = layout.array_sizes(B), layout.scalars()
        sc = fa2.split_scale(scale)
        tiles = dict(tiles or ())
        t = tiles.get("forward") or tc_tiles("forward", d)
        self.fwd = Bound(build_tc("forward", t, causal, dtype, features),
                         (-(-Nq // t.rows), H, B), t.threads, t.smem_bytes("forward", drop),
                         (Q, K, K, Q, L, *opt), (Nq, Nk, H, *sc, *opt_scalars))
        self.delta = Bound(build_tc("delta", None, False, dtype),
                           (-(-rows // DELTA_THREADS), 1, 1), DELTA_THREADS, 0,
                           (Q, Q, L, ACC), (rows, d, 1))
        t = tiles.get("dkdv") or tc_tiles("dkdv", d)
        self.dkdv = Bound(build_tc("dkdv", t, causal, dtype, features),
                          (-(-Nk // t.rows), H, B), t.threads, t.smem_bytes("dkdv", drop),
                          (Q, K, K, Q, L, L, ACC, K, K, *opt),
                          (Nq, Nk, H, *sc, float(scale), *opt_scalars))
        self.convert = Bound(build_tc("convert", None, False, dtype),
                             (-(-(nq // 2) // CONVERT_THREADS), 1, 1), CONVERT_THREADS, 0,
                             (ACC, Q), (nq // 2,))

    def forward(self, xp, q, k, v, stream, key_lengths=None, block_mask=None, seed=0, offset=0):
        o = xp.empty(self.q_shape, xp.uint16)
        lse = xp.empty(self.lse_shape, xp.float32)
        opt, scalars = self._options(xp, key_lengths, block_mask, seed, offset)
        self.fwd(stream, _arrays((_bits(xp, q), _bits(xp, k), _bits(xp, v), o, lse, *opt)),
                 self._scalars_of(self.fwd, scalars))
        return (o if q.dtype == xp.uint16 else o.view(q.dtype)), lse

    def backward(self, xp, do, q, k, v, o, lse, stream, key_lengths=None, block_mask=None,
                 seed=0, offset=0):
        dtype = q.dtype
        do, q, k, v, o = (_bits(xp, x) for x in (do, q, k, v, o))
        opt, scalars = self._options(xp, key_lengths, block_mask, seed, offset)
        delta = xp.empty(self.lse_shape, xp.float32)
        dq_acc = xp.empty(self.q_shape, xp.float32)
        dq = xp.empty(self.q_shape, xp.uint16)
        dk = xp.empty(self.k_shape, xp.uint16)
        dv = xp.empty(self.k_shape, xp.uint16)
        self.delta(stream, _arrays((o, do, delta, dq_acc)))       # and zeroes dq_acc
        self.dkdv(stream, _arrays((q, k, v, do, lse, delta, dq_acc, dk, dv, *opt)),
                  self._scalars_of(self.dkdv, scalars))
        self.convert(stream, _arrays((dq_acc, dq)))
        if dtype == xp.uint16:
            return dq, dk, dv
        return dq.view(dtype), dk.view(dtype), dv.view(dtype)


@functools.lru_cache(maxsize=256)
def tc_plan(B, H, Nq, Nk, d, dtype, causal, scale, tiles=None, layout=options.NONE):
    """The cached :class:`TcPlan`; `tiles`: None or a tuple of (kernel, TcTiles) pairs."""
    return TcPlan(B, H, Nq, Nk, d, str(dtype), causal, scale, tiles, layout)


# ------------------------------------------------------------------------ dropout mask export

@functools.lru_cache(maxsize=None)
def _mask_kernel():
    from numba import types  # noqa: PLC0415

    argtypes = (types.Array(types.uint8, 1, "C"),) + (types.int64,) * 7
    return Kernel(dropout.make_mask_kernel(), argtypes)


MASK_THREADS = 128


def dropout_mask(xp, B, H, Nq, Nk, dropout_p, seed, offset=0, stream=0):
    """The keep mask (bool, (B, H, Nq, Nk)) the kernels draw for these options, drawn by a
    kernel that calls the same device function (nbflash.kernels.dropout.keep_bits)."""
    from .. import rng  # noqa: PLC0415

    keep = xp.empty(B * H * Nq * Nk, xp.uint8)
    n_groups = B * H * Nq * (-(-Nk // rng.GROUP))
    lo, hi = rng.seed_words(seed)
    _mask_kernel()((-(-n_groups // MASK_THREADS), 1, 1), MASK_THREADS, 0, stream, (keep,),
                   (n_groups, Nq, Nk, lo, hi, int(offset), rng.threshold(dropout_p)))
    return keep.reshape(B, H, Nq, Nk).astype(bool)


def signature(name, dtype, cast):
    """Numba signature of kernel `name` for inputs of `dtype` (as :func:`fa1_forward` and
    :func:`fa1_backward` launch it), for compiling without a GPU."""
    from numba import types  # noqa: PLC0415

    io = types.Array(types.float16 if str(dtype) == "float16" else types.float32, 4, "C")
    f32_4d = types.Array(types.float32, 4, "C")
    f32_3d = types.Array(types.float32, 3, "C")
    out = io if cast else f32_4d  # the placeholder is float32
    # the options' arguments (see _option_args)
    opts = (types.Array(types.int32, 1, "C"), types.Array(types.uint8, 1, "C"),
            *(types.int64,) * 9, types.float32)
    if name == "fa1_forward":
        args = (io, io, io, f32_4d, out, f32_3d, f32_3d, types.float32, *opts)
    else:
        args = (io, io, io, io, io, f32_3d, f32_4d, out, io, io, types.float32, *opts)
    return types.void(*args)
