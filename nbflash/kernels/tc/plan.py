"""tc's host side: what it can run, its kernels for a set of compile-time constants, and the
launch plan of a call.

A tc call launches the forward kernel, or for the backward the dQ pass (which also computes
D = rowsum(dO ∘ O)) and the dK/dV kernel without dQ: bitwise reproducible, and on the H200 the
faster backward (nbflash.kernels.tc.tiles.DQ_PASS). The other backward, FA2's Algorithm 2 as
written, is the D kernel (fa2's, on the 16-bit values), the dK/dV kernel adding dQ atomically
into a float32 buffer and the kernel that converts that buffer into the 16-bit dq
(dq_pass=False; the default where the table says so). Arrays are float16, or uint16 holding
bfloat16 bits (numba-cuda has no bfloat16 type; nbflash.inputs takes torch's and ml_dtypes'
bfloat16 as their bits), and results come back of the same kind. Head dims that are not a
multiple of 8 are padded with zero columns on the way in and cut on the way out (as
FlashAttention's Python layer does; the kernels pad multiples of 8 to their 16-column tiles
themselves). As fa2's
(nbflash.kernels.fa2.plan), each kernel is compiled once per signature, launched through the
driver, and a call's :class:`TcPlan` is worked out once and cached (:func:`plan_for`).

Grouped-query heads (k and v with H_kv heads, H_kv dividing H): the forward's and the dQ
pass's grids are (query tiles, G, B·H_kv), a key/value head's G = H / H_kv query heads along y
(so that no kernel divides to find a head), the dK/dV grid is over key/value heads, each block
summing its group's query heads; G is a runtime argument (no more compiled variants). The
query-shaped and the key-shaped arrays each lie in one of the layouts of
nbflash.kernels.common.layouts ("bhnd" or "bnhd"; runtime arguments too), and the outputs are
allocated in their inputs' layouts; head dims that are padded run on contiguous copies.
"""

import functools

from numba import types

from ..._cuda import SIMULATOR
from ..common.arguments import kernel_types
from ..common.factory import Spec, flat, kernel
from ..common.fastlaunch import Bound
from ..common.layouts import BHND, empty, kernel_strides, padded
from ..common.options import NONE, Features, OptionArguments, softcap_scalars
from ..common.smem import check_fits
from ..common.softmax import DELTA_THREADS, make_delta, split_scale
from ..common.warp import make_warp_ops
from .backward import make_convert, make_dkdv, make_dq
from .forward import make_forward
from .tiles import dq_pass as default_dq_pass, kernel_head_dim, tiles as default_tiles

#: the tiled kernels (the compile check's and the tile tables'); "delta" and "convert" have none
KERNELS = ("forward", "dkdv", "dq")
CONVERT_THREADS = 256


def check(d, pass_, dropout=False):
    """tc's own checks (the shared ones, dtype and head dim among them, are nbflash.inputs'):
    its default tiles' shared memory at head dim d (with dropout's keep bits) against what a
    block may opt in to."""
    check_fits("tc", ("forward",) if pass_ == "forward" else ("dkdv", "dq"), default_tiles, d,
               dropout)


def launch_bounds(tiles, features=Features()):
    """(threads, min_blocks) for a tc kernel: the tiles' min_blocks for the plain kernels; the
    options' extra state needs the registers, so with any option 1."""
    return tiles.threads, (1 if any(features) else tiles.min_blocks)


def spec(name, tiles, causal, dtype, features=Features(), dq=None):
    """tc kernel `name` ("forward", "delta", "dkdv", "dq", "convert") for these constants (a
    factory Spec); dtype "float16" or "bfloat16" (16-bit data as uint16 bits); dq (dkdv):
    whether it adds dQ (False before the dQ pass; None: as the backward does by default at the
    tiles' head dim)."""
    bf16 = str(dtype) == "bfloat16"
    if name == "dkdv" and dq is None:
        dq = not default_dq_pass(tiles.d)
    if name == "forward":
        fn = make_forward(tiles, causal, bf16, features)
    elif name == "dkdv":
        fn = make_dkdv(tiles, causal, bf16, features, dq)
    elif name == "dq":
        fn = make_dq(tiles, causal, bf16, features)
    elif name == "delta":    # fa2's, on the 16-bit bits
        fn = make_delta(DELTA_THREADS, make_warp_ops(DELTA_THREADS, bf16)[4])
    elif name == "convert":
        fn = make_convert(CONVERT_THREADS, bf16)
    else:
        raise ValueError(name)
    if name == "convert":    # dq_acc, dq, pairs
        argtypes = (types.Array(types.float32, 1, "C"), types.Array(types.uint16, 1, "C"),
                    types.int64)
    else:                    # fa2's arguments (dkdv always has dq_acc; the dQ pass takes o)
        argtypes = kernel_types("dq_delta" if name == "dq" else name, types.uint16)
    if name not in KERNELS:
        return Spec(fn, argtypes)
    smem = tiles.smem_plan(name, features.dropout, *((dq,) if name == "dkdv" else ())).nbytes
    return Spec(fn, argtypes, smem, launch_bounds(tiles, features))


def _bits(xp, x):
    """A 16-bit array as its uint16 bits, the type the kernels are compiled for (a view;
    bfloat16 data already is). Only the simulator needs it: a launch on the GPU takes the
    arrays' pointers, whatever their dtype."""
    return x if not SIMULATOR or x.dtype == xp.uint16 else x.view(xp.uint16)


def _empty16(xp, layout, shape, dtype):
    """An output in `layout` for 16-bit results of the inputs' `dtype` (in the simulator
    uint16 bits, viewed back by :func:`_as`)."""
    return empty(xp, layout, shape, xp.uint16 if SIMULATOR else dtype)


def _as(x, dtype):
    return x if x.dtype == dtype else x.view(dtype)


def _cut(xp, x, d):
    """x's first d columns as a contiguous array (x itself when it has d)."""
    return x if x.shape[-1] == d else xp.ascontiguousarray(x[..., :d])


class TcPlan(OptionArguments):
    """A tc call's tiles, compiled kernels, grids and packed arguments (as fa2's Fa2Plan).
    Takes float16 arrays, or uint16 arrays holding bfloat16 bits, and returns the same kind.
    The backward computes dQ in the dQ pass (dq_pass True, and always with `deterministic`) or
    adds it atomically in the dK/dV pass (False); None: the default at this head dim.
    `layouts`: the layouts of the query-shaped arrays and of the key-shaped ones (both "bhnd"
    where the head dim is padded: the padded copies are contiguous)."""

    #: its forward and backward take torch tensors with nbflash._torch_arrays as `xp`
    TAKES_TORCH = True

    def __init__(self, B, H, Nq, Nk, d, dtype, causal, scale, tiles, layout=NONE,
                 deterministic=False, dq_pass=None, kv_heads=None, layouts=(BHND, BHND)):
        causal = layout.causal_kernels(causal)     # (a window holds the causal mask)
        H_kv = H if kv_heads is None else kv_heads    # grouped-query: G = H / H_kv per group
        G = H // H_kv
        self.d, kd = d, kernel_head_dim(d)            # kd: the kernels' head dim
        self.q_shape, self.k_shape = (B, H, Nq, kd), (B, H_kv, Nk, kd)
        self.lse_shape = (B, H, Nq)
        self.dtype, self.layout = dtype, layout
        self.q_layout, self.k_layout = layouts if kd == d else (BHND, BHND)
        qst = kernel_strides(self.q_layout, H, Nq, kd)
        strides = qst + kernel_strides(self.k_layout, H_kv, Nk, kd)
        if dq_pass is None:
            dq_pass = default_dq_pass(kd)
        self.atomic = not (deterministic or dq_pass)
        self._no_acc = None     # the dQ pass's placeholder for the dK/dV kernel's dq_acc
        features, drop = layout.features, layout.features.dropout
        nq, nk, rows = B * H * Nq * kd, B * H_kv * Nk * kd, B * H * Nq
        Q, K, L = (nq, 2), (nk, 2), (rows, 4)
        ACC = (nq, 4) if self.atomic else (1, 4)
        # the grids' batch entries and rows: a packed batch's sequences and longest ones
        seqs, grid_q, grid_k = layout.packed or (B, Nq, Nk)
        opt, opt_scalars = layout.array_sizes(seqs), layout.scalars()
        sc = split_scale(scale)
        cap = softcap_scalars(layout.softcap, scale)
        tiles = dict(tiles or ())
        t = tiles.get("forward") or default_tiles("forward", kd)
        self.fwd = Bound(kernel(spec, "forward", t, causal, dtype, features),
                         (-(-grid_q // t.rows), G, seqs * H_kv), t.threads,
                         t.smem_bytes("forward", drop),
                         (Q, K, K, Q, L, *opt), (Nq, Nk, H, G, *strides, *sc, *cap, *opt_scalars))
        self.delta = Bound(kernel(spec, "delta", None, False, dtype),
                           (-(-rows // DELTA_THREADS), 1, 1), DELTA_THREADS, 0,
                           (Q, Q, L, ACC), (rows, kd, 1, Nq, H, *qst)) if self.atomic else None
        grads = (Nq, Nk, H, G, *strides, *sc, float(scale), *cap, *opt_scalars)
        t = tiles.get("dkdv") or default_tiles("dkdv", kd)   # (a block per key/value head)
        self.dkdv = Bound(kernel(spec, "dkdv", t, causal, dtype, features, self.atomic),
                          (-(-grid_k // t.rows) * t.dsplit, H_kv, seqs), t.threads,
                          t.smem_bytes("dkdv", drop, self.atomic),
                          (Q, K, K, Q, L, L, ACC, K, K, *opt), grads)
        self.convert = Bound(kernel(spec, "convert", None, False, dtype),
                             (-(-(nq // 2) // CONVERT_THREADS), 1, 1), CONVERT_THREADS, 0,
                             (ACC, Q), (nq // 2,)) if self.atomic else None
        t = tiles.get("dq") or default_tiles("dq", kd)
        self.dq = None if self.atomic else Bound(
            kernel(spec, "dq", t, causal, dtype, features), (-(-grid_q // t.rows), G, seqs * H_kv),
            t.threads, t.smem_bytes("dq", drop), (Q, K, K, Q, Q, L, L, Q, *opt), grads)

    def forward(self, xp, q, k, v, stream, key_lengths=None, block_mask=None, seed=0, offset=0,
                alibi_slopes=None):
        """FA2 Algorithm 1 on tensor cores; returns (o, lse)."""
        kd, dtype = self.q_shape[-1], q.dtype
        q, k, v = (_bits(xp, padded(xp, x, kd)) for x in (q, k, v))
        o = _empty16(xp, self.q_layout, self.q_shape, dtype)
        lse = xp.empty(self.lse_shape, xp.float32)
        opt, scalars = self.options(xp, key_lengths, block_mask, seed, offset,
                                    alibi_slopes)
        self.fwd(stream, flat((q, k, v, o, lse, *opt)), self.with_options(self.fwd, scalars))
        return _as(_cut(xp, o, self.d), dtype), lse

    def backward(self, xp, do, q, k, v, o, lse, stream, key_lengths=None, block_mask=None,
                 seed=0, offset=0, alibi_slopes=None):
        """FA2 Algorithm 2 on tensor cores (do and o in q's layout); returns (dq, dk, dv)."""
        kd, dtype = self.q_shape[-1], q.dtype
        do, q, k, v, o = (_bits(xp, padded(xp, x, kd)) for x in (do, q, k, v, o))
        opt, scalars = self.options(xp, key_lengths, block_mask, seed, offset,
                                    alibi_slopes)
        delta = xp.empty(self.lse_shape, xp.float32)
        if self.atomic:
            dq_acc = empty(xp, self.q_layout, self.q_shape, xp.float32)
        else:   # (made once: a launch takes any array kind's pointer)
            dq_acc = self._no_acc = self._no_acc if self._no_acc is not None else \
                xp.empty((1,), xp.float32)
        dq = _empty16(xp, self.q_layout, self.q_shape, dtype)
        dk = _empty16(xp, self.k_layout, self.k_shape, dtype)
        dv = _empty16(xp, self.k_layout, self.k_shape, dtype)
        if self.atomic:
            self.delta(stream, flat((o, do, delta, dq_acc)))       # and zeroes dq_acc
        else:   # (and writes delta)
            self.dq(stream, flat((q, k, v, do, o, lse, delta, dq, *opt)),
                    self.with_options(self.dq, scalars))
        self.dkdv(stream, flat((q, k, v, do, lse, delta, dq_acc, dk, dv, *opt)),
                  self.with_options(self.dkdv, scalars))
        if self.atomic:
            self.convert(stream, flat((dq_acc, dq)))
        return tuple(_as(_cut(xp, x, self.d), dtype) for x in (dq, dk, dv))


@functools.lru_cache(maxsize=256)
def plan_for(B, H, Nq, Nk, d, dtype, causal, scale, tiles=None, layout=NONE,
             deterministic=False, dq_pass=None, kv_heads=None, layouts=(BHND, BHND)):
    """The cached :class:`TcPlan`; `tiles`: None or a tuple of (kernel, TcTiles) pairs;
    kv_heads: the heads of k and v (a divisor of H: grouped-query heads), None for H;
    layouts: the query side's and the key side's (nbflash.kernels.common.layouts)."""
    return TcPlan(B, H, Nq, Nk, d, str(dtype), causal, scale, tiles, layout, deterministic,
                  dq_pass, None if kv_heads == H else kv_heads, tuple(layouts))
