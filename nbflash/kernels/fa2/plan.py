"""fa2's host side: what it can run, its kernels for a set of compile-time constants, and the
launch plan of a call.

An fa2 call launches the forward kernel, or the backward's D kernel, dK/dV kernel (dQ by atomic
adds into a float32 buffer) and, with ``deterministic=True``, the separate dQ pass instead of the
atomics. With grouped-query heads (k and v with H_kv heads, H_kv dividing H) the forward and dQ
grids are (query tiles, G, B·H_kv), a key/value head's G = H / H_kv query heads along y (so
that no kernel divides to find a head), and the dK/dV grid is over key/value heads, each block
summing its group's query heads (G is a runtime argument: no more compiled variants). The
query-shaped and the key-shaped arrays each lie in one of the layouts of
nbflash.kernels.common.layouts ("bhnd" or "bnhd"), runtime arguments too: a plan allocates its
outputs in its inputs' layouts.
Each is compiled once per signature (nbflash.kernels.common.factory) and launched through the
driver (nbflash.kernels.common.fastlaunch): a :class:`Fa2Plan` works out
everything that depends only on a call's sizes and options once (tiles, kernels, grids, packed
arguments), and :func:`plan_for` caches plans, so that a repeated call only allocates its outputs
and writes pointers into ready parameter buffers.
"""

import functools

from numba import types

from ..common.arguments import kernel_types
from ..common.factory import Spec, flat, kernel
from ..common.fastlaunch import Bound
from ..common.layouts import BHND, empty, kernel_strides
from ..common.options import (NONE, Features, OptionArguments, layout as options_layout,
                              softcap_scalars)
from ..common.smem import check_fits
from ..common.softmax import DELTA_THREADS, make_delta, split_scale
from .backward import make_dkdv, make_dq
from .forward import make_forward
from .tiles import tiles as default_tiles

#: the tiled kernels (the compile check's and the tile tables'); "delta" has no tiles
KERNELS = ("forward", "dkdv", "dq")
_ELEMENT = {"float32": types.float32, "float16": types.float16}


@functools.lru_cache(maxsize=None)
def check(d, pass_, dropout=False):
    """fa2's own checks (the shared ones are nbflash.inputs'): its default tiles' shared memory
    at head dim d (with dropout's keep bits) against what a block may opt in to."""
    check_fits("fa2", ("forward",) if pass_ == "forward" else ("dkdv", "dq"), default_tiles, d,
               dropout)


def spec(name, tiles, causal, dtype, features=Features(), atomic=True):
    """fa2 kernel `name` ("forward", "delta", "dkdv", "dq") for these constants (a factory
    Spec); the dK/dV kernel adds dQ by atomics when `atomic` (the default; with
    deterministic=True the dQ pass computes dQ instead)."""
    if name == "forward":
        fn = make_forward(tiles, causal, dtype, features)
    elif name == "delta":
        fn = make_delta(DELTA_THREADS)
    elif name == "dkdv":
        fn = make_dkdv(tiles, causal, atomic, dtype, features)
    else:
        fn = make_dq(tiles, causal, features)
    smem = 0 if name == "delta" else tiles.smem_bytes(name, features.dropout)
    return Spec(fn, kernel_types(name, _ELEMENT[str(dtype)]), smem)


class Fa2Plan(OptionArguments):
    """Everything about an fa2 call that depends only on its sizes and options, worked out once:
    tiles, compiled kernels, grids and arguments, packed for launching (fastlaunch.Bound).
    `layout`: the options' nbflash.kernels.common.options.Layout; a call brings their arrays,
    seed and offset. `tiles`: None or (kernel, RegTiles) pairs instead of the defaults.
    `layouts`: the layouts of the query-shaped arrays (q, o, dO, dQ) and of the key-shaped
    ones (k, v, dK, dV)."""

    #: its forward and backward take torch tensors with nbflash._torch_arrays as `xp`
    TAKES_TORCH = True

    def __init__(self, B, H, Nq, Nk, d, dtype, causal, scale, deterministic, tiles,
                 layout=NONE, kv_heads=None, layouts=(BHND, BHND)):
        causal = layout.causal_kernels(causal)     # (a window holds the causal mask)
        H_kv = H if kv_heads is None else kv_heads    # grouped-query: G = H / H_kv per group
        G = H // H_kv
        self.q_shape, self.k_shape, self.lse_shape = (B, H, Nq, d), (B, H_kv, Nk, d), (B, H, Nq)
        self.dtype = dtype
        self.layout, (self.q_layout, self.k_layout) = layout, layouts
        qst = kernel_strides(self.q_layout, H, Nq, d)
        strides = qst + kernel_strides(self.k_layout, H_kv, Nk, d)
        features, drop = layout.features, layout.features.dropout
        io = 2 if dtype == "float16" else 4
        nq, nk, rows = B * H * Nq * d, B * H_kv * Nk * d, B * H * Nq
        Q, K, L = (nq, io), (nk, io), (rows, 4)     # (items, itemsize) of q-, k-, lse-shaped
        # the grids' batch entries and rows: a packed batch's sequences and longest ones
        seqs, grid_q, grid_k = layout.packed or (B, Nq, Nk)
        opt = layout.array_sizes(seqs)
        opt_scalars = layout.scalars()
        sc = split_scale(scale)
        cap = softcap_scalars(layout.softcap, scale)
        tiles = dict(tiles or ())
        t = tiles.get("forward") or default_tiles("forward", d)
        self.fwd = Bound(kernel(spec, "forward", t, causal, dtype, features),
                         (-(-grid_q // t.R), G, seqs * H_kv), t.threads,
                         t.smem_bytes("forward", drop),
                         (Q, K, K, Q, L, *opt), (Nq, Nk, H, G, *strides, *sc, *cap, *opt_scalars))
        self.atomic = not deterministic
        acc = (nq, 4) if self.atomic else (1, 4)
        self.delta = Bound(kernel(spec, "delta", None, False, dtype),
                           (-(-rows // DELTA_THREADS), 1, 1), DELTA_THREADS, 0,
                           (Q, Q, L, acc), (rows, d, int(self.atomic), Nq, H, *qst))
        inputs = (Q, K, K, Q, L, L)                 # q, k, v, do, lse, delta
        grads = (Nq, Nk, H, G, *strides, *sc, float(scale), *cap)
        t = tiles.get("dkdv") or default_tiles("dkdv", d)   # (a block per key/value head)
        self.dkdv = Bound(kernel(spec, "dkdv", t, causal, dtype, features, self.atomic),
                          (-(-grid_k // t.R), H_kv, seqs), t.threads, t.smem_bytes("dkdv", drop),
                          inputs + (acc, K, K, *opt), grads + opt_scalars)
        t = tiles.get("dq") or default_tiles("dq", d)
        self.dq = None if self.atomic else Bound(
            kernel(spec, "dq", t, causal, dtype, features), (-(-grid_q // t.R), G, seqs * H_kv),
            t.threads, t.smem_bytes("dq", drop), inputs + (Q, *opt), grads + opt_scalars)

    def forward(self, xp, q, k, v, stream, key_lengths=None, block_mask=None, seed=0, offset=0,
                alibi_slopes=None):
        """FA2 Algorithm 1 on checked arrays in the plan's layouts; returns (o, lse)."""
        o = empty(xp, self.q_layout, self.q_shape, self.dtype)
        lse = xp.empty(self.lse_shape, xp.float32)
        opt, scalars = self.options(xp, key_lengths, block_mask, seed, offset,
                                    alibi_slopes)
        self.fwd(stream, flat((q, k, v, o, lse, *opt)), self.with_options(self.fwd, scalars))
        return o, lse

    def backward(self, xp, do, q, k, v, o, lse, stream, key_lengths=None, block_mask=None,
                 seed=0, offset=0, alibi_slopes=None):
        """FA2 Algorithm 2 on checked arrays in the plan's layouts (do and o in q's); returns
        (dq, dk, dv)."""
        f32 = xp.float32
        opt, scalars = self.options(xp, key_lengths, block_mask, seed, offset,
                                    alibi_slopes)
        delta = xp.empty(self.lse_shape, f32)
        dk = empty(xp, self.k_layout, self.k_shape, self.dtype)
        dv = empty(xp, self.k_layout, self.k_shape, self.dtype)
        dq_acc = empty(xp, self.q_layout, self.q_shape, f32) if self.atomic \
            else xp.empty((1,), f32)
        self.delta(stream, flat((o, do, delta, dq_acc)))       # and zeroes dq_acc
        inputs = (q, k, v, do, lse, delta)
        self.dkdv(stream, flat(inputs + (dq_acc, dk, dv, *opt)),
                  self.with_options(self.dkdv, scalars))
        if self.atomic:
            if self.dtype != "float32":   # (torch tensors have no astype; nbflash.api's xp does)
                dq_acc = dq_acc.astype(self.dtype) if hasattr(dq_acc, "astype") \
                    else xp.astype(dq_acc, self.dtype)
            return dq_acc, dk, dv
        dq = empty(xp, self.q_layout, self.q_shape, self.dtype)
        self.dq(stream, flat(inputs + (dq, *opt)), self.with_options(self.dq, scalars))
        return dq, dk, dv


@functools.lru_cache(maxsize=256)
def plan_for(B, H, Nq, Nk, d, dtype, causal, scale, deterministic=False, tiles=None,
             layout=NONE, kv_heads=None, layouts=(BHND, BHND)):
    """The cached :class:`Fa2Plan`; `tiles`: None or a tuple of (kernel, RegTiles) pairs;
    kv_heads: the heads of k and v (a divisor of H: grouped-query heads), None for H;
    layouts: the query side's and the key side's (nbflash.kernels.common.layouts)."""
    return Fa2Plan(B, H, Nq, Nk, d, str(dtype), causal, scale, deterministic, tiles, layout,
                   None if kv_heads == H else kv_heads, tuple(layouts))


def run_forward(xp, q, k, v, *, causal, scale, stream=0, tiles=None, masking=None):
    """FA2 forward on contiguous, checked arrays with a RegTiles `tiles` for the forward kernel
    instead of the default (the tile sweeps and the tests use it); returns (o, lse). `masking`:
    the mask and dropout options as nbflash.inputs.Problem.masking gives them."""
    B, H, Nq, d = q.shape
    lay, args = options_layout(causal=causal, **(masking or {}))
    p = plan_for(B, H, Nq, k.shape[2], d, str(q.dtype), bool(causal), float(scale),
                 tiles=(("forward", tiles),) if tiles else None, layout=lay,
                 kv_heads=k.shape[1])
    return p.forward(xp, q, k, v, stream, *args)


def run_backward(xp, do, q, k, v, o, lse, *, causal, scale, deterministic=False, stream=0,
                 tiles=None, masking=None):
    """FA2 backward on contiguous, checked arrays; returns (dq, dk, dv). `tiles`: optional
    {"dkdv": RegTiles, "dq": RegTiles} instead of the defaults."""
    B, H, Nq, d = q.shape
    lay, args = options_layout(causal=causal, **(masking or {}))
    p = plan_for(B, H, Nq, k.shape[2], d, str(q.dtype), bool(causal), float(scale),
                 bool(deterministic), tuple(sorted(tiles.items())) if tiles else None, lay,
                 k.shape[1])
    return p.backward(xp, do, q, k, v, o, lse, stream, *args)
