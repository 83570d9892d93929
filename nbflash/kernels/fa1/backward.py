"""FlashAttention's backward as the paper writes it: Algorithm 4, from the saved statistics.

Dao, Fu, Ermon, Rudra, Ré, "FlashAttention: Fast and Memory-Efficient Exact Attention with
IO-Awareness" (NeurIPS 2022); line numbers below are those of the paper's Algorithm 4. The
loop order, the grid (one block per (batch, head)), masking and the options are those of the
forward (nbflash.kernels.fa1.forward, whose docstring says more): the outer loop walks K_j, V_j,
the inner one Q_i, and P_ij is recomputed from the forward's lse instead of stored.
"""

import math

from numba import float32

from ..._cuda import cuda, mul_rn
from ..common.dropout import keep_bits, kept
from ..common.masks import block_on, visible
from ..common.softmax import NEG_INF, ZERO
from .blocks import make_tile_loader, skip_block


def make_backward(tiles, causal, cast_dq, opts):
    """Build the Algorithm 4 kernel for `tiles` (Br, Bc, d, threads).

    `cast_dq`: the gradient dtype is not float32, so dQ, accumulated in a float32 buffer, is
    converted into dq at the end; otherwise the float32 buffer is dq.
    """
    BR, BC, D, T = tiles.Br, tiles.Bc, tiles.d, tiles.threads
    CAUSAL, CAST = bool(causal), bool(cast_dq)
    DROP, PAD, SPARSE = opts.dropout, opts.padding, opts.sparse
    load_key_rows = make_tile_loader(BC, D, T)
    load_query_rows = make_tile_loader(BR, D, T)
    shape = tiles.smem_plan("backward").shape  # each shared array's shape
    SH_Q, SH_K, SH_S, SH_ROW, SH_DK = (shape(n) for n in ("Qi", "Kj", "P", "lse_i", "dKj"))

    def fa1_backward(q, k, v, o, do, lse, dq_acc, dq, dk, dv, scale, key_lengths, bmask, slopes,
                     left, right, asb, msb, msh, nbk, bq, bk, seed_lo, seed_hi, offset, thr,
                     drop_scale):
        """FlashAttention backward, Algorithm 4, from the saved lse.

        P_ij = diag(ℓ_i)^-1 exp(S_ij - m_i) is computed as exp(S_ij - lse_i), lse = m + log ℓ.
        Grid: B*H blocks, block b*H + h computes head (b, h). Block: T threads.
        Shared memory (float32): Q_i, dO_i (Br x d), K_j, V_j, dK~_j, dV~_j (Bc x d), P_ij and
        dS_ij (Br x Bc; dP_ij is never stored: each entry becomes dS_ij where it is computed),
        lse_i and D_i (Br each): 4 (2 (Br + Bc) d' + 2 Bc d + 2 Br Bc' + 2 Br) bytes with the
        padded strides d', Bc' (e.g. 47952 for d = 64, Br = Bc = 27). Each entry of dK~_j, dV~_j
        is updated by one thread only.
        HBM per (i, j) step: reads Q_i, O_i, dO_i, lse_i and dQ_i; writes dQ_i. Per j: reads
        K_j, V_j; writes dK_j, dV_j.
        """
        H = q.shape[1]
        Nq = q.shape[2]
        Nk = k.shape[2]
        b = cuda.blockIdx.x // H
        h = cuda.blockIdx.x % H
        tid = cuda.threadIdx.x
        Tr = (Nq + BR - 1) // BR
        Tc = (Nk + BC - 1) // BC
        klen = min(Nk, key_lengths[b]) if PAD else Nk
        mbase = b * msb + h * msh

        Qi = cuda.shared.array(SH_Q, float32)          # Br x d' (d' = d padded, see tiles)
        dOi = cuda.shared.array(SH_Q, float32)
        Kj = cuda.shared.array(SH_K, float32)          # Bc x d'
        Vj = cuda.shared.array(SH_K, float32)
        P = cuda.shared.array(SH_S, float32)           # Br x Bc'
        dS = cuda.shared.array(SH_S, float32)
        lse_i = cuda.shared.array(SH_ROW, float32)     # Br
        D_i = cuda.shared.array(SH_ROW, float32)
        dKj = cuda.shared.array(SH_DK, float32)        # dK~_j, Bc x d
        dVj = cuda.shared.array(SH_DK, float32)        # dV~_j

        # line 6: initialise dQ = 0 in HBM (dK_j and dV_j are written whole, once per j)
        for e in range(tid, Nq * D, T):
            dq_acc[b, h, e // D, e % D] = ZERO
        cuda.syncthreads()  # line 22 adds to what other threads initialised

        for j in range(Tc):  # line 7
            # line 8: load K_j, V_j from HBM to on-chip SRAM (zeros past Nk)
            load_key_rows(k, v, Kj, Vj, b, h, j * BC, klen, tid)
            # line 9: dK~_j = 0, dV~_j = 0 on SRAM (the same thread owns each entry below)
            for e in range(tid, BC * D, T):
                dKj[e // D, e % D] = ZERO
                dVj[e // D, e % D] = ZERO
            cuda.syncthreads()  # K_j, V_j complete before any thread reads them

            for i in range(Tr):  # line 10
                skip, all_on = skip_block(i, j, BR, BC, Nq, Nk, klen, CAUSAL, PAD, SPARSE, bmask,
                                     mbase, nbk, bq, bk)
                if skip:   # (dK~_j, dV~_j stay 0 for keys that no query sees)
                    continue  # block-uniform condition: every thread skips together
                # line 11: load Q_i, dO_i (lse_i and O_i are read in line 20, dQ_i in line 22)
                load_query_rows(q, do, Qi, dOi, b, h, i * BR, Nq, tid)
                cuda.syncthreads()  # dO_i complete before line 20 reads whole rows of it

                # line 20: D_i = rowsum(dO_i ∘ O_i), O_i streamed from HBM by the row's thread
                for r in range(tid, BR, T):
                    row = i * BR + r
                    acc = ZERO
                    lse_r = NEG_INF
                    if row < Nq:
                        for x in range(D):
                            acc += dOi[r, x] * float32(o[b, h, row, x])
                        lse_r = lse[b, h, row]
                    D_i[r] = acc
                    lse_i[r] = lse_r
                cuda.syncthreads()  # D_i, lse_i complete before line 21 reads them

                # lines 12-14, 18 and 21 per entry: S_ij = τ Q_i K_j^T, MASK, P_ij = exp(S - lse_i),
                # dP_ij = dO_i V_j^T, dS_ij = P_ij ∘ (dP_ij - D_i); with dropout (lines 14-16, 19)
                # the forward's Z_ij regenerated: dV uses P ∘ Z / (1-p), dP is dP ∘ Z / (1-p)
                for e in range(tid, BR * BC, T):
                    r = e // BC
                    c = e % BC
                    row = i * BR + r
                    col = j * BC + c
                    if visible(row, col, Nq, Nk, klen, CAUSAL, False, 0, 0) and (
                            all_on or block_on(bmask, mbase, nbk, bq, bk, row, col)):
                        s = ZERO
                        dp = ZERO
                        for x in range(D):
                            s += Qi[r, x] * Kj[c, x]
                            dp += dOi[r, x] * Vj[c, x]
                        # τ s rounded exactly as the forward rounded it (no FMA), so that
                        # τ s <= m <= lse and P <= 1 even where lse has lost log ℓ to rounding
                        p = math.exp(mul_rn(s, scale) - lse_i[r])
                        z = float32(1.0)
                        if DROP:
                            z = drop_scale if kept(keep_bits(seed_lo, seed_hi, b * H + h, offset,
                                                             row, col // 8, thr), col % 8) \
                                else ZERO
                        P[r, c] = p * z
                        dS[r, c] = p * (dp * z - D_i[r])
                    else:
                        P[r, c] = ZERO
                        dS[r, c] = ZERO
                cuda.syncthreads()  # P_ij, dS_ij complete before lines 17, 22, 23 read them

                # line 17: dV~_j += P_ij^T dO_i;  line 23: dK~_j += τ dS_ij^T Q_i  (on SRAM)
                for e in range(tid, BC * D, T):
                    c = e // D
                    x = e % D
                    pdo = ZERO
                    dsq = ZERO
                    for r in range(BR):
                        pdo += P[r, c] * dOi[r, x]
                        dsq += dS[r, c] * Qi[r, x]
                    dVj[c, x] += pdo
                    dKj[c, x] += scale * dsq

                # line 22: dQ_i <- dQ_i + τ dS_ij K_j, read-modify-written in HBM
                for e in range(tid, BR * D, T):
                    r = e // D
                    x = e % D
                    row = i * BR + r
                    if row < Nq:
                        acc = ZERO
                        for c in range(BC):
                            acc += dS[r, c] * Kj[c, x]
                        dq_acc[b, h, row, x] += scale * acc
                cuda.syncthreads()  # the next i overwrites Q_i, dO_i, P, dS, D_i, lse_i

            # line 25: write dK_j <- dK~_j, dV_j <- dV~_j to HBM (same thread-to-entry mapping)
            for e in range(tid, BC * D, T):
                c = e // D
                x = e % D
                col = j * BC + c
                if col < Nk:
                    dk[b, h, col, x] = dKj[c, x]
                    dv[b, h, col, x] = dVj[c, x]
            cuda.syncthreads()  # the next j overwrites K_j, V_j

        if CAST:  # epilogue: dQ in the output dtype
            for e in range(tid, Nq * D, T):
                dq[b, h, e // D, e % D] = dq_acc[b, h, e // D, e % D]

    return fa1_backward
