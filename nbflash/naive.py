"""Standard attention with plain array operations: the baseline, and (in float64) the reference.

    S = τ Q Kᵀ,  P = softmax(MASK(S)),  O = P V

and its backward from the saved lse (P is recomputed from it, as every implementation here does):

    dV = Pᵀ dO,  dP = dO Vᵀ,  D = rowsum(dO ∘ O),  dS = P ∘ (dP - D),  dQ = τ dS K,  dK = τ dSᵀ Q

These materialise the N x N matrices S, P, dP and dS in device memory: that is the point of the
baseline. The functions take NumPy or CuPy arrays (the module of q is used throughout) of any
float dtype, float64 included, and check nothing: :mod:`nbflash.api` checks the inputs of
``impl="naive"``. Each matrix product takes inputs in the array dtype and returns that dtype,
accumulating in float32 (float64 for float64), as cuBLAS does; softmax is computed in float32.
So the float16 baseline rounds S, P and dS to float16, as a user's float16 attention would.

Masks and dropout, as the kernels apply them (nbflash.attention_forward documents the options):
MASK(S) sets to -inf every entry that the causal mask, the sliding window, the key lengths or the
block mask hide;
dropout multiplies P by Z / (1 - p) after the softmax, with Z the keep mask of nbflash.rng (the
kernels' generator, run here on whole arrays), so that

    O = (P ∘ Z / (1-p)) V,  dV = (P ∘ Z / (1-p))ᵀ dO,  dP = (dO Vᵀ) ∘ Z / (1-p),
    D = rowsum(dO ∘ O),  dS = P ∘ (dP - D)

(the FlashAttention paper's Algorithms 2 and 4). `keep` gives Z explicitly instead (the tests
pass the mask the kernels exported, nbflash.dropout_mask).

Non-finite values, as the kernels treat them (nbflash.kernels.common.softmax): which keys a row
sees is decided by the masks alone, and keys past key_lengths[b] are never read (zeroed here, so
that nothing stored there reaches an output). Scores are float32 in every kernel, so a q·kᵀ or
τ q·kᵀ beyond float32's range (3.4e38) is ±inf; the float64 reference applies that range to both
too, and so is the reference of what the kernels compute (fa2 and tc keep scores in base 2, τ q·kᵀ log2 e, and
overflow from 2.4e38; the float16 baseline rounds S to float16 and overflows from 65504, as any
float16 attention would). A row that sees no key gets o = 0, lse = -inf and
zero gradients. Every other row gets IEEE arithmetic's softmax over its visible keys: a NaN
score, a +inf one, or visible scores that are all -inf (q·kᵀ overflowed) make its o and lse NaN;
NaN and inf then flow through the backward's products. A masked entry is an exact 0 of P and
dS, and 0 · NaN is NaN, so in these dense products a non-finite value in k, v or dO (or a NaN
row's D) also reaches gradients of rows and keys that do not depend on it (the kernels do the
same within a tile).

Grouped-query and multi-query heads: k and v may have H_kv heads, H_kv dividing q's H; query
head h reads key/value head h // (H / H_kv). The baseline repeats K and V over each group (as
a user without grouped-query kernels would), and the backward sums the group's dK and dV in
float32 (float64 for float64) before rounding them once to the dtype, so dk and dv have
k's H_kv heads. Masks and dropout stay functions of the query head.

Row chunks (`row_chunk=R`, forward and backward): the same results with memory bounded by
R x Nk per matrix instead of Nq x Nk, for a reference at sequence lengths where the N x N
float64 matrices do not fit (nbflash.bench uses it there). The query rows are taken R at a time,
each chunk with exactly the masks of its rows in the whole problem: the causal mask at their
absolute row indices, the key lengths, the block mask expanded for those rows, and the dropout
mask's rows (nbflash.rng.keep_mask draws only those; an explicit `keep` is sliced, or called
with the chunk's slice of rows when it is a function). o, lse and dq are computed row by row
with the same operations as without chunks: the same bits, except where BLAS, which picks its
kernel by the matrices' shapes, sums a chunk's dot products in another order (a few roundings;
seen with chunks of 1 or 7 rows in NumPy, 1 row in CuPy). dK and dV are sums over the rows, so
each chunk's share is accumulated in float32 (float64 for float64) and rounded to the dtype
once at the end: they differ from the unchunked results in the order of that sum (float64:
~1e-15 relative; float16/float32: the last bits). The default, row_chunk=None, is the baseline
as described above, every matrix N x N at once.
"""

import contextlib
import math

import numpy as np

from . import rng, sparsity
from .kernels.common.layouts import batch_view, unbatch_view


def array_module(x):
    """numpy or cupy, whichever `x` belongs to (without importing CuPy for NumPy arrays)."""
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy  # noqa: PLC0415
        return cupy
    return np


def _acc_dtype(dtype):
    return np.float64 if dtype == np.float64 else np.float32


def _mm(a, b):
    """a @ b with inputs in their dtype, accumulated in float32 (float64), result in a's dtype."""
    xp = array_module(a)
    if xp is np and a.dtype == np.float16:  # NumPy has no float16 GEMM that accumulates wider
        return (a.astype(np.float32) @ b.astype(np.float32)).astype(np.float16)
    return xp.matmul(a, b)


def _t(x):
    return x.swapaxes(-1, -2)


def _row_index(N, rows, xp):
    """The indices of `rows` (a slice, None: all) of range(N), as an xp array."""
    r = range(int(N)) if rows is None else range(int(N))[rows]
    return xp.arange(r.start, r.stop, r.step)


def causal_visible(Nq, Nk, xp=np, rows=None):
    """Boolean (Nq, Nk): key j visible to query i, bottom-right aligned: j <= i + Nk - Nq.
    rows: a slice of the query rows (None: all): those rows only, at their absolute i."""
    i = _row_index(Nq, rows, xp)[:, None]
    j = xp.arange(Nk)[None, :]
    return j <= i + (Nk - Nq)


def window_visible(Nq, Nk, window_size, xp=np, rows=None):
    """Boolean (Nq, Nk) (rows: those rows only, at their absolute i): key j inside query i's
    sliding window (left, right), i + Nk - Nq - left <= j <= i + Nk - Nq + right, a side of
    -1 unbounded (FlashAttention's window_size)."""
    left, right = window_size
    diag = _row_index(Nq, rows, xp)[:, None] + (Nk - Nq)
    j = xp.arange(Nk)[None, :]
    vis = xp.ones((diag.shape[0], Nk), dtype=bool)
    if left >= 0:
        vis = vis & (j >= diag - left)
    if right >= 0:
        vis = vis & (j <= diag + right)
    return vis


def keys_read(key_lengths, Nk, xp=np):
    """Boolean (B, 1, 1, Nk): key j of batch entry b is below key_lengths[b]."""
    return xp.arange(Nk).reshape(1, 1, 1, Nk) < xp.asarray(key_lengths).reshape(-1, 1, 1, 1)


def visible(B, H, Nq, Nk, xp=np, causal=False, key_lengths=None, block_mask=None,
            block_size=None, rows=None, window_size=(-1, -1)):
    """Boolean mask broadcastable to (B, H, Nq, Nk): entries that no mask hides (None: all).
    window_size: (left, right), -1 unbounded (:func:`window_visible`; with causal, both apply).
    key_lengths: integers (B,), keys from key_lengths[b] on hidden for batch entry b.
    block_mask: (n_q_blocks, n_k_blocks) with optional leading (H,) or (B|1, H|1) axes, at
    block_size = (bq, bk). rows: a slice of the query rows (None: all): the mask of those rows
    only, visible(...)[..., rows, :] (the causal mask at their absolute row indices, the block
    mask expanded for them alone)."""
    vis = causal_visible(Nq, Nk, xp, rows) if causal else None
    if tuple(window_size) != (-1, -1):
        win = window_visible(Nq, Nk, window_size, xp, rows)
        vis = win if vis is None else vis & win
    if key_lengths is not None:
        pad = keys_read(key_lengths, Nk, xp)
        vis = pad if vis is None else vis & pad
    if block_mask is not None:
        blk = sparsity.expand(block_mask, block_size, Nq, Nk, xp, rows)
        vis = blk if vis is None else vis & blk
    return vis


def _masks(q, k, causal, dropout_p, seed, offset, keep, rows=None, **mask_opts):
    """(visible or None, keep-and-scale factor Z/(1-p) in the accumulation dtype, or None), for
    the query rows `rows` (a slice; None: all) of the problem of q and k."""
    xp = array_module(q)
    B, H, Nq = q.shape[:3]
    Nk = k.shape[2]
    vis = visible(B, H, Nq, Nk, xp, causal, rows=rows, **mask_opts)
    if callable(keep):
        keep = keep(slice(0, Nq) if rows is None else rows)
    elif keep is not None and rows is not None:
        keep = keep[..., rows, :]
    if keep is None and dropout_p > 0:
        keep = rng.keep_mask(xp, B, H, Nq, Nk, dropout_p, seed, offset, rows=rows)
    z = None
    if keep is not None:
        acc = _acc_dtype(q.dtype)
        z = xp.where(xp.asarray(keep, dtype=bool), acc(1.0 / (1.0 - dropout_p)), acc(0))
    return vis, z


#: the largest float32: scores beyond it are ±inf in every kernel, and in the float64 reference
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _float32_range(xp, S):
    """S with the entries beyond float32's range made ±inf."""
    return xp.where(xp.abs(S) > FLOAT32_MAX, xp.copysign(np.inf, S), S)


def alibi_bias(alibi_slopes, Nq, Nk, xp=np, rows=None):
    """ALiBi's bias, broadcastable to (B, H, Nq, Nk) (rows: those query rows only, at their
    absolute i): -slope[b, h]·|i + Nk - Nq - j| for slopes of shape (H,) or (B, H)."""
    slopes = xp.asarray(alibi_slopes)
    slopes = slopes.reshape((1,) * (2 - slopes.ndim) + slopes.shape)[..., None, None]
    dist = xp.abs(_row_index(Nq, rows, xp)[:, None] + (Nk - Nq) - xp.arange(Nk)[None, :])
    return -slopes * dist


def _scores(q, k, vis, scale, softcap=0.0, with_tanh=False, bias=None):
    """S = τ Q Kᵀ in the accumulation dtype, hidden entries -inf; in float64, entries beyond
    float32's range ±inf (the scores' range in every impl: see the module docstring). softcap:
    S = softcap·tanh(τ Q Kᵀ / softcap) instead; with_tanh: (S, that tanh or None), the tanh
    for the backward's factor 1 - tanh². bias: added after the softcap (ALiBi's, alibi_bias)."""
    xp = array_module(q)
    acc = _acc_dtype(q.dtype)
    S = _mm(q, _t(k)).astype(acc)
    if acc == np.float64:   # q·kᵀ, then τ q·kᵀ, each in float32's range, as the kernels hold them
        S = _float32_range(xp, _float32_range(xp, S) * acc(scale))
    else:
        S = S * acc(scale)
    T = None
    if softcap:
        T = xp.tanh(S / acc(softcap))
        S = acc(softcap) * T
    if bias is not None:
        S = S + bias.astype(acc)
    if vis is not None:
        S = xp.where(vis, S, acc(-np.inf))
    return (S, T) if with_tanh else S


def _scale(q, softmax_scale):
    return 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)


def row_chunks(Nq, row_chunk):
    """The slices of query rows that `row_chunk` rows at a time cover, in order (the last one
    shorter when row_chunk does not divide Nq); one slice of all rows for None."""
    if row_chunk is None:
        return [slice(0, Nq)]
    if int(row_chunk) != row_chunk or row_chunk < 1:
        raise ValueError(f"row_chunk must be a positive integer or None; got {row_chunk!r}")
    row_chunk = int(row_chunk)
    return [slice(r, min(r + row_chunk, Nq)) for r in range(0, Nq, row_chunk)]


def _ieee(xp):
    """NumPy's warnings off for the non-finite arithmetic that the rule below relies on."""
    return np.errstate(invalid="ignore", over="ignore", divide="ignore") if xp is np \
        else contextlib.nullcontext()


def _sees_a_key(vis, shape, xp):
    """(..., rows, 1): does the row see any key? Decided by the masks alone (all rows without)."""
    if vis is None:
        return xp.ones(shape[:-1] + (1,), dtype=bool)
    return xp.broadcast_to(vis, shape).any(axis=-1, keepdims=True)


def _unread_keys_zeroed(k, v, key_lengths):
    """k, v with the keys past key_lengths[b] set to 0: the kernels never read them, so that
    nothing there (NaN included) reaches any output."""
    if key_lengths is None:
        return k, v
    xp = array_module(k)
    read = _t(keys_read(key_lengths, k.shape[2], xp))     # (B, 1, Nk, 1)
    return xp.where(read, k, k.dtype.type(0)), xp.where(read, v, v.dtype.type(0))


def _group(q, k):
    """Query heads per key/value head: H / H_kv (1 without grouped-query heads)."""
    return q.shape[1] // k.shape[1]


def _repeat_kv(x, group):
    """k or v with each head repeated over its group of query heads (head h of the result is
    head h // group of x)."""
    return x if group == 1 else array_module(x).repeat(x, group, axis=1)


def _group_sum(x, group):
    """The sum of each group's `group` consecutive heads of x: dK, dV back on k's heads."""
    if group == 1:
        return x
    B, H = x.shape[:2]
    return x.reshape((B, H // group, group) + x.shape[2:]).sum(axis=2)


def _bias(alibi_slopes, q, k, rows=None):
    """ALiBi's bias for the query rows `rows` of the problem of q and k, or None."""
    if alibi_slopes is None:
        return None
    return alibi_bias(alibi_slopes, q.shape[2], k.shape[2], array_module(q), rows)


def _forward_rows(q, k, v, vis, z, scale, softcap=0.0, bias=None):
    """(o, lse) of the rows of q given, with their masks, by the non-finite rule (module
    docstring): rows that see no key 0 and -inf; otherwise IEEE softmax over the visible keys,
    so that a NaN score, a +inf one, or visible scores that are all -inf make the row NaN."""
    xp = array_module(q)
    acc = _acc_dtype(q.dtype)
    with _ieee(xp):
        S = _scores(q, k, vis, scale, softcap, bias=bias)
        sees = _sees_a_key(vis, S.shape, xp)
        m = xp.where(sees, S.max(axis=-1, keepdims=True), acc(0))   # NaN if a score is NaN
        E = xp.exp(S - m)                          # NaN where m is ±inf (inf - inf)
        ell = E.sum(axis=-1, keepdims=True)
        P = xp.where(sees, E / xp.where(sees, ell, acc(1)), acc(0))
        if z is not None:
            P = P * z
        o = xp.where(sees, _mm(P.astype(q.dtype), v), q.dtype.type(0))   # (masked 0 · inf)
        lse = xp.where(sees, m + xp.log(xp.where(sees, ell, acc(1))), acc(-np.inf))[..., 0]
    return o, lse.astype(acc)


def attention_forward(q, k, v, *, causal=False, softmax_scale=None, dropout_p=0.0, seed=None,
                      offset=0, keep=None, key_lengths=None, block_mask=None, block_size=None,
                      row_chunk=None, softcap=0.0, window_size=(-1, -1), alibi_slopes=None):
    """(o, lse): o in q's dtype, lse (B, H, Nq) in float32 (float64 for float64 inputs).
    lse is the softmax's, before dropout. softcap > 0: scores softcap·tanh(τ q·k / softcap)
    (Gemma 2's softcapping; 0: off). window_size: a sliding window (left, right), -1
    unbounded (:func:`window_visible`). alibi_slopes: (H,) or (B, H), ALiBi's bias
    (:func:`alibi_bias`) added to the scores after the softcap.

    row_chunk: None (the baseline: every matrix N x N at once), or the number of query rows
    computed at a time (see the module docstring: the same results, in memory bounded by
    row_chunk x Nk per matrix). keep may also be a function of a slice of rows returning those
    rows of the mask."""
    scale = _scale(q, softmax_scale)
    masking = dict(key_lengths=key_lengths, block_mask=block_mask, block_size=block_size,
                   window_size=window_size)
    group = _group(q, k)
    k, v = (_repeat_kv(x, group) for x in _unread_keys_zeroed(k, v, key_lengths))
    if row_chunk is None:
        vis, z = _masks(q, k, causal, dropout_p, seed, offset, keep, **masking)
        return _forward_rows(q, k, v, vis, z, scale, softcap, _bias(alibi_slopes, q, k))
    xp = array_module(q)
    Nq = q.shape[2]
    o = xp.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype)
    lse = xp.empty(q.shape[:-1], dtype=_acc_dtype(q.dtype))
    for rows in row_chunks(Nq, row_chunk):
        vis, z = _masks(q, k, causal, dropout_p, seed, offset, keep, rows=rows, **masking)
        o[..., rows, :], lse[..., rows] = _forward_rows(q[..., rows, :], k, v, vis, z, scale,
                                                        softcap, _bias(alibi_slopes, q, k, rows))
        del vis, z
    return o, lse


def attention(q, k, v, **options):
    return attention_forward(q, k, v, **options)[0]


def _mm_acc(a, b):
    """a @ b with inputs in their dtype, accumulated and returned in float32 (float64): a row
    chunk's share of dK or dV, added up across chunks before the one rounding to the dtype."""
    acc = _acc_dtype(a.dtype)
    if a.dtype == acc:
        return array_module(a).matmul(a, b)
    return array_module(a).matmul(a.astype(acc), b.astype(acc))


def _backward_rows(do, q, k, v, o, lse, vis, z, scale, mm, softcap=0.0, bias=None):
    """(dq, dk, dv) of the rows of do, q, o and lse given, with their masks: dq finished, dk and
    dv as mm(dSᵀ, Q) (τ not applied yet) and mm((P ∘ Z/(1-p))ᵀ, dO)."""
    xp = array_module(q)
    acc = _acc_dtype(q.dtype)
    with _ieee(xp):
        S, T = _scores(q, k, vis, scale, softcap, with_tanh=True, bias=bias)
        lse = lse.astype(acc)[..., None]
        seen = lse != acc(-np.inf)          # rows that see a key (a NaN row stays NaN)
        P = xp.where(seen, xp.exp(S - xp.where(seen, lse, acc(0))), acc(0))
        dP = _mm(do, _t(v)).astype(acc)
        if z is not None:
            dv = mm(_t((P * z).astype(q.dtype)), do)
            dP = dP * z
        else:
            dv = mm(_t(P.astype(q.dtype)), do)
        D = (do.astype(acc) * o.astype(acc)).sum(axis=-1, keepdims=True)
        dS = P * (dP - D)
        if T is not None:    # the softcap's derivative: 1 - tanh²
            dS = dS * (acc(1) - T * T)
        dS = dS.astype(q.dtype)
        dq = (_mm(dS, k).astype(acc) * acc(scale)).astype(q.dtype)
        dk = mm(_t(dS), q)
    return dq, dk, dv


def attention_backward(do, q, k, v, o, lse, *, causal=False, softmax_scale=None, dropout_p=0.0,
                       seed=None, offset=0, keep=None, key_lengths=None, block_mask=None,
                       block_size=None, row_chunk=None, softcap=0.0, window_size=(-1, -1),
                       alibi_slopes=None):
    """(dq, dk, dv) in the input dtype, recomputing P = exp(S - lse) and the dropout mask; dk
    and dv have k's heads (grouped-query: summed over each group's query heads).

    row_chunk: as for attention_forward; dk and dv are then added up across the chunks in
    float32 (float64 for float64) and rounded to the input dtype once, at the end."""
    xp = array_module(q)
    acc = _acc_dtype(q.dtype)
    scale = _scale(q, softmax_scale)
    masking = dict(key_lengths=key_lengths, block_mask=block_mask, block_size=block_size,
                   window_size=window_size)
    group = _group(q, k)
    k, v = (_repeat_kv(x, group) for x in _unread_keys_zeroed(k, v, key_lengths))
    if row_chunk is None:
        vis, z = _masks(q, k, causal, dropout_p, seed, offset, keep, **masking)
        if group == 1:
            dq, dk, dv = _backward_rows(do, q, k, v, o, lse, vis, z, scale, _mm, softcap,
                                        _bias(alibi_slopes, q, k))
            return dq, (dk.astype(acc) * acc(scale)).astype(q.dtype), dv
        # grouped-query heads: each query head's share in float32 (float64), summed over the
        # group, rounded once
        dq, dk, dv = _backward_rows(do, q, k, v, o, lse, vis, z, scale, _mm_acc, softcap,
                                    _bias(alibi_slopes, q, k))
        return (dq, (_group_sum(dk, group) * acc(scale)).astype(q.dtype),
                _group_sum(dv, group).astype(q.dtype))
    Nq = q.shape[2]
    dq = xp.empty(q.shape, dtype=q.dtype)
    dk = xp.zeros(k.shape, dtype=acc)
    dv = xp.zeros(v.shape, dtype=acc)
    for rows in row_chunks(Nq, row_chunk):
        vis, z = _masks(q, k, causal, dropout_p, seed, offset, keep, rows=rows, **masking)
        dq[..., rows, :], dk_part, dv_part = _backward_rows(
            do[..., rows, :], q[..., rows, :], k, v, o[..., rows, :], lse[..., rows], vis, z,
            scale, _mm_acc, softcap, _bias(alibi_slopes, q, k, rows))
        dk += dk_part
        dv += dv_part
        del vis, z, dk_part, dv_part
    dk, dv = _group_sum(dk, group), _group_sum(dv, group)
    return dq, (dk * acc(scale)).astype(q.dtype), dv.astype(q.dtype)


def _sequences(cu_seqlens_q, cu_seqlens_k):
    """The (query rows, key rows) slices of each sequence of a packed batch."""
    xp = array_module(cu_seqlens_q)
    cq, ck = (np.asarray(c if xp is np else xp.asnumpy(c)).astype(np.int64)
              for c in (cu_seqlens_q, cu_seqlens_k))
    return [(slice(int(cq[b]), int(cq[b + 1])), slice(int(ck[b]), int(ck[b + 1])))
            for b in range(len(cq) - 1)]


def _sequence_options(xp, b, n_seq, H, Nq, Nk, dropout_p, seed, offset, alibi_slopes):
    """Sequence b's dropout keep mask (as the kernels draw it: batch entry b of n_seq) and its
    ALiBi slopes, for a packed batch."""
    keep = None
    if dropout_p > 0:
        keep = lambda rows: rng.keep_mask(xp, n_seq, H, Nq, Nk, dropout_p, seed,  # noqa: E731
                                          offset, rows=rows, batches=slice(b, b + 1))
    slopes = None
    if alibi_slopes is not None:
        slopes = alibi_slopes if alibi_slopes.ndim == 1 else alibi_slopes[b]
    return keep, slopes


def attention_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=False,
                             softmax_scale=None, dropout_p=0.0, seed=None, offset=0,
                             softcap=0.0, window_size=(-1, -1), alibi_slopes=None):
    """(o, lse) of a packed variable-length batch (FlashAttention's varlen): q (total_q, H, d),
    k and v (total_k, H_kv, d), sequence b's rows cu_seqlens_q[b] .. cu_seqlens_q[b+1] - 1 of
    q and cu_seqlens_k[b] .. cu_seqlens_k[b+1] - 1 of k and v; o (total_q, H, d), lse
    (H, total_q). Each sequence is :func:`attention_forward` on its own, its causal mask and
    window bottom-right aligned to its lengths, its dropout mask batch entry b's of a batch of
    B sequences (as the kernels draw it), its ALiBi slopes row b of (B, H) ones."""
    xp = array_module(q)
    H = q.shape[1]
    seqs = _sequences(cu_seqlens_q, cu_seqlens_k)
    o = xp.zeros(q.shape[:2] + v.shape[-1:], dtype=q.dtype)
    lse = xp.full((H, q.shape[0]), -np.inf, dtype=_acc_dtype(q.dtype))
    scale = _scale(q, softmax_scale)
    for b, (sq, sk) in enumerate(seqs):
        nq, nk = sq.stop - sq.start, sk.stop - sk.start
        if nq == 0 or nk == 0:      # no query, or no key to see: o = 0, lse = -inf
            continue
        keep, slopes = _sequence_options(xp, b, len(seqs), H, nq, nk, dropout_p, seed, offset,
                                         alibi_slopes)
        ob, lb = attention_forward(batch_view(q[sq]), batch_view(k[sk]), batch_view(v[sk]),
                                   causal=causal, softmax_scale=scale, dropout_p=dropout_p,
                                   keep=keep, softcap=softcap, window_size=window_size,
                                   alibi_slopes=slopes)
        o[sq] = unbatch_view(ob)
        lse[:, sq] = lb[0]
    return o, lse


def attention_varlen_backward(do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, *, causal=False,
                              softmax_scale=None, dropout_p=0.0, seed=None, offset=0,
                              softcap=0.0, window_size=(-1, -1), alibi_slopes=None):
    """(dq, dk, dv) of :func:`attention_varlen_forward`, sequence by sequence (lse (H,
    total_q)); keys of a sequence without queries, and rows without keys, get zeros."""
    xp = array_module(q)
    H = q.shape[1]
    seqs = _sequences(cu_seqlens_q, cu_seqlens_k)
    dq, dk, dv = (xp.zeros(x.shape, dtype=x.dtype) for x in (q, k, v))
    scale = _scale(q, softmax_scale)
    for b, (sq, sk) in enumerate(seqs):
        nq, nk = sq.stop - sq.start, sk.stop - sk.start
        if nq == 0 or nk == 0:
            continue
        keep, slopes = _sequence_options(xp, b, len(seqs), H, nq, nk, dropout_p, seed, offset,
                                         alibi_slopes)
        grads = attention_backward(*(batch_view(x[s]) for x, s in ((do, sq), (q, sq), (k, sk),
                                                                  (v, sk), (o, sq))),
                                   lse[None, :, sq], causal=causal,
                                   softmax_scale=scale, dropout_p=dropout_p, keep=keep,
                                   softcap=softcap, window_size=window_size,
                                   alibi_slopes=slopes)
        for out, g, s in zip((dq, dk, dv), grads, (sq, sk, sk)):
            out[s] = unbatch_view(g)
    return dq, dk, dv
