"""The benchmark harness: every speed figure nbflash reports comes from here.

    import nbflash.bench
    result = nbflash.bench.run(out="figures/data/bench_h200.json")    # or python -m nbflash bench

Grid. The FlashAttention-2 paper's benchmark: a fixed number of tokens per batch (16k:
B = tokens // N) and a fixed hidden size (2048: H = hidden // d), sequence length N from 512 to
16k, head dim d in (64, 128), causal off and on, and three passes: forward (fwd), backward alone
(bwd) and both (fwdbwd). Every implementation runs each point in float32 and float16: the nbflash
impls through the public API (the naive CuPy baseline is impl="naive"), and, when torch is
importable on the GPU, torch's scaled_dot_product_attention ("torch": default backend choice,
TF32 off so float32 is exact float32) and the same forced onto its FlashAttention-2 backend
("torch-flash", float16 only). In the simulator the default grid is tiny, so the harness itself
can be run and tested without a GPU; its times are those of Python threads.

Options. The API's dropout and masks, each part of a point (and of its record), so that runs with
different options sit side by side in one file: --dropout p (the mask drawn from seed
DROPOUT_SEED, offset 0), --padding (key lengths drawn from U[N-20, N], at least 1, as in the
FlashAttention paper's benchmarks, with a fixed seed: the same lengths for every impl at a
point) and --density D ... (block-sparse attention with nbflash.sparsity.random_blocks masks of
those densities at --block-size, shared by batch and heads; density 1.0 passes an all-True mask,
which times the block-sparse code path at full density). nbflash impls get them through the
API, forward and backward alike. torch gets the equivalent boolean attn_mask (True: attend; the
causal mask folded in, since torch takes either is_causal or attn_mask) for padding and
block-sparse points, which torch-flash cannot take ("unsupported"), and its own dropout_p, whose
mask comes from torch's generator, so its outputs are not checked (the record says why,
"check_skipped").

FLOPs. As in the FlashAttention papers and the anchors in shared/anchors: forward
4·B·H·N²·d (two N x N x d matrix products, S = QKᵀ and O = PV), halved when causal, x2.5 for
the backward (five: S again, dP, dV, dQ, dK), x3.5 for forward+backward. TFLOP/s = FLOPs /
median time. The dense count also at block-sparse and padded points (TFLOP/s is always dense
FLOPs / time); block-sparse records carry the fraction of mask blocks that are on,
"block_density", for rates per computed block (tflops x block_density, less the causal overlap).

Correctness first. Before any point is timed, each (impl, dtype, problem) runs once and its o
(and dq, dk, dv when a backward pass is asked for) is compared, on a slice (batch 0, the first
two heads: the full float64 reference would not fit at N = 16k), with a float64 reference
computed there by nbflash.naive. The tolerance rule is the test suite's (shared/TESTING.md):
max error <= factor x the max error of the naive impl run in the same dtype on the same slice,
plus a floor of two roundings at the reference's magnitude; factors o 2, dq 4, dk and dv 3.
The reference takes the point's options: the dropout mask the kernels draw for the problem
(nbflash.dropout_mask, which depends on b·H + h: drawn for the whole heads of the batch entries
up to the slice's end, then sliced like the inputs), the slice's key lengths, the block mask.
Even on the slice, naive's N x N float64 matrices outgrow the GPU from N = 32k on (17 GB each
for two heads, several at once); so when one of them would exceed REFERENCE_CHUNK_BYTES (1 GiB:
N > 8192 for two heads), the reference and the naive impl in the dtype (the rule's baseline)
both take the query rows in chunks (nbflash.naive's row_chunk, reference_row_chunk: equal
chunks of at most 1 GiB / (2 heads x N x 8 bytes) rows, 1024 at N = 64k), with each chunk's
rows of every mask, and the dropout mask's rows drawn chunk by chunk on the slice's heads
(nbflash.rng.keep_mask, the array version of the kernels' generator) instead of whole. The
results are those of the unchunked computation (o, lse and dq row by row; dk and dv summed
over the chunks in float32, float64 for the reference); the run's params say how the
reference was computed ("reference", "reference_chunk_bytes", "reference_row_chunk").
A point that fails is recorded with status "error" and its errors, and is not timed.

Timing. A pair of CUDA events on the current CuPy stream around each timed call (torch runs on
the same stream), after `warmup` calls; the calls are queued back to back and synchronized
(CuPy and torch) once at the end, so the GPU does not idle between them waiting for the host
unless the host launches slower than the GPU runs. The median of `repeats` calls is reported.
Inputs are rotated across several copies (enough that they exceed ~150 MB together, 2.5x the
H200's 60 MB L2, at least 2 and at most 8), so a call never finds its inputs still in L2 from
the call before. For bwd the forward that produces o and lse (torch: the autograd graph on
fresh leaf tensors) runs outside the timed region; fwdbwd times both. In the simulator, wall
clock around each call.

Every point is recorded, those a peer cannot run included: status "ok", "oom" (CuPy's or torch's
out-of-memory error, MemoryError), "unsupported" (nbflash.InputError, or a dtype an impl does not
take) or "error" (anything else, message kept). The JSON file is rewritten after every point;
a rerun with the same file skips the points already recorded as ok, oom or unsupported (with
the same options: a record written before the options existed counts as without them).

Host overhead. Separately, the host time of one call at a tiny problem (B=1, H=1, N=128, d=64,
float32): median of time.perf_counter() around single calls, never synchronizing inside the
timed region (every 50 calls outside it), forward and backward, per impl.

The JSON file:

    {"meta": {"gpu" ("simulator" there), "mode", "device", "versions", "date", "git_commit",
              "git_dirty", "command", "params" (the grid, repeats, rotation, check, factors,
              reference, reference_chunk_bytes, reference_row_chunk),
              "earlier_runs" (the meta of runs this one resumed)},
     "records": [{"impl", "dtype", "B", "H", "N", "d", "causal", "pass", "dropout_p", "padding",
                  "density" (None: dense), "block_size" (None: dense), "block_density"
                  (block-sparse), "median_ms", "tflops", "status", "error" (not ok), "max_err"
                  and "tolerance" ({"o", "dq", "dk", "dv"} as far as checked), "check_skipped"
                  (why, where the outputs were not checked), "repeats", "warmup", "copies"
                  (timed)}, ...],
     "host_overhead_us": {impl: {"forward": us, "backward": us}, "fa1+torch": ..., ...}}
"""

import contextlib
import datetime
import gc
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

import nbflash
from . import inputs, naive, sparsity, tolerance
from ._cuda import MODE
from .measure import sync as _sync_cupy
from .rng import keep_mask

PASSES = ("fwd", "bwd", "fwdbwd")
DTYPES = ("float32", "float16")
TORCH_IMPLS = ("torch", "torch-flash")
#: statuses a resumed run keeps; "error" points are measured again
FINAL = ("ok", "oom", "unsupported", "skipped")

#: The FlashAttention-2 grid on a GPU; a tiny one in the simulator (seconds, not hours).
GPU_DEFAULTS = {"tokens": 16384, "hidden": 2048, "Ns": (512, 1024, 2048, 4096, 8192, 16384),
                "ds": (64, 128), "repeats": 5, "warmup": 2, "block_size": 64}
SIM_DEFAULTS = {"tokens": 16, "hidden": 8, "Ns": (8, 16), "ds": (8,), "repeats": 1,
                "warmup": 0, "block_size": 4}

#: FLOPs of a pass relative to the forward's 4·B·H·N²·d
PASS_FLOPS = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}

#: input rotation: copies enough to exceed this many bytes (2.5x the H200's L2), within bounds
ROTATE_BYTES = 150e6
MIN_COPIES, MAX_COPIES = 2, 8

#: the options' fixed seeds: every impl at a point sees the same dropout mask, key lengths and
#: block mask, and so does a rerun
DROPOUT_SEED, PADDING_SEED, BLOCK_MASK_SEED = 0, 0, 0
#: --padding: key lengths from U[N - PADDING_SPREAD, N] (the FlashAttention paper's benchmarks)
PADDING_SPREAD = 20

#: the check slice (batch 0, the first two heads) and the outputs checked there, with their
#: factors in the tolerance rule (nbflash.tolerance, as in the tests)
CHECK_SLICE = (slice(0, 1), slice(0, 2))
FACTORS = {name: tolerance.FACTORS[name] for name in ("o", "dq", "dk", "dv")}
#: the reference on the check slice takes the query rows in chunks (nbflash.naive's row_chunk)
#: when one float64 (slice batch, slice heads, N, N) matrix would exceed this many bytes, each
#: chunk as many rows as keep that matrix within it (2 heads: all rows at once up to N = 8192,
#: then 4096, 2048 and 1024 rows at N = 16k, 32k and 64k)
REFERENCE_CHUNK_BYTES = 2**30

#: host overhead: problem (B, H, N, d), calls measured, warm-up calls (compilation), sync period
GPU_HOST = {"shape": (1, 1, 128, 64), "calls": 300, "warmup": 10, "sync_every": 50}
SIM_HOST = {"shape": (1, 1, 16, 8), "calls": 3, "warmup": 1, "sync_every": 50}


class Unsupported(Exception):
    """A point an impl cannot run at all (torch missing, a dtype it does not take)."""


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
        """(dropout_p, padding, density, block_size), as _options gives them for a record."""
        return (self.dropout_p, self.padding, self.density, self.block_size)

    def group(self):
        """The problem the point belongs to: points of one group share inputs and reference."""
        return (self.dtype, self.B, self.H, self.N, self.d, self.causal, *self.options())


# -- which impls exist ------------------------------------------------------------------------

def nbflash_impls():
    """The nbflash impls the API takes now ("auto" aside): naive, fa1, fa2, ..."""
    return tuple(i for i in inputs.IMPLS if i != "auto")


def known_impls():
    """Every impl name the harness knows, whether or not it can run here."""
    return nbflash_impls() + TORCH_IMPLS


def _torch():
    """The torch module when it is importable and nbflash runs on the GPU, else None."""
    if MODE != "gpu":
        return None
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def default_impls():
    """torch's two series when torch can run here, then every nbflash impl."""
    return (TORCH_IMPLS if _torch() is not None else ()) + nbflash_impls()


def defaults():
    """The default grid and repeat counts for this device mode."""
    return dict(GPU_DEFAULTS if MODE == "gpu" else SIM_DEFAULTS)


# -- grid and FLOPs ---------------------------------------------------------------------------

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


def _options(record):
    """(dropout_p, padding, density, block_size) of a record; a record written before the
    options existed has the defaults (0.0, False, None, None)."""
    density = record.get("density")
    dense = density is None
    return (float(record.get("dropout_p") or 0.0), bool(record.get("padding", False)),
            None if dense else float(density), None if dense else int(record["block_size"]))


def options_label(dropout_p, padding, density, block_size):
    """The options in words, e.g. 'dropout 0.1, padded, density 0.5 block 64' ('' for none)."""
    parts = [f"dropout {dropout_p:g}"] if dropout_p else []
    parts += ["padded"] if padding else []
    parts += [f"density {density:g} block {block_size}"] if density is not None else []
    return ", ".join(parts)


def _key(record):
    return (record["impl"], record["dtype"], record["B"], record["H"], record["N"], record["d"],
            bool(record["causal"]), record["pass"], *_options(record))


# -- device helpers ---------------------------------------------------------------------------

def _xp():
    if MODE == "gpu":
        import cupy  # noqa: PLC0415
        return cupy
    return np


def _to_host(x):
    """A NumPy copy of a NumPy or CuPy array."""
    if type(x).__module__.split(".")[0] == "cupy":
        return x.get()
    return np.asarray(x)


def _sync():
    """Wait for all work queued on the GPU: CuPy's current stream and, if used, torch's."""
    _sync_cupy()
    torch = sys.modules.get("torch")
    if MODE == "gpu" and torch is not None and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _free_memory(collect=False):
    """Give cached device memory back, so that one large point does not starve the next."""
    if collect:
        gc.collect()
    if MODE != "gpu":
        return
    import cupy  # noqa: PLC0415
    cupy.get_default_memory_pool().free_all_blocks()
    cupy.get_default_pinned_memory_pool().free_all_blocks()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _is_oom(exc):
    if isinstance(exc, MemoryError):  # CuPy's OutOfMemoryError is one
        return True
    cupy, torch = sys.modules.get("cupy"), sys.modules.get("torch")
    if cupy is not None and isinstance(exc, cupy.cuda.memory.OutOfMemoryError):
        return True
    if torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    # cuBLAS / cuRAND failing to allocate their workspace say so only in the message
    text = str(exc).lower()
    return any(m in text for m in ("out of memory", "out_of_memory", "cudaerrormemoryallocation"))


def _failure(exc, where=""):
    """The record fields for a point that raised `exc`: status and message."""
    if _is_oom(exc):
        status = "oom"
    elif isinstance(exc, (nbflash.InputError, Unsupported)):
        status = "unsupported"
    else:
        status = "error"
    return {"status": status, "error": f"{where}{type(exc).__name__}: {exc}"}


def _num(x):
    """A float for JSON: non-finite values as the strings 'inf' / 'nan' (strict JSON has none)."""
    x = float(x)
    return x if math.isfinite(x) else str(x)


# -- inputs and the reference -----------------------------------------------------------------

def copies_for(bytes_per_copy):
    """How many input copies to rotate through: their total exceeds ROTATE_BYTES, within
    [MIN_COPIES, MAX_COPIES]."""
    return int(min(MAX_COPIES, max(MIN_COPIES, math.ceil(ROTATE_BYTES / bytes_per_copy))))


def _make_copies(xp, shape, dtype, n, seed):
    """n independent (q, k, v, do) tuples of standard-normal device arrays."""
    copies = []
    for i in range(n):
        rng = xp.random.default_rng(seed + 7919 * i)
        copies.append(tuple(rng.standard_normal(shape, dtype=np.float32).astype(dtype)
                            for _ in range(4)))
    return copies


def max_err(out, ref):
    """Max |out - ref| (nbflash.tolerance.errors)."""
    return tolerance.errors(out, ref)[0]


def key_lengths(B, N):
    """--padding: B key lengths from U[N - PADDING_SPREAD, N] (at least 1), fixed seed."""
    rng = np.random.default_rng(PADDING_SEED)
    return rng.integers(max(1, N - PADDING_SPREAD), N, size=B, endpoint=True)


def block_mask(N, density, block_size):
    """--density: the random_blocks mask of an N x N problem at block_size, fixed seed."""
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


def slice_shape(B, H):
    """(batch entries, heads) of the check slice of a (B, H, ...) problem."""
    return len(range(B)[CHECK_SLICE[0]]), len(range(H)[CHECK_SLICE[1]])


def reference_row_chunk(B, H, Nq, Nk, limit=None):
    """Query rows per chunk of the reference on the check slice of a (B, H, Nq, Nk) problem:
    None (all rows at once, the plain baseline) when a float64 matrix of the slice, (slice
    batch, slice heads, Nq, Nk), takes at most `limit` bytes (REFERENCE_CHUNK_BYTES); else the
    fewest chunks of equal size (the last may be shorter) whose matrices stay within it."""
    limit = REFERENCE_CHUNK_BYTES if limit is None else limit
    bs, hs = slice_shape(B, H)
    row_bytes = bs * hs * Nk * np.dtype(np.float64).itemsize
    if Nq * row_bytes <= limit:
        return None
    rows = max(1, int(limit // row_bytes))
    return -(-Nq // -(-Nq // rows))      # ceil(Nq / number of chunks)


def reference_note(limit=None):
    """How the reference is computed, in words (the run's params)."""
    limit = REFERENCE_CHUNK_BYTES if limit is None else limit
    return (f"float64 nbflash.naive on the check slice (batch {CHECK_SLICE[0].start}, heads "
            f"{CHECK_SLICE[1].start}-{CHECK_SLICE[1].stop - 1}); when one float64 N x N matrix "
            f"of the slice would exceed {limit} bytes, in chunks of query rows (row_chunk, "
            f"reference_row_chunk) that keep each (rows x N) matrix within it, the naive "
            f"impl in the dtype (the tolerance's baseline) chunked the same way, and the "
            f"dropout mask's rows drawn by nbflash.rng.keep_mask chunk by chunk")


def _slice_options(options, B, H, N, row_chunk=None):
    """The API options of a (B, H, N, N) problem as they apply to the check slice, in
    nbflash.naive's terms: the dropout mask the kernels draw (`keep`; it depends on b·H + h, so
    it is drawn for all H heads of the batch entries up to the slice's end, then sliced like the
    inputs), the key lengths of the slice's batch entries; the block mask is shared.
    row_chunk: the reference's row chunks (reference_row_chunk); when not None, `keep` is a
    function of a slice of rows that draws only those rows of the slice's heads
    (nbflash.rng.keep_mask, the same numbers as the kernels'), never the whole N x N mask."""
    out = {k: x for k, x in options.items() if k not in ("seed", "offset")}
    if options.get("dropout_p"):
        p, seed, offset = options["dropout_p"], options["seed"], options["offset"]
        if row_chunk is None:
            batches = range(B)[CHECK_SLICE[0]].stop
            keep = nbflash.dropout_mask(batches, H, N, N, p, seed, offset)
            out["keep"] = keep[CHECK_SLICE].copy()    # a copy: the whole mask is freed here
            del keep
        else:
            xp = _xp()

            def keep(rows):
                return keep_mask(xp, B, H, N, N, p, seed, offset, rows=rows,
                                 batches=CHECK_SLICE[0], heads=CHECK_SLICE[1])
            out["keep"] = keep
    if "key_lengths" in options:
        out["key_lengths"] = options["key_lengths"][CHECK_SLICE[0]]
    return out


def _slice_reference(copy, causal, options=None, row_chunk=None):
    """On the check slice: the float64 reference (o, dq, dk, dv) on the host, and the max errors
    of the naive impl run in the inputs' own dtype against it. options: nbflash.naive's mask and
    dropout arguments for the slice (_slice_options). row_chunk: None, or the query rows per
    chunk (reference_row_chunk) of both, so that no N x N matrix is made."""
    options = {**(options or {}), "row_chunk": row_chunk}
    q, k, v, do = (x[CHECK_SLICE] for x in copy)
    q64, k64, v64, do64 = (x.astype(np.float64) for x in (q, k, v, do))
    o, lse = naive.attention_forward(q64, k64, v64, causal=causal, **options)
    grads = naive.attention_backward(do64, q64, k64, v64, o, lse, causal=causal, **options)
    ref = dict(zip(("o", "dq", "dk", "dv"), (_to_host(x) for x in (o, *grads))))
    del o, lse, grads, q64, k64, v64, do64
    o, lse = naive.attention_forward(q, k, v, causal=causal, **options)
    grads = naive.attention_backward(do, q, k, v, o, lse, causal=causal, **options)
    naive_err = {name: max_err(_to_host(x), ref[name])
                 for name, x in zip(("o", "dq", "dk", "dv"), (o, *grads))}
    return ref, naive_err


class Group:
    """One problem (dtype, B, H, N, d, causal and the options): the rotated input copies, the
    API options (the same for every impl and call), and the float64 reference on the check
    slice with the naive impl's errors in this dtype."""

    def __init__(self, dtype, B, H, N, d, causal, dropout_p=0.0, padding=False, density=None,
                 block_size=None):
        self.dtype, self.causal, self.dropout_p = np.dtype(dtype), causal, dropout_p
        self.shape = (B, H, N, d)
        self.flops = {p: flops(B, H, N, d, causal, p) for p in PASSES}
        # q, k, v, do and the o each call writes
        n = copies_for(5 * B * H * N * d * self.dtype.itemsize)
        self.copies = _make_copies(_xp(), self.shape, self.dtype, n, seed=1009 * N + d)
        self.options = api_options(B, N, dropout_p, padding, density, block_size, _xp())
        #: query rows per chunk of the reference (None: all at once)
        self.reference_rows = reference_row_chunk(B, H, N, N)
        self.ref, self.naive_err = _slice_reference(
            self.copies[0], causal, _slice_options(self.options, B, H, N, self.reference_rows),
            self.reference_rows)

    def tolerance(self, name):
        """The largest max error the tolerance rule allows for output `name`."""
        return tolerance.allowed(name, self.naive_err[name], self.ref[name], self.dtype)

    def masked(self):
        """True when the point has key lengths or a block mask (torch needs an attn_mask)."""
        return "key_lengths" in self.options or "block_mask" in self.options

    def attn_mask(self):
        """The boolean element mask (True: attend) of the key lengths, the block mask and the
        causal mask, broadcastable to (B, H, N, N): what a torch user passes as attn_mask."""
        B, H, N, _ = self.shape
        opts = {k: self.options.get(k) for k in ("key_lengths", "block_mask", "block_size")}
        xp = _xp()
        return xp.ascontiguousarray(naive.visible(B, H, N, N, xp, self.causal, **opts))


# -- the impls: one way to run checks and timed calls -----------------------------------------
#
# A runner runs one impl on one Group's copies. check_forward(copies) -> o and
# check_backward(copies) -> (dq, dk, dv) run once on copy 0 for the correctness check (device
# arrays); timed(pass_, copies, i) does the untimed preparation for a call on copy i and returns
# the call to time. unchecked: None, or why the reference does not describe its outputs.

class NbflashRunner:
    """An nbflash impl through the public API; options: the Group's API options, given to the
    forward and the backward alike."""

    unchecked = None

    def __init__(self, impl, causal, options=None):
        self.impl, self.causal, self.options = impl, causal, options or {}
        self._saved = {}   # copy index -> this impl's (o, lse), the backward's inputs

    def context(self):
        return contextlib.nullcontext()

    def forward(self, q, k, v):
        return nbflash.attention_forward(q, k, v, causal=self.causal, impl=self.impl,
                                         **self.options)

    def backward(self, do, q, k, v, o, lse):
        return nbflash.attention_backward(do, q, k, v, o, lse, causal=self.causal,
                                          impl=self.impl, **self.options)

    def _fwd_outputs(self, copies, i):
        if i not in self._saved:
            self._saved[i] = self.forward(*copies[i][:3])
        return self._saved[i]

    def check_forward(self, copies):
        return self._fwd_outputs(copies, 0)[0]

    def check_backward(self, copies):
        q, k, v, do = copies[0]
        return self.backward(do, q, k, v, *self._fwd_outputs(copies, 0))

    def timed(self, pass_, copies, i):
        q, k, v, do = copies[i]
        if pass_ == "fwd":
            return lambda: self.forward(q, k, v)
        if pass_ == "bwd":
            o, lse = self._fwd_outputs(copies, i)
            return lambda: self.backward(do, q, k, v, o, lse)

        def fwdbwd():
            o, lse = self.forward(q, k, v)
            self.backward(do, q, k, v, o, lse)
        return fwdbwd


class TorchRunner:
    """torch.nn.functional.scaled_dot_product_attention on the CuPy arrays (shared through
    DLPack), backward through autograd on fresh leaf tensors. flash=True forces the
    FlashAttention backend (float16 only, no attn_mask). With a group: its dropout_p (torch's
    own generator: the outputs go unchecked) and, for key lengths and block masks, the
    equivalent attn_mask."""

    def __init__(self, causal, dtype, flash=False, group=None):
        torch = _torch()
        if torch is None:
            raise Unsupported("torch runs only when it is importable and nbflash is on the GPU "
                              f"(mode here: {MODE})")
        if flash and np.dtype(dtype) != np.float16:
            raise Unsupported(f"torch's FlashAttention backend takes float16, not {dtype}")
        masked = group is not None and group.masked()
        if flash and masked:
            raise Unsupported("torch's FlashAttention backend takes no attn_mask (key padding, "
                              "block-sparse)")
        self.torch, self.causal, self.flash = torch, causal, flash
        self.attn_mask = torch.from_dlpack(group.attn_mask()).to(torch.bool) if masked else None
        self.dropout_p = group.dropout_p if group is not None else 0.0
        self.unchecked = ("torch draws its own dropout mask, which nbflash's reference does not "
                          "know") if self.dropout_p else None
        self._pending = None   # (q, k, v, do, o) of the check forward, for the check backward

    def context(self):
        """torch on CuPy's current stream (where the events are recorded; both are the default
        stream unless someone changed one), and the FlashAttention backend for torch-flash."""
        import cupy  # noqa: PLC0415
        stack = contextlib.ExitStack()
        ptr = cupy.cuda.get_current_stream().ptr
        if self.torch.cuda.current_stream().cuda_stream != ptr:
            stack.enter_context(self.torch.cuda.stream(self.torch.cuda.ExternalStream(ptr)))
        if self.flash:
            from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415
            stack.enter_context(sdpa_kernel(SDPBackend.FLASH_ATTENTION))
        return stack

    def forward(self, q, k, v):
        # default scale 1/sqrt(d) as nbflash's; is_causal is top-left aligned, the same as
        # nbflash's bottom-right alignment when Nq == Nk, as everywhere in the grid; torch takes
        # is_causal or attn_mask, so with a mask the causal one is folded into it
        sdpa = self.torch.nn.functional.scaled_dot_product_attention
        if self.attn_mask is not None:
            return sdpa(q, k, v, attn_mask=self.attn_mask, dropout_p=self.dropout_p)
        return sdpa(q, k, v, is_causal=self.causal, dropout_p=self.dropout_p)

    def _tensors(self, copy, grad):
        q, k, v, do = (self.torch.from_dlpack(x) for x in copy)
        if grad:   # fresh leaves sharing the arrays' memory: each backward gets its own graph
            q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        return q, k, v, do

    @staticmethod
    def _cupy(t):
        import cupy  # noqa: PLC0415
        return cupy.from_dlpack(t.detach())

    def check_forward(self, copies):
        q, k, v, do = self._tensors(copies[0], grad=True)
        o = self.forward(q, k, v)
        self._pending = (q, k, v, do, o)
        return self._cupy(o)

    def check_backward(self, copies):
        q, k, v, do, o = self._pending
        self._pending = None
        o.backward(do)
        return tuple(self._cupy(t.grad) for t in (q, k, v))

    def timed(self, pass_, copies, i):
        if pass_ == "fwd":
            q, k, v, _ = self._tensors(copies[i], grad=False)
            return lambda: self.forward(q, k, v)
        q, k, v, do = self._tensors(copies[i], grad=True)
        if pass_ == "bwd":
            o = self.forward(q, k, v)
            return lambda: o.backward(do)
        return lambda: self.forward(q, k, v).backward(do)


def make_runner(impl, causal, dtype, group=None):
    """The runner for `impl`, with the options of `group` (None: none); raises Unsupported for
    an impl that cannot run here."""
    if impl in TORCH_IMPLS:
        return TorchRunner(causal, dtype, flash=impl == "torch-flash", group=group)
    if impl not in nbflash_impls():
        raise Unsupported(f"impl {impl!r} is not available (nbflash has {nbflash_impls()})")
    return NbflashRunner(impl, causal, group.options if group is not None else None)


@contextlib.contextmanager
def _exact_float32():
    """No TF32 in torch's float32 matrix products (restored on exit)."""
    torch = _torch()
    if torch is None:
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# -- correctness check ------------------------------------------------------------------------

def _compare(group, outputs):
    """Apply the tolerance rule to {name: device array}: the record fields (status "ok" or
    "error", max_err, tolerance)."""
    errs, tols, failures = {}, {}, []
    for name, x in outputs.items():
        err = max_err(_to_host(x[CHECK_SLICE]), group.ref[name])
        errs[name], tols[name] = err, group.tolerance(name)
        if not err <= tols[name]:
            failures.append(f"{name}: max err {err:.3g} > allowed {tols[name]:.3g} "
                            f"(naive {group.naive_err[name]:.3g})")
    fields = {"status": "error" if failures else "ok",
              "max_err": {n: _num(e) for n, e in errs.items()},
              "tolerance": {n: _num(t) for n, t in tols.items()}}
    if failures:
        fields["error"] = "correctness check failed: " + "; ".join(failures)
    return fields


def _verdict(runner, group, outputs):
    """_compare's fields, or, for a runner the reference does not describe (runner.unchecked),
    status "ok" with the reason the outputs were not checked ("check_skipped")."""
    if runner.unchecked:
        return {"status": "ok", "check_skipped": runner.unchecked}
    return _compare(group, outputs)


def check(runner, group, backward):
    """Run the impl once on copy 0 and compare with the reference on the check slice.

    Returns {"fwd": fields, "bwd": fields}: the record fields before timing for a forward point
    and for a point that also needs the backward (its max_err includes o's). A backward that
    raises leaves the forward's verdict standing.
    """
    try:
        fwd = _verdict(runner, group, {"o": runner.check_forward(group.copies)})
    except Exception as exc:  # noqa: BLE001  (every failure becomes a record)
        fwd = _failure(exc, "forward: ")
        return {"fwd": fwd, "bwd": fwd}
    if not backward or fwd["status"] != "ok":
        return {"fwd": fwd, "bwd": fwd}
    try:
        grads = runner.check_backward(group.copies)
        bwd = _verdict(runner, group, dict(zip(("dq", "dk", "dv"), grads)))
    except Exception as exc:  # noqa: BLE001
        return {"fwd": fwd, "bwd": _failure(exc, "backward: ")}
    for key in ("max_err", "tolerance"):
        if key in fwd:
            bwd[key] = {**fwd[key], **bwd[key]}
    return {"fwd": fwd, "bwd": bwd}


# -- timing -----------------------------------------------------------------------------------

def median_ms(prepare, copies, repeats, warmup):
    """Median milliseconds of `repeats` calls after `warmup` calls. Call j is prepare(j % copies)
    (untimed preparation; returns the call to time), so consecutive calls read other inputs.

    GPU: a pair of CUDA events on the current CuPy stream around each call, the calls queued
    back to back with one synchronization at the end, so that the GPU does not wait for the
    host between them (it still does if the host launches slower than the GPU runs: that cost
    is the implementation's). Simulator: wall clock around each call.
    """
    for j in range(warmup):
        prepare(j % copies)()
    _sync()
    order = [j % copies for j in range(warmup, warmup + repeats)]
    if MODE != "gpu":
        times = []
        for i in order:
            call = prepare(i)
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    import cupy  # noqa: PLC0415
    events = []
    for i in order:
        call = prepare(i)
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        call()
        end.record()
        events.append((start, end))
    _sync()
    return statistics.median([cupy.cuda.get_elapsed_time(s, e) for s, e in events])


def measure_passes(runner, group, passes, repeats, warmup, before_timing=None):
    """Check `runner` once on `group` (the backward too when a pass needs it), then yield the
    record fields of each pass in `passes`, in order: the check's verdict, with the pass's timing
    (time_pass) when the check passed. before_timing(i): called before pass i is timed."""
    verdict = check(runner, group, backward=any(p != "fwd" for p in passes))
    for i, p in enumerate(passes):
        fields = verdict["fwd" if p == "fwd" else "bwd"]
        if fields["status"] == "ok":
            if before_timing is not None:
                before_timing(i)
            fields = {**fields, **time_pass(runner, group, p, repeats, warmup)}
        yield fields


def time_pass(runner, group, pass_, repeats, warmup):
    """The record fields of a timed pass: median_ms and tflops, or the failure."""
    try:
        ms = median_ms(lambda i: runner.timed(pass_, group.copies, i), len(group.copies),
                       repeats, warmup)
    except Exception as exc:  # noqa: BLE001
        return _failure(exc, "timing: ")
    return {"status": "ok", "median_ms": ms, "tflops": group.flops[pass_] / ms / 1e9,
            "repeats": repeats, "warmup": warmup, "copies": len(group.copies)}


# -- the JSON document ------------------------------------------------------------------------

def gpu_short_name(name):
    """'NVIDIA H200' -> 'h200', 'NVIDIA GeForce RTX 4090' -> 'rtx-4090'."""
    words = [re.sub(r"[^a-z0-9]", "", w) for w in name.lower().split()]
    words = [w for w in words if w and w not in ("nvidia", "geforce", "tesla")]
    return "-".join(words) or "gpu"


def default_out():
    """figures/data/bench_<gpu>.json (bench_sim.json in the simulator)."""
    name = gpu_short_name(nbflash.info()["gpu"] or "gpu") if MODE == "gpu" else "sim"
    return Path("figures") / "data" / f"bench_{name}.json"


def _git_commit():
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown", None
    if head.returncode != 0:
        return "unknown", None
    return head.stdout.strip(), bool(dirty.stdout.strip()) if dirty.returncode == 0 else None


def _meta(params, command):
    info = nbflash.info()
    commit, dirty = _git_commit()
    return {"gpu": info["gpu"] if MODE == "gpu" else "simulator", "mode": MODE,
            "device": {k: v for k, v in info.items() if k != "versions"},
            "versions": info["versions"],
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "git_commit": commit, "git_dirty": dirty, "command": command,
            "params": params}


def _load(path):
    with open(path) as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or not isinstance(doc.get("records"), list):
        raise ValueError(f"{path} is not a bench result (no 'records' list); "
                         "use another --out or --no-resume")
    return doc


def _start_doc(out, resume, meta):
    """A fresh document, or the one at `out` with this run's meta (earlier runs' meta kept)."""
    doc = {"meta": meta, "records": [], "host_overhead_us": {}}
    if out is None or not resume or not Path(out).exists():
        return doc
    old = _load(out)
    earlier = old.get("meta", {}).pop("earlier_runs", [])
    doc["meta"]["earlier_runs"] = earlier + [old.get("meta", {})]
    doc["records"] = old["records"]
    doc["host_overhead_us"] = old.get("host_overhead_us", {})
    return doc


def write_json(path, doc):
    """Write atomically: a temporary file next to `path`, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def _record(point, fields):
    rec = {"impl": point.impl, "dtype": point.dtype, "B": point.B, "H": point.H, "N": point.N,
           "d": point.d, "causal": point.causal, "pass": point.pass_,
           "dropout_p": point.dropout_p, "padding": point.padding, "density": point.density,
           "block_size": point.block_size}
    if point.density is not None:
        rec["block_density"] = sparsity.density(block_mask(point.N, point.density,
                                                           point.block_size))
    rec.update({"median_ms": None, "tflops": None, **fields})
    return rec


class _Recorder:
    """Puts each finished point into the document, replacing an earlier record of it, writes
    the file, and advances the progress bar."""

    def __init__(self, doc, out, progress, task):
        self.doc, self.out, self.progress, self.task = doc, out, progress, task
        self.index = {_key(r): i for i, r in enumerate(doc["records"])}

    def describe(self, text):
        self.progress.update(self.task, description=text)

    def add(self, point, fields):
        rec = _record(point, fields)
        key = _key(rec)
        if key in self.index:
            self.doc["records"][self.index[key]] = rec
        else:
            self.index[key] = len(self.doc["records"])
            self.doc["records"].append(rec)
        if self.out is not None:
            write_json(self.out, self.doc)
        self.progress.advance(self.task)


# -- the run ----------------------------------------------------------------------------------

def _label(p, impl=True):
    opts = options_label(*p.options())
    return (f"{p.impl + ' ' if impl else ''}{p.dtype} d={p.d} N={p.N} "
            f"{'causal' if p.causal else 'full'} B={p.B} H={p.H}{', ' + opts if opts else ''}")


def _series(p):
    """A point's series: the same impl, dtype, head dim, causality, options and pass at other
    N (what give_up_ms stops)."""
    return (p.impl, p.dtype, p.d, p.causal, p.pass_, *p.options())


def _give_up(slow, p, fields, give_up_ms):
    """Note in `slow` when a timed point took longer than give_up_ms (None: never give up)."""
    ms = fields.get("median_ms")
    earlier = slow.get(_series(p))
    if (give_up_ms is not None and fields.get("status") == "ok" and ms and ms > give_up_ms
            and (earlier is None or earlier[0] > p.N)):
        slow[_series(p)] = (p.N, f"skipped: {p.impl} took {ms:.0f} ms at N={p.N}, over "
                                 f"give_up_ms={give_up_ms:g}")


def _run_impl(group, points, rec, repeats, warmup, slow=None, give_up_ms=None):
    """Check, then time each pass of one impl on one group."""
    impl, causal = points[0].impl, points[0].causal
    with contextlib.ExitStack() as stack:
        try:
            runner = make_runner(impl, causal, points[0].dtype, group)
            stack.enter_context(runner.context())
        except Exception as exc:  # noqa: BLE001
            for p in points:
                rec.add(p, _failure(exc))
            return
        rec.describe(f"check {_label(points[0])}")
        passes = [p.pass_ for p in points]
        results = measure_passes(runner, group, passes, repeats, warmup, lambda i: rec.describe(
            f"time {points[i].pass_} {_label(points[i])}"))
        for p, fields in zip(points, results):
            if slow is not None:
                _give_up(slow, p, fields, give_up_ms)
            rec.add(p, fields)
            _free_memory(collect=fields["status"] != "ok")


def _run_group(points, rec, repeats, warmup, slow=None, give_up_ms=None):
    """All pending points of one problem: inputs and reference once, then each impl. A point
    whose series gave up at a smaller N (slow: series -> (N, why)) is recorded as skipped."""
    if slow:
        skip = [p for p in points if _series(p) in slow and slow[_series(p)][0] < p.N]
        for p in skip:
            rec.add(p, {"status": "skipped", "error": slow[_series(p)][1]})
        points = [p for p in points if p not in skip]
        if not points:
            return
    rec.describe(f"inputs and reference: {_label(points[0], impl=False)}")
    try:
        group = Group(*points[0].group())
    except Exception as exc:  # noqa: BLE001
        fields = _failure(exc, "inputs or float64 reference: ")
        for p in points:
            rec.add(p, fields)
        _free_memory(collect=True)
        return
    by_impl = {}
    for p in points:
        by_impl.setdefault(p.impl, []).append(p)
    for impl_points in by_impl.values():
        _run_impl(group, impl_points, rec, repeats, warmup, slow, give_up_ms)
    del group
    _free_memory(collect=True)


def _check_options(dropout, densities, block_size):
    """ValueError for options the grid cannot take."""
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1); got {dropout}")
    bad = [x for x in densities or () if not 0 <= x <= 1]
    if bad:
        raise ValueError(f"densities must be in [0, 1]; got {bad}")
    if int(block_size) != block_size or block_size < 1:
        raise ValueError(f"block_size must be a positive integer; got {block_size}")


def _row_chunks_of_grid(tokens, hidden, Ns, ds):
    """{"N=<N> d=<d>": the reference's query rows per chunk (None: all at once)}."""
    return {f"N={N} d={d}": reference_row_chunk(*problem_size(tokens, hidden, N, d), N, N)
            for N in Ns for d in ds}


def run(*, impls=None, dtypes=DTYPES, Ns=None, ds=None, causal=(False, True), passes=PASSES,
        tokens=None, hidden=None, repeats=None, warmup=None, dropout=0.0, padding=False,
        densities=None, block_size=None, out=None, resume=True, host_overhead=True,
        progress=True, command=None, console=None, give_up_ms=None):
    """Benchmark the grid; returns {"meta", "records", "host_overhead_us"} (see the module doc).

    impls: default every nbflash impl, plus torch and torch-flash when torch runs here.
    Ns, ds, tokens, hidden, repeats, warmup, block_size: default per device mode (GPU_DEFAULTS,
    SIM_DEFAULTS). dropout: dropout probability of every point (seed DROPOUT_SEED). padding: key
    lengths from U[N-20, N] (key_lengths). densities: block-sparse points at these densities
    (block_mask) instead of dense ones; None: dense.
    out: JSON path, rewritten after every point (None: no file). resume: keep the records at
    `out` and skip the points there with status ok, oom or unsupported. host_overhead: also
    measure the host time per call (measure_host_overhead). progress: show a progress bar.
    give_up_ms: once a point's median time exceeds it, the larger N of the same series (impl,
    dtype, d, causal, pass, options) are recorded as "skipped" instead of measured (a slow impl
    at long sequences would take minutes per point); None: measure everything.
    """
    if MODE == "compile":
        raise RuntimeError("bench runs kernels: use NBFLASH_DEVICE=gpu or sim")
    d0 = defaults()
    impls = tuple(impls or default_impls())
    unknown = [i for i in impls if i not in known_impls()]
    if unknown:
        raise ValueError(f"unknown impls {unknown}; known: {known_impls()}")
    unknown = [p for p in passes if p not in PASSES]
    if unknown:
        raise ValueError(f"unknown passes {unknown}; use {PASSES}")
    block_size = block_size or d0["block_size"]
    _check_options(dropout, densities, block_size)
    params = {"impls": list(impls), "dtypes": [np.dtype(t).name for t in dtypes],
              "Ns": list(Ns or d0["Ns"]), "ds": list(ds or d0["ds"]),
              "causal": [bool(c) for c in causal], "passes": list(passes),
              "tokens": tokens or d0["tokens"], "hidden": hidden or d0["hidden"],
              "repeats": repeats or d0["repeats"],
              "warmup": d0["warmup"] if warmup is None else warmup,
              "dropout_p": float(dropout), "padding": bool(padding),
              "densities": [float(x) for x in densities] if densities else None,
              "block_size": int(block_size) if densities else None,
              "option_seeds": {"dropout": DROPOUT_SEED, "padding": PADDING_SEED,
                               "block_mask": BLOCK_MASK_SEED},
              "rotate_bytes": ROTATE_BYTES, "copies": [MIN_COPIES, MAX_COPIES],
              "check": "batch 0, heads 0-1 vs float64 naive", "factors": FACTORS,
              "reference": reference_note(), "reference_chunk_bytes": REFERENCE_CHUNK_BYTES,
              "reference_row_chunk": _row_chunks_of_grid(tokens or d0["tokens"],
                                                         hidden or d0["hidden"],
                                                         Ns or d0["Ns"], ds or d0["ds"]),
              "host_overhead": _host_cfg(), "give_up_ms": give_up_ms}
    command = command or shlex.join([sys.executable, *sys.argv])
    doc = _start_doc(out, resume, _meta(params, command))

    points = grid_points(impls=impls, dtypes=params["dtypes"], Ns=params["Ns"],
                         ds=params["ds"], causal=params["causal"], passes=passes,
                         tokens=params["tokens"], hidden=params["hidden"],
                         dropout_p=params["dropout_p"], padding=params["padding"],
                         densities=params["densities"] or (None,),
                         block_size=params["block_size"])
    done = {_key(r) for r in doc["records"] if r.get("status") in FINAL}
    todo = [p for p in points if _key(_record(p, {})) not in done]
    groups = {}
    for p in todo:
        groups.setdefault(p.group(), []).append(p)

    from rich.progress import (BarColumn, MofNCompleteColumn, Progress,  # noqa: PLC0415
                               TextColumn, TimeElapsedColumn, TimeRemainingColumn)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with _exact_float32(), Progress(*columns, console=console or _console(),
                                    disable=not progress) as bar:
        task = bar.add_task("bench", total=len(todo))
        rec = _Recorder(doc, out, bar, task)
        slow = {}
        for r in doc["records"]:      # series that gave up in the run this one resumes
            if r.get("status") in ("ok", "skipped"):
                p = Point(r["impl"], r["dtype"], r["B"], r["H"], r["N"], r["d"],
                          bool(r["causal"]), r["pass"], *_options(r))
                _give_up(slow, p, r, give_up_ms)
        for group_points in groups.values():
            _run_group(group_points, rec, params["repeats"], params["warmup"], slow, give_up_ms)
        if host_overhead:
            rec.describe("host overhead")
            doc["host_overhead_us"].update(measure_host_overhead(impls))
    if out is not None:
        write_json(out, doc)
    return doc


# -- host overhead ----------------------------------------------------------------------------

def _host_cfg():
    return dict(GPU_HOST if MODE == "gpu" else SIM_HOST)


def _host_us(prepare, calls, warmup, sync_every):
    """Median microseconds of host time of one call: time.perf_counter() around the call only,
    no synchronization inside; the queue is drained every `sync_every` calls, outside."""
    for _ in range(warmup):      # first calls compile kernels
        prepare()()
    _sync()
    times = []
    for i in range(calls):
        if i and i % sync_every == 0:
            _sync()
        call = prepare()
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    _sync()
    return statistics.median(times) * 1e6


def _host_overhead_of(runner, copies, cfg):
    """{"forward": us, "backward": us} of one runner on one input copy."""
    out = {}
    with runner.context():
        for name, pass_ in (("forward", "fwd"), ("backward", "bwd")):
            out[name] = _host_us(lambda p=pass_: runner.timed(p, copies, 0), cfg["calls"],
                                 cfg["warmup"], cfg["sync_every"])
    return out


#: the dtype each impl's host time is measured in: float32, except where an impl takes 16-bit
#: inputs only
HOST_DTYPES = {"tc": "float16"}


def measure_host_overhead(impls, cfg=None):
    """{impl: {"forward": us, "backward": us, "dtype"}} at a tiny problem (GPU_HOST / SIM_HOST)
    in float32 (HOST_DTYPES: float16 for tc); with torch on the GPU also "<impl>+torch": the
    nbflash impl called with torch tensors. An impl that cannot run gets None times, its status
    and the message."""
    cfg = cfg or _host_cfg()
    B, H, N, d = cfg["shape"]
    dtype_of = {impl: HOST_DTYPES.get(impl, "float32") for impl in impls}
    copies = {dt: _make_copies(_xp(), (B, H, N, d), np.dtype(dt), 1, seed=1)
              for dt in set(dtype_of.values())}
    torch = _torch()
    # torch-flash takes no float32: torch's default choice stands for torch here
    cases = [(impl, impl, copies[dtype_of[impl]]) for impl in impls if impl != "torch-flash"]
    if torch is not None:
        cases += [(f"{impl}+torch", impl,
                   [tuple(torch.from_dlpack(x) for x in copies[dtype_of[impl]][0])])
                  for impl in impls if impl in nbflash_impls()]
    result = {}
    with _exact_float32():
        for name, impl, inp in cases:
            dtype = dtype_of[impl]
            try:
                result[name] = {**_host_overhead_of(make_runner(impl, False, dtype), inp, cfg),
                                "dtype": dtype}
            except Exception as exc:  # noqa: BLE001
                result[name] = {"forward": None, "backward": None, "dtype": dtype,
                                **_failure(exc)}
            _free_memory()
    return result


# -- on screen --------------------------------------------------------------------------------

def _console():
    from rich.console import Console  # noqa: PLC0415
    # piped output (CI logs, the GPU machine) gets 120 columns instead of rich's default 80
    return Console() if sys.stdout.isatty() else Console(width=120)


def _fmt(x, decimals):
    """Fixed decimals, or three significant digits for the simulator's tiny numbers."""
    return f"{x:.{decimals}f}" if x >= 10.0 ** -decimals else f"{x:.2e}"


def _ratio(a, b):
    return _fmt(a / b, 2) if a and b else ""


def _where(r):
    opts = options_label(*_options(r))
    return f"{r['dtype']} d={r['d']} N={r['N']}{' ' + opts if opts else ''}"


def _table(recs, title):
    """One table of records that share their options."""
    from rich.table import Table  # noqa: PLC0415
    tflops = {_key(r): r["tflops"] for r in recs if r["status"] == "ok"}
    table = Table(title=title)
    for col in ("impl", "dtype", "d", "N", "causal", "pass", "median ms", "TFLOP/s", "vs torch",
                "vs naive", "status"):
        table.add_column(col, justify="left" if col in ("impl", "status") else "right")
    for r in recs:
        key = _key(r)
        t = tflops.get(key)
        table.add_row(r["impl"], r["dtype"], str(r["d"]), str(r["N"]),
                      "on" if r["causal"] else "off", r["pass"],
                      _fmt(r["median_ms"], 3) if t else "", _fmt(t, 2) if t else "",
                      _ratio(t, tflops.get(("torch", *key[1:]))) if r["impl"] != "torch" else "",
                      _ratio(t, tflops.get(("naive", *key[1:]))) if r["impl"] != "naive" else "",
                      r["status"] + (" (unchecked)" if r.get("check_skipped") else ""))
    return table


def print_table(doc, console=None):
    """The records as tables, one per set of options (named in its title): time, TFLOP/s (dense
    FLOPs), and the ratio to torch and to naive (same dtype, problem, options and pass); then the
    messages of the points that failed, and why some outputs went unchecked."""
    console = console or _console()
    recs = sorted(doc["records"], key=lambda r: (r["dtype"], r["d"], r["causal"],
                                                 PASSES.index(r["pass"]), r["N"], r["impl"]))
    by_options = {}
    for r in recs:
        by_options.setdefault(options_label(*_options(r)), []).append(r)
    for label in sorted(by_options):    # dense ('') first
        title = f"nbflash bench on {doc['meta']['gpu']}{': ' + label if label else ''}"
        console.print(_table(by_options[label], title))
    # each distinct failure, and each reason for an unchecked output, once with where
    notes = {}
    for r in recs:
        if r["status"] != "ok" and r.get("error"):
            notes.setdefault((r["impl"], r["status"], r["error"]), []).append(r)
        elif r.get("check_skipped"):
            notes.setdefault((r["impl"], "unchecked", r["check_skipped"]), []).append(r)
    for (impl, status, error), rs in notes.items():
        where = ", ".join(sorted({_where(r) for r in rs}))
        console.print(f"{impl} {status} x{len(rs)} ({where}): {error[:300]}", style="dim",
                      markup=False, highlight=False)
    if doc["meta"].get("mode") != "gpu":
        console.print("Simulator times are of Python threads on the CPU, not of a GPU.")


def print_host_overhead(doc, console=None):
    """The host time per call as a table."""
    from rich.table import Table  # noqa: PLC0415
    from rich.text import Text  # noqa: PLC0415  (messages are not markup)
    console = console or _console()
    hosts = doc.get("host_overhead_us") or {}
    if not hosts:
        return
    cfg = doc["meta"].get("params", {}).get("host_overhead") or _host_cfg()
    B, H, N, d = cfg["shape"]
    table = Table(title=f"host time per call, µs (B={B} H={H} N={N} d={d} float32 unless "
                        f"noted, median of {cfg['calls']})")
    for col in ("impl", "forward", "backward", "note"):
        table.add_column(col, justify="left" if col in ("impl", "note") else "right")
    for impl, h in hosts.items():
        table.add_row(impl, *(f"{h[k]:.1f}" if h.get(k) is not None else "-"
                              for k in ("forward", "backward")),
                      Text(f"{h['status']}: {h.get('error', '')[:80]}" if "status" in h else
                           (h["dtype"] if h.get("dtype", "float32") != "float32" else "")))
    console.print(table)


# -- for the experiments (experiments/), which measure with this harness ------------------------

run_meta = _meta
record_options = _options
failure = _failure
free_memory = _free_memory
to_host = _to_host
xp = _xp
