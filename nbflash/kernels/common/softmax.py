"""The softmax's arithmetic, written once for every kernel family: the online-softmax update
(FlashAttention paper, §3.1), base-2 scores, and the per-row statistics of the backward.

**The online softmax.** A row's softmax over keys seen block by block keeps two running
statistics: the maximum m and the sum ℓ of exp(s - m). When a block with its own statistics
(m̃, ℓ̃) arrives, they merge as

    m_new = max(m, m̃)
    ℓ_new = e^(m - m_new) ℓ + e^(m̃ - m_new) ℓ̃            (Alg. 1 line 12)

and the output accumulated so far is rescaled by the same two factors (Alg. 1 line 13):
:func:`online_softmax_update`, which fa1 uses. A row that has seen only masked keys has
m = m̃ = -inf; then nothing is rescaled (both factors are 0) instead of computing
e^(-inf + inf) = NaN, and ℓ stays 0 (or NaN, from NaN scores).

FlashAttention-2 (Dao 2023, §3.1.1) merges differently: the block's exponentials are taken
against the new maximum directly, P̃ = 2^(s - m_new) with log2(e) folded into the scores, and ℓ
and the unnormalised output are only rescaled by 2^(m - m_new); O is divided by ℓ once, at the
end. :func:`new_max` is that step, for fa2 and tc.

**Base-2 scores.** τ log2(e) is folded into one scale so that P = 2^(s' - m') needs one exp2.
:func:`split_scale` gives it as two float32 (hi + lo) and :func:`scaled` takes the product as
fma(s, hi, s·lo), so that folding it in costs no accuracy: s' is s·τ·log2(e) rounded once, as
the naive baseline rounds s·τ. lse is stored in natural-log units (LN2 converts), and the
backward takes lse·log2(e) in two parts too (LOG2E + LOG2E_LO).

**Non-finite values.** Which keys a query row sees is decided by the masks alone. A row that
sees none has o = 0 and lse = -inf (and zero gradients). Every other row gets what the softmax
over its visible keys gives in IEEE float32 arithmetic: a NaN score makes the row NaN; a +inf
score, or visible scores that are all -inf (an overflowed q·kᵀ, say), make m = ±inf and the
row NaN (e^(s - m) = e^(inf - inf)); a single -inf score among finite ones weighs 0.
:func:`finish_row` ends a row by that rule. The running max may drop a NaN score (max() of two
float32 is fmaxf on the GPU), but its exponential is NaN, so ℓ is NaN and the rule sees it; the
backward's clamp of P is :func:`clamp_nonpositive`, which keeps NaN where min() would not.
The backward recomputes P from lse, so a NaN row stays NaN there (row_stats maps only -inf).

**Row statistics of the backward.** :func:`row_stats` reads a query row's lse and D, and
:func:`make_delta` computes D = rowsum(dO ∘ O) (FA2 Algorithm 2, line 4).
"""

import math

import numpy as np
from numba import float32, int64, uint32

from ..._cuda import cuda

NEG_INF = float32(-math.inf)
NAN = float32(math.nan)
ZERO = float32(0.0)
ONE = float32(1.0)
LOG2E = float32(math.log2(math.e))
LOG2E_LO = float32(math.log2(math.e) - float(LOG2E))   # LOG2E + LOG2E_LO = log2(e) to ~1e-15
LN2 = float32(math.log(2.0))


@cuda.jit(device=True, inline=True)
def online_softmax_update(m_old, l_old, m_blk, l_blk):
    """Merge block statistics (m_blk, l_blk) into running ones (m_old, l_old).

    Returns (m_new, l_new, alpha, beta) with alpha = e^(m_old - m_new), beta = e^(m_blk - m_new),
    so that l_new = alpha * l_old + beta * l_blk.
    """
    m_new = max(m_old, m_blk)
    if m_new == NEG_INF:   # ℓ stays 0, or NaN where a NaN score was dropped by the max
        return m_new, l_old + l_blk, ZERO, ZERO
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


@cuda.jit(device=True, inline=True)
def finish_row(m, l, sees_key):
    """(the divisor of a row's unnormalised O, its lse in natural log) from its running max m
    (base 2) and ℓ, by the non-finite rule above: ℓ > 0 or NaN: (ℓ, (m + log2 ℓ) ln 2); ℓ = 0:
    (1, -inf) for a row that sees no key, (NaN, NaN) for one that does (its visible scores
    were all -inf). lse = -inf is the caller's sign to write O as 0 (not acc / 1: a masked
    key's 0 · inf makes acc NaN). Pass sees_key = (l != 0 or masks.sees_a_key(...)), so that the
    masks are looked at only for the rare ℓ = 0."""
    if l == ZERO:
        if sees_key:
            return NAN, NAN
        return ONE, NEG_INF
    return l, (m + math.log2(l)) * LN2


@cuda.jit(device=True, inline=True)
def clamp_nonpositive(x):
    """min(x, 0) that keeps NaN: the backward's P = 2^min(s' - lse log2 e, 0) must stay NaN for a
    NaN score or lse, and min() of two float32 on the GPU is fminf, which returns the other
    operand (the simulator runs Python's min, which would not show it)."""
    return ZERO if x > ZERO else x


def split_scale(scale):
    """(hi, lo): τ log2(e) as the sum of two float32, for the kernels' scale arguments."""
    exact = float(scale) * math.log2(math.e)
    hi = np.float32(exact)
    return float(hi), float(np.float32(exact - float(hi)))


def scaled(s, scale_hi, scale_lo):
    """s · τ log2(e), rounded once: τ log2(e) = scale_hi + scale_lo (see :func:`split_scale`)."""
    return cuda.fma(s, scale_hi, s * scale_lo)


def row_lse(lse, at, inside):
    """lse of a query row for the backward: 0 for a row past Nq, and 0 where it is -inf (a row
    that sees no key: all its entries are masked, so any finite value will do)."""
    lse_r = ZERO
    if inside:
        lse_r = lse[at]
        if lse_r == NEG_INF:
            lse_r = ZERO
    return lse_r


def row_stats(lse, delta, at, inside):
    """lse (see :func:`row_lse`) and D of a query row for the backward (0 past Nq)."""
    return row_lse(lse, at, inside), delta[at] if inside else ZERO


scaled = cuda.jit(device=True, inline=True)(scaled)


def capped(s, cap_in, cap_out):
    """(softcap·tanh(τ s / softcap) in base 2, the tanh): the softcapped score of raw score s
    and the tanh, whose 1 - tanh² is its derivative's factor (cap_in, cap_out:
    nbflash.kernels.common.options.softcap_scalars)."""
    t = math.tanh(s * cap_in)
    return t * cap_out, t


capped = cuda.jit(device=True, inline=True)(capped)


def alibi_slope(slopes, bh, H, asb):
    """ALiBi's slope of query head bh (= b·H + h) in base 2, slope·log2 e: slopes is flat
    (B, H) with batch stride asb = H, or (H,) with asb = 0."""
    b = int64(uint32(bh) // uint32(H))
    return slopes[b * asb + bh - b * H] * LOG2E


def alibi_bias(slope2, row, col, Nq, Nk):
    """ALiBi's bias of query `row` and key `col` in base 2, -slope·log2 e·|row + Nk - Nq - col|
    (the distance from the row's bottom-right-aligned diagonal), added to the (softcapped)
    score."""
    return -slope2 * float32(abs(row + Nk - Nq - col))


alibi_slope = cuda.jit(device=True, inline=True)(alibi_slope)
alibi_bias = cuda.jit(device=True, inline=True)(alibi_bias)


def make_bias_scores(TM, TN, RG, L, SCALED):
    """Device function: ALiBi's bias (:func:`alibi_bias`) added in place to a thread's
    register tile of scores s[i·TN + u] (query row0 + RG·i, key col0 + L·u), scaled to base 2
    first unless SCALED (the softcap's pass scaled them). fa2's forward runs it as a pass of its
    own, as make_cap_scores: inside the row loops the bias kept them from unrolling (320-448
    bytes of stack at sm_90)."""

    def bias_scores(s, sc_hi, sc_lo, slope2, row0, col0, Nq, Nk):
        for i in range(TM):
            for u in range(TN):
                x = s[i * TN + u] if SCALED else scaled(s[i * TN + u], sc_hi, sc_lo)
                s[i * TN + u] = x + alibi_bias(slope2, row0 + RG * i, col0 + L * u, Nq, Nk)

    return cuda.jit(device=True, inline=True)(bias_scores)


def make_cap_scores(N):
    """Device function: the N raw scores s[0:N] softcapped in place (base 2, :func:`capped`;
    fa2's kernels run it as a pass of its own before the loops that use the scores: inside
    those the body grows too large to unroll, and the register tiles go to local memory)."""

    def cap_scores(s, cap_in, cap_out):
        for x in range(N):
            s[x], _ = capped(s[x], cap_in, cap_out)

    return cuda.jit(device=True, inline=True)(cap_scores)
row_lse = cuda.jit(device=True, inline=True)(row_lse)
row_stats = cuda.jit(device=True, inline=True)(row_stats)

#: threads per block of the D kernel (one thread per query row)
DELTA_THREADS = 128


def make_delta(threads, load=float32):
    """D = rowsum(dO ∘ O) per query row (FA2 Algorithm 2, line 4), one thread per row; also
    zeroes the row of the dQ accumulator that the dK/dV pass adds into (saves a launch).
    load: an element of o or do as float32 (tc passes the conversion of its 16-bit bits)."""
    T = threads

    def fa2_delta(o, do, delta, dq_acc, n_rows, D, zero_dq, N, H, sb, sh, sn):
        """Grid ceil(n_rows / T); o, do, dq_acc: query-shaped (B, H, N, D), flat in the layout
        whose strides are sb, sh, sn (nbflash.kernels.common.layouts); delta: float32 (rows)
        with n_rows = B·H·N. zero_dq: 1 to zero dq_acc (else it may be a placeholder)."""
        row = cuda.blockIdx.x * T + cuda.threadIdx.x
        if row < n_rows:
            bh = uint32(row) // uint32(N)
            b = bh // uint32(H)
            at = int64(b) * sb + int64(bh) * sh + (row - int64(bh) * N) * sn
            acc = ZERO
            for x in range(D):
                acc += load(o[at + x]) * load(do[at + x])
                if zero_dq:
                    dq_acc[at + x] = ZERO
            delta[row] = acc

    return fa2_delta
