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
"""

import math

import numpy as np


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


def _scores(q, k, causal, scale):
    """S = τ Q Kᵀ in the accumulation dtype, masked entries -inf."""
    xp = array_module(q)
    acc = _acc_dtype(q.dtype)
    S = _mm(q, _t(k)).astype(acc) * acc(scale)
    if causal:
        S = xp.where(causal_visible(q.shape[-2], k.shape[-2], xp), S, acc(-np.inf))
    return S


def _scale(q, softmax_scale):
    return 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)


def attention_forward(q, k, v, *, causal=False, softmax_scale=None):
    """(o, lse): o in q's dtype, lse (B, H, Nq) in float32 (float64 for float64 inputs)."""
    xp = array_module(q)
    acc = _acc_dtype(q.dtype)
    S = _scores(q, k, causal, _scale(q, softmax_scale))
    m = S.max(axis=-1, keepdims=True)
    m = xp.where(xp.isfinite(m), m, acc(0))             # rows that see no key: no shift
    E = xp.exp(S - m)
    ell = E.sum(axis=-1, keepdims=True)
    seen = ell > 0
    P = xp.where(seen, E / xp.where(seen, ell, acc(1)), acc(0)).astype(q.dtype)
    o = _mm(P, v)
    lse = xp.where(seen, m + xp.log(xp.where(seen, ell, acc(1))), acc(-np.inf))[..., 0]
    return o, lse.astype(acc)


def attention(q, k, v, *, causal=False, softmax_scale=None):
    return attention_forward(q, k, v, causal=causal, softmax_scale=softmax_scale)[0]


def attention_backward(do, q, k, v, o, lse, *, causal=False, softmax_scale=None):
    """(dq, dk, dv) in the input dtype, recomputing P = exp(S - lse)."""
    xp = array_module(q)
    acc = _acc_dtype(q.dtype)
    scale = _scale(q, softmax_scale)
    S = _scores(q, k, causal, scale)
    lse = lse.astype(acc)[..., None]
    seen = xp.isfinite(lse)
    P = xp.where(seen, xp.exp(S - xp.where(seen, lse, acc(0))), acc(0))
    Pd = P.astype(q.dtype)
    dv = _mm(_t(Pd), do)
    dP = _mm(do, _t(v)).astype(acc)
    D = (do.astype(acc) * o.astype(acc)).sum(axis=-1, keepdims=True)
    dS = (P * (dP - D)).astype(q.dtype)
    dq = (_mm(dS, k).astype(acc) * acc(scale)).astype(q.dtype)
    dk = (_mm(_t(dS), q).astype(acc) * acc(scale)).astype(q.dtype)
    return dq, dk, dv
