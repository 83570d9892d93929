"""The benchmark's grid: its points, their options, and their FLOPs.

The FlashAttention-2 paper's benchmark: a fixed number of tokens per batch (16k: B = tokens // N)
and a fixed hidden size (2048: H = hidden // d), sequence length N from 512 to 16k, head dim d in
(64, 128), causal off and on, and three passes: forward (fwd), backward alone (bwd) and both
(fwdbwd). In the simulator the default grid is tiny, so the harness itself can be run and tested
without a GPU.

Options are part of a point (and of its record), so that runs with different options sit side
by side in one file: dropout p (the mask drawn from seed DROPOUT_SEED, offset 0), padding (key
lengths drawn from U[N-20, N], at least 1, as in the FlashAttention paper's benchmarks, with a
fixed seed: the same lengths for every impl at a point) and a block-sparse density
(nbflash.sparsity.random_blocks masks at a block size, shared by batch and heads; density 1.0
passes an all-True mask, which times the block-sparse code path at full density).

FLOPs, as in the FlashAttention papers: forward 4·B·H·N²·d (two N x N x d matrix products,
S = QKᵀ and O = PV), halved when causal, x2.5 for the backward (five: S again, dP, dV, dQ, dK),
x3.5 for forward+backward. TFLOP/s = FLOPs / median time. The dense count also at block-sparse
and padded points (TFLOP/s is always dense FLOPs / time); block-sparse records carry the
fraction of mask blocks that are on, "block_density".
"""

from typing import NamedTuple

import numpy as np

from .. import sparsity
from .._cuda import MODE

PASSES = ("fwd", "bwd", "fwdbwd")
DTYPES = ("float32", "float16")

#: The FlashAttention-2 grid on a GPU; a tiny one in the simulator (seconds, not hours).
GPU_DEFAULTS = {"tokens": 16384, "hidden": 2048, "Ns": (512, 1024, 2048, 4096, 8192, 16384),
                "ds": (64, 128), "repeats": 5, "warmup": 2, "block_size": 64}
SIM_DEFAULTS = {"tokens": 16, "hidden": 8, "Ns": (8, 16), "ds": (8,), "repeats": 1,
                "warmup": 0, "block_size": 4}

#: FLOPs of a pass relative to the forward's 4·B·H·N²·d
PASS_FLOPS = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}

#: the options' fixed seeds: every impl at a point sees the same dropout mask, key lengths and
#: block mask, and so does a rerun
DROPOUT_SEED, PADDING_SEED, BLOCK_MASK_SEED = 0, 0, 0
#: padding: key lengths from U[N - PADDING_SPREAD, N] (the FlashAttention paper's benchmarks)
PADDING_SPREAD = 20


class Point(NamedTuple):
    """One measurement: an impl, a dtype, a problem with its options, and a pass."""

    impl: str
    dtype: str
    B: int
    H: int
    N: int
    d: int
    causal: bool
    pass_: str
    dropout_p: float = 0.0
    padding: bool = False
    density: float = None     # None: dense
    block_size: int = None    # None: dense

    def options(self):
        """(dropout_p, padding, density, block_size), as record_options gives them."""
        return (self.dropout_p, self.padding, self.density, self.block_size)

    def group(self):
        """The problem the point belongs to: points of one group share inputs and reference."""
        return (self.dtype, self.B, self.H, self.N, self.d, self.causal, *self.options())

    def record(self, fields):
        """The point's record: its key fields, then `fields` (status, times, errors)."""
        rec = {"impl": self.impl, "dtype": self.dtype, "B": self.B, "H": self.H, "N": self.N,
               "d": self.d, "causal": self.causal, "pass": self.pass_,
               "dropout_p": self.dropout_p, "padding": self.padding, "density": self.density,
               "block_size": self.block_size}
        if self.density is not None:
            rec["block_density"] = sparsity.density(block_mask(self.N, self.density,
                                                               self.block_size))
        rec.update({"median_ms": None, "tflops": None, **fields})
        return rec


def defaults():
    """The default grid and repeat counts for this device mode."""
    return dict(GPU_DEFAULTS if MODE == "gpu" else SIM_DEFAULTS)


def problem_size(tokens, hidden, N, d):
    """(B, H) for a sequence length and head dim: B = tokens // N, H = hidden // d (at least 1)."""
    return max(1, tokens // N), max(1, hidden // d)


def flops(B, H, N, d, causal, pass_):
    """4·B·H·N²·d for the forward, halved when causal, x2.5 backward, x3.5 forward+backward."""
    return 4.0 * B * H * N * N * d * (0.5 if causal else 1.0) * PASS_FLOPS[pass_]


def grid_points(*, impls, dtypes, Ns, ds, causal, passes, tokens, hidden, dropout_p=0.0,
                padding=False, densities=(None,), block_size=None):
    """Every point of the grid, ordered so that points sharing inputs are adjacent.
    densities: None for dense points, else block-sparse at block_size."""
    points = []
    for dtype in dtypes:
        for d in ds:
            for N in Ns:
                B, H = problem_size(tokens, hidden, N, d)
                for c in causal:
                    for density in densities:
                        opts = (float(dropout_p), bool(padding)) + (
                            (None, None) if density is None else (float(density), block_size))
                        for impl in impls:
                            points += [Point(impl, dtype, B, H, N, d, bool(c), p, *opts)
                                       for p in passes]
    return points


def record_options(record):
    """(dropout_p, padding, density, block_size) of a record; a record written before the
    options existed has the defaults (0.0, False, None, None)."""
    density = record.get("density")
    dense = density is None
    return (float(record.get("dropout_p") or 0.0), bool(record.get("padding", False)),
            None if dense else float(density), None if dense else int(record["block_size"]))


def record_key(record):
    """What identifies a record's point (its options as record_options reads them)."""
    return (record["impl"], record["dtype"], record["B"], record["H"], record["N"], record["d"],
            bool(record["causal"]), record["pass"], *record_options(record))


def options_label(dropout_p, padding, density, block_size):
    """The options in words, e.g. 'dropout 0.1, padded, density 0.5 block 64' ('' for none)."""
    parts = [f"dropout {dropout_p:g}"] if dropout_p else []
    parts += ["padded"] if padding else []
    parts += [f"density {density:g} block {block_size}"] if density is not None else []
    return ", ".join(parts)


def key_lengths(B, N):
    """padding: B key lengths from U[N - PADDING_SPREAD, N] (at least 1), fixed seed."""
    rng = np.random.default_rng(PADDING_SEED)
    return rng.integers(max(1, N - PADDING_SPREAD), N, size=B, endpoint=True)


def block_mask(N, density, block_size):
    """density: the random_blocks mask of an N x N problem at block_size, fixed seed."""
    n = sparsity.n_blocks(N, block_size)
    return sparsity.random_blocks(n, n, density, seed=BLOCK_MASK_SEED)


def api_options(B, N, dropout_p=0.0, padding=False, density=None, block_size=None, xp=np):
    """The options of a point as nbflash.attention_forward and _backward take them (the masks
    as `xp` arrays); {} for a point without any."""
    opts = {}
    if dropout_p:
        opts.update(dropout_p=dropout_p, seed=DROPOUT_SEED, offset=0)
    if padding:
        opts["key_lengths"] = xp.asarray(key_lengths(B, N))
    if density is not None:
        opts.update(block_mask=xp.asarray(block_mask(N, density, block_size)),
                    block_size=(block_size, block_size))
    return opts


def check_options(dropout, densities, block_size):
    """ValueError for options the grid cannot take."""
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1); got {dropout}")
    bad = [x for x in densities or () if not 0 <= x <= 1]
    if bad:
        raise ValueError(f"densities must be in [0, 1]; got {bad}")
    if int(block_size) != block_size or block_size < 1:
        raise ValueError(f"block_size must be a positive integer; got {block_size}")
