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
MASK(S) sets to -inf every entry that the causal mask, the key lengths or the block mask hide;
dropout multiplies P by Z / (1 - p) after the softmax, with Z the keep mask of nbflash.rng (the
kernels' generator, run here on whole arrays), so that

    O = (P ∘ Z / (1-p)) V,  dV = (P ∘ Z / (1-p))ᵀ dO,  dP = (dO Vᵀ) ∘ Z / (1-p),
    D = rowsum(dO ∘ O),  dS = P ∘ (dP - D)

(the FlashAttention paper's Algorithms 2 and 4). `keep` gives Z explicitly instead (the tests
pass the mask the kernels exported, nbflash.dropout_mask).
"""

import math

import numpy as np

from . import rng, sparsity


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


def causal_visible(Nq, Nk, xp=np):
    """Boolean (Nq, Nk): key j visible to query i, bottom-right aligned: j <= i + Nk - Nq."""
    i = xp.arange(Nq)[:, None]
    j = xp.arange(Nk)[None, :]
    return j <= i + (Nk - Nq)


def visible(B, H, Nq, Nk, xp=np, causal=False, key_lengths=None, block_mask=None,
            block_size=None):
    """Boolean mask broadcastable to (B, H, Nq, Nk): entries that no mask hides (None: all).
    key_lengths: integers (B,), keys from key_lengths[b] on hidden for batch entry b.
    block_mask: (n_q_blocks, n_k_blocks) with optional leading (H,) or (B|1, H|1) axes, at
    block_size = (bq, bk)."""
    vis = causal_visible(Nq, Nk, xp) if causal else None
    if key_lengths is not None:
        kl = xp.asarray(key_lengths).reshape(B, 1, 1, 1)
        pad = xp.arange(Nk).reshape(1, 1, 1, Nk) < kl
        vis = pad if vis is None else vis & pad
    if block_mask is not None:
        blk = sparsity.expand(block_mask, block_size, Nq, Nk, xp)
        vis = blk if vis is None else vis & blk
    return vis


def _masks(q, k, causal, dropout_p, seed, offset, keep, **mask_opts):
    """(visible or None, keep-and-scale factor Z/(1-p) in the accumulation dtype, or None)."""
    xp = array_module(q)
    B, H, Nq = q.shape[:3]
    Nk = k.shape[2]
    vis = visible(B, H, Nq, Nk, xp, causal, **mask_opts)
    if keep is None and dropout_p > 0:
        keep = rng.keep_mask(xp, B, H, Nq, Nk, dropout_p, seed, offset)
    z = None
    if keep is not None:
        acc = _acc_dtype(q.dtype)
        z = xp.where(xp.asarray(keep, dtype=bool), acc(1.0 / (1.0 - dropout_p)), acc(0))
    return vis, z


def _scores(q, k, vis, scale):
    """S = τ Q Kᵀ in the accumulation dtype, hidden entries -inf."""
    xp = array_module(q)
    acc = _acc_dtype(q.dtype)
    S = _mm(q, _t(k)).astype(acc) * acc(scale)
    if vis is not None:
        S = xp.where(vis, S, acc(-np.inf))
    return S


def _scale(q, softmax_scale):
    return 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)


def attention_forward(q, k, v, *, causal=False, softmax_scale=None, dropout_p=0.0, seed=None,
                      offset=0, keep=None, key_lengths=None, block_mask=None, block_size=None):
    """(o, lse): o in q's dtype, lse (B, H, Nq) in float32 (float64 for float64 inputs).
    lse is the softmax's, before dropout."""
    xp = array_module(q)
    acc = _acc_dtype(q.dtype)
    vis, z = _masks(q, k, causal, dropout_p, seed, offset, keep, key_lengths=key_lengths,
                    block_mask=block_mask, block_size=block_size)
    S = _scores(q, k, vis, _scale(q, softmax_scale))
    m = S.max(axis=-1, keepdims=True)
    m = xp.where(xp.isfinite(m), m, acc(0))             # rows that see no key: no shift
    E = xp.exp(S - m)
    ell = E.sum(axis=-1, keepdims=True)
    seen = ell > 0
    P = xp.where(seen, E / xp.where(seen, ell, acc(1)), acc(0))
    if z is not None:
        P = P * z
    o = _mm(P.astype(q.dtype), v)
    lse = xp.where(seen, m + xp.log(xp.where(seen, ell, acc(1))), acc(-np.inf))[..., 0]
    return o, lse.astype(acc)


def attention(q, k, v, **options):
    return attention_forward(q, k, v, **options)[0]


def attention_backward(do, q, k, v, o, lse, *, causal=False, softmax_scale=None, dropout_p=0.0,
                       seed=None, offset=0, keep=None, key_lengths=None, block_mask=None,
                       block_size=None):
    """(dq, dk, dv) in the input dtype, recomputing P = exp(S - lse) and the dropout mask."""
    xp = array_module(q)
    acc = _acc_dtype(q.dtype)
    scale = _scale(q, softmax_scale)
    vis, z = _masks(q, k, causal, dropout_p, seed, offset, keep, key_lengths=key_lengths,
                    block_mask=block_mask, block_size=block_size)
    S = _scores(q, k, vis, scale)
    lse = lse.astype(acc)[..., None]
    seen = xp.isfinite(lse)
    P = xp.where(seen, xp.exp(S - xp.where(seen, lse, acc(0))), acc(0))
    dP = _mm(do, _t(v)).astype(acc)
    if z is not None:
        dv = _mm(_t((P * z).astype(q.dtype)), do)
        dP = dP * z
    else:
        dv = _mm(_t(P.astype(q.dtype)), do)
    D = (do.astype(acc) * o.astype(acc)).sum(axis=-1, keepdims=True)
    dS = (P * (dP - D)).astype(q.dtype)
    dq = (_mm(dS, k).astype(acc) * acc(scale)).astype(q.dtype)
    dk = (_mm(_t(dS), q).astype(acc) * acc(scale)).astype(q.dtype)
    return dq, dk, dv
