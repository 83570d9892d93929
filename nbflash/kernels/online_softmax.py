"""The online-softmax update, written once for every kernel (FlashAttention paper, §3.1).

A row's softmax over keys seen block by block keeps two running statistics: the maximum m and
the sum ℓ of exp(s - m). When a block with its own statistics (m̃, ℓ̃) arrives, they merge as

    m_new = max(m, m̃)
    ℓ_new = e^(m - m_new) ℓ + e^(m̃ - m_new) ℓ̃            (Alg. 1 line 12)

and the output accumulated so far is rescaled by the same two factors (Alg. 1 line 13).
A row that has seen only masked keys has m = m̃ = -inf; then nothing is rescaled (both factors
are 0) instead of computing e^(-inf + inf) = NaN.

FlashAttention-2 (Dao 2023, §3.1.1) merges differently: the block's exponentials are taken
against the new maximum directly, P̃ = 2^(s - m_new) with log2(e) folded into the scores, and ℓ
and the unnormalised output are only rescaled by 2^(m - m_new); O is divided by ℓ once, at the
end. :func:`new_max` is that step for the fa2 kernels.
"""

import math

from numba import float32

from .._cuda import cuda

NEG_INF = float32(-math.inf)
ZERO = float32(0.0)
ONE = float32(1.0)


@cuda.jit(device=True, inline=True)
def online_softmax_update(m_old, l_old, m_blk, l_blk):
    """Merge block statistics (m_blk, l_blk) into running ones (m_old, l_old).

    Returns (m_new, l_new, alpha, beta) with alpha = e^(m_old - m_new), beta = e^(m_blk - m_new),
    so that l_new = alpha * l_old + beta * l_blk.
    """
    m_new = max(m_old, m_blk)
    if m_new == NEG_INF:
        return m_new, ZERO, ZERO, ZERO
    alpha = math.exp(m_old - m_new)
    beta = math.exp(m_blk - m_new)
    return m_new, alpha * l_old + beta * l_blk, alpha, beta


@cuda.jit(device=True, inline=True)
def new_max(m_old, m_blk):
    """FlashAttention-2's update of a row's running max (base-2 scores).

    Returns (m_new, m_ref, alpha): m_new = max(m_old, m_blk); the block's P̃ = 2^(s - m_ref) and
    ℓ, O are rescaled by alpha = 2^(m_old - m_new). For a row that has seen only masked keys
    (m_new = -inf) m_ref = 0 and alpha = 1, so that masked scores give P̃ = 2^(-inf) = 0 and
    nothing becomes NaN.
    """
    m_new = max(m_old, m_blk)
    if m_new == NEG_INF:
        return m_new, ZERO, ONE
    return m_new, m_new, math.exp2(m_old - m_new)
