"""A benchmark problem and its check: the inputs (rotated copies), the float64 reference on a
slice, and the tolerance rule applied before anything is timed.

Before any point is timed, each (impl, dtype, problem) runs once and its o (and dq, dk, dv when a
backward pass is asked for) is compared, on a slice (batch 0, the first two heads: the full
float64 reference would not fit at N = 16k), with a float64 reference computed there by
nbflash.naive. The tolerance rule is the test suite's (nbflash.tolerance): max error <= factor x
the max error of the naive impl run in the same dtype on the same slice, plus a floor of two
roundings at the reference's magnitude; factors o 2, dq 4, dk and dv 3. The reference takes the
point's options: the dropout mask the kernels draw for the problem (nbflash.dropout_mask, which
depends on b·H + h: drawn for the whole heads of the batch entries up to the slice's end, then
sliced like the inputs), the slice's key lengths, the block mask.

Even on the slice, naive's N x N float64 matrices outgrow the GPU from N = 32k on (17 GB each
for two heads, several at once); so when one of them would exceed REFERENCE_CHUNK_BYTES (1 GiB:
N > 8192 for two heads), the reference and the naive impl in the dtype (the rule's baseline)
both take the query rows in chunks (nbflash.naive's row_chunk, :func:`reference_row_chunk`:
equal chunks of at most 1 GiB / (2 heads x N x 8 bytes) rows, 1024 at N = 64k), with each
chunk's rows of every mask, and the dropout mask's rows drawn chunk by chunk on the slice's heads
(nbflash.rng.keep_mask, the array version of the kernels' generator) instead of whole. The
results are those of the unchunked computation (o, lse and dq row by row; dk and dv summed over
the chunks in float32, float64 for the reference); the run's params say how the reference was
computed ("reference", "reference_chunk_bytes", "reference_row_chunk").

Inputs are rotated across several copies (enough that they exceed ~150 MB together, 2.5x the
H200's 60 MB L2, at least 2 and at most 8), so a timed call never finds its inputs still in L2
from the call before. A point that fails its check is recorded with status "error" and its
errors, and is not timed.
"""

import math

import numpy as np

import nbflash
from .. import naive, tolerance
from ..rng import keep_mask
from .device import failure, json_number, to_host, xp
from .grid import PASSES, api_options, flops

#: input rotation: copies enough to exceed this many bytes (2.5x the H200's L2), within bounds
ROTATE_BYTES = 150e6
MIN_COPIES, MAX_COPIES = 2, 8

#: the check slice (batch 0, the first two heads) and the outputs checked there, with their
#: factors in the tolerance rule (nbflash.tolerance, as in the tests)
CHECK_SLICE = (slice(0, 1), slice(0, 2))
FACTORS = {name: tolerance.FACTORS[name] for name in ("o", "dq", "dk", "dv")}
#: the reference on the check slice takes the query rows in chunks (nbflash.naive's row_chunk)
#: when one float64 (slice batch, slice heads, N, N) matrix would exceed this many bytes, each
#: chunk as many rows as keep that matrix within it (2 heads: all rows at once up to N = 8192,
#: then 4096, 2048 and 1024 rows at N = 16k, 32k and 64k)
REFERENCE_CHUNK_BYTES = 2**30


def copies_for(bytes_per_copy):
    """How many input copies to rotate through: their total exceeds ROTATE_BYTES, within
    [MIN_COPIES, MAX_COPIES]."""
    return int(min(MAX_COPIES, max(MIN_COPIES, math.ceil(ROTATE_BYTES / bytes_per_copy))))


def make_copies(xp, shape, dtype, n, seed):
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


def slice_options(options, B, H, N, row_chunk=None):
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
            mod = xp()

            def keep(rows):
                return keep_mask(mod, B, H, N, N, p, seed, offset, rows=rows,
                                 batches=CHECK_SLICE[0], heads=CHECK_SLICE[1])
            out["keep"] = keep
    if "key_lengths" in options:
        out["key_lengths"] = options["key_lengths"][CHECK_SLICE[0]]
    return out


def slice_reference(copy, causal, options=None, row_chunk=None):
    """On the check slice: the float64 reference (o, dq, dk, dv) on the host, and the max errors
    of the naive impl run in the inputs' own dtype against it. options: nbflash.naive's mask and
    dropout arguments for the slice (_slice_options). row_chunk: None, or the query rows per
    chunk (reference_row_chunk) of both, so that no N x N matrix is made."""
    options = {**(options or {}), "row_chunk": row_chunk}
    q, k, v, do = (x[CHECK_SLICE] for x in copy)
    q64, k64, v64, do64 = (x.astype(np.float64) for x in (q, k, v, do))
    o, lse = naive.attention_forward(q64, k64, v64, causal=causal, **options)
    grads = naive.attention_backward(do64, q64, k64, v64, o, lse, causal=causal, **options)
    ref = dict(zip(("o", "dq", "dk", "dv"), (to_host(x) for x in (o, *grads))))
    del o, lse, grads, q64, k64, v64, do64
    o, lse = naive.attention_forward(q, k, v, causal=causal, **options)
    grads = naive.attention_backward(do, q, k, v, o, lse, causal=causal, **options)
    naive_err = {name: max_err(to_host(x), ref[name])
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
        self.copies = make_copies(xp(), self.shape, self.dtype, n, seed=1009 * N + d)
        self.options = api_options(B, N, dropout_p, padding, density, block_size, xp())
        #: query rows per chunk of the reference (None: all at once)
        self.reference_rows = reference_row_chunk(B, H, N, N)
        self.ref, self.naive_err = slice_reference(
            self.copies[0], causal, slice_options(self.options, B, H, N, self.reference_rows),
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
        mod = xp()
        return mod.ascontiguousarray(naive.visible(B, H, N, N, mod, self.causal, **opts))


def compare(group, outputs):
    """Apply the tolerance rule to {name: device array}: the record fields (status "ok" or
    "error", max_err, tolerance)."""
    errs, tols, failures = {}, {}, []
    for name, x in outputs.items():
        err = max_err(to_host(x[CHECK_SLICE]), group.ref[name])
        errs[name], tols[name] = err, group.tolerance(name)
        if not err <= tols[name]:
            failures.append(f"{name}: max err {err:.3g} > allowed {tols[name]:.3g} "
                            f"(naive {group.naive_err[name]:.3g})")
    fields = {"status": "error" if failures else "ok",
              "max_err": {n: json_number(e) for n, e in errs.items()},
              "tolerance": {n: json_number(t) for n, t in tols.items()}}
    if failures:
        fields["error"] = "correctness check failed: " + "; ".join(failures)
    return fields


def verdict(runner, group, outputs):
    """_compare's fields, or, for a runner the reference does not describe (runner.unchecked),
    status "ok" with the reason the outputs were not checked ("check_skipped")."""
    if runner.unchecked:
        return {"status": "ok", "check_skipped": runner.unchecked}
    return compare(group, outputs)


def check(runner, group, backward):
    """Run the impl once on copy 0 and compare with the reference on the check slice.

    Returns {"fwd": fields, "bwd": fields}: the record fields before timing for a forward point
    and for a point that also needs the backward (its max_err includes o's). A backward that
    raises leaves the forward's verdict standing.
    """
    try:
        fwd = verdict(runner, group, {"o": runner.check_forward(group.copies)})
    except Exception as exc:  # noqa: BLE001  (every failure becomes a record)
        fwd = failure(exc, "forward: ")
        return {"fwd": fwd, "bwd": fwd}
    if not backward or fwd["status"] != "ok":
        return {"fwd": fwd, "bwd": fwd}
    try:
        grads = runner.check_backward(group.copies)
        bwd = verdict(runner, group, dict(zip(("dq", "dk", "dv"), grads)))
    except Exception as exc:  # noqa: BLE001
        return {"fwd": fwd, "bwd": failure(exc, "backward: ")}
    for key in ("max_err", "tolerance"):
        if key in fwd:
            bwd[key] = {**fwd[key], **bwd[key]}
    return {"fwd": fwd, "bwd": bwd}
