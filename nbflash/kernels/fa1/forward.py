"""FlashAttention as the paper writes it: Algorithm 1 (forward); Algorithm 4 (the backward) is in
nbflash.kernels.fa1.backward.

Dao, Fu, Ermon, Rudra, Ré, "FlashAttention: Fast and Memory-Efficient Exact Attention with
IO-Awareness" (NeurIPS 2022). Line numbers below are those of the paper's Algorithms 1, 2 and 4.

Both kernels follow the paper's loop order: the outer loop walks key/value blocks j (K_j, V_j are
loaded into shared memory once), the inner loop walks query blocks i. One thread block handles one
(batch, head) pair, so the grid is B*H blocks and every statistic of a row is only ever touched by
the block that owns it. Tiles are float32 in shared memory whatever the input dtype; the running
output O and the statistics ℓ, m live in float32 buffers in HBM and are read and written at every
(i, j) step, as the algorithm says. This is the readable, paper-faithful pair: it is what the IO
experiments measure, not the fastest way to compute attention.

Masking (Algorithm 2's MASK): a key column c is visible to query row r when c < Nk and, if
causal, c <= r + Nk - Nq (bottom-right alignment). Blocks that causal masking hides entirely are
skipped: no load, no compute, no write. A row that sees no key keeps O = 0, ℓ = 0, m = -inf, so
lse = -inf and its gradients are 0.

Key padding, block-sparse attention (Algorithm 5) and dropout (Algorithms 2 and 4) are
compile-time options (`opts`, nbflash.kernels.common.options.Features): a padded key block or a
tile whose mask blocks are all off is skipped like a causally hidden one
(nbflash.kernels.fa1.blocks); dropout draws each entry's keep bit from
nbflash.kernels.common.dropout in the forward and draws it again in the backward.

The kernels are built by :func:`make_forward` and :func:`make_backward` for fixed tile shapes,
head dim, causal flag, options and output cast (nbflash.kernels.fa1.plan describes them to the
cached factory); their shared arrays have the shapes of the tiles' shared-memory plan
(nbflash.kernels.fa1.tiles.Tiles.smem_plan). Both take the options' arguments last (see
nbflash.kernels.fa1.plan): key_lengths and the block mask (arrays, placeholders when unused),
then the mask's batch and head strides, its number of key blocks and its block size (bq, bk),
then dropout's seed (low and high words), offset, threshold and 1/(1-p).
"""

import math

from numba import float32, uint32

from ..._cuda import cuda, mul_rn
from ..common.dropout import keep_bits, kept
from ..common.masks import block_on, sees_a_key, visible
from ..common.softmax import NAN, NEG_INF, ZERO, online_softmax_update
from .blocks import make_tile_loader, skip_block


def make_forward(tiles, causal, cast_output, opts):
    """Build the Algorithm 1 kernel for `tiles` (Br, Bc, d, threads).

    `cast_output`: the output dtype is not float32, so O, accumulated in a float32 buffer, is
    converted into the output array at the end; otherwise the float32 buffer is the output.
    """
    BR, BC, D, T = tiles.Br, tiles.Bc, tiles.d, tiles.threads
    CAUSAL, CAST = bool(causal), bool(cast_output)
    DROP, PAD, SPARSE = opts.dropout, opts.padding, opts.sparse
    load_key_rows = make_tile_loader(BC, D, T)
    load_query_rows = make_tile_loader(BR, D, T)
    shape = tiles.smem_plan("forward").shape   # each shared array's shape
    SH_Q, SH_K, SH_V, SH_O, SH_S, SH_ROW = (shape(n) for n in
                                            ("Qi", "Kj", "Vj", "Oi", "S", "keep"))

    def fa1_forward(q, k, v, o_acc, o, m, l, scale, key_lengths, bmask, slopes, left, right, asb,
                    msb, msh, nbk, bq, bk, seed_lo, seed_hi, offset, thr, drop_scale):
        """FlashAttention forward, Algorithm 1 with Algorithm 2's scaling and masking.

        Grid: B*H blocks, block b*H + h computes head (b, h). Block: T threads.
        Shared memory (float32): Q_i (Br x d), K_j, V_j (Bc x d), O_i (Br x d), S_ij / P~_ij
        (Br x Bc), and per-row rescaling factors (2 x Br). Rows of Q, K, V and S are padded to
        an odd stride (d', Bc') against bank conflicts, so the kernel uses
        4 ((Br + 2 Bc) d' + Br d + Br Bc' + 2 Br) bytes (Tiles.smem_plan lays them out;
        e.g. 48320 for d = 64, Br = Bc = 40).
        Registers: the m, ℓ of the row a thread owns during lines 11-14.
        HBM per (i, j) step: reads Q_i, O_i, ℓ_i, m_i; writes O_i, ℓ_i, m_i. Per j: reads K_j, V_j.
        Arguments: q (B, H, Nq, d), k and v (B, H, Nk, d), o_acc (float32 running O, the output
        when that is float32), o (the output in another dtype, else an unused placeholder), m and
        l (float32, B x H x Nq; m holds lse on return), scale (τ), the options' arguments.
        """
        H = q.shape[1]
        Nq = q.shape[2]
        Nk = k.shape[2]
        b = cuda.blockIdx.x // H
        h = cuda.blockIdx.x % H
        tid = cuda.threadIdx.x
        klen = min(Nk, key_lengths[b]) if PAD else Nk
        mbase = b * msb + h * msh
        Tr = (Nq + BR - 1) // BR
        Tc = (Nk + BC - 1) // BC

        Qi = cuda.shared.array(SH_Q, float32)          # Br x d' (d' = d padded, see tiles)
        Kj = cuda.shared.array(SH_K, float32)          # Bc x d'
        Vj = cuda.shared.array(SH_V, float32)          # Bc x d'
        Oi = cuda.shared.array(SH_O, float32)          # Br x d
        S = cuda.shared.array(SH_S, float32)           # S_ij, then P~_ij in place (Br x Bc')
        keep = cuda.shared.array(SH_ROW, float32)      # diag(ℓ_new)^-1 diag(ℓ_i) e^(m_i - m_new)
        new = cuda.shared.array(SH_ROW, float32)       # diag(ℓ_new)^-1 e^(m~_ij - m_new)

        # line 3: initialise O = 0, ℓ = 0, m = -inf in HBM
        for e in range(tid, Nq * D, T):
            o_acc[b, h, e // D, e % D] = ZERO
        for r in range(tid, Nq, T):
            l[b, h, r] = ZERO
            m[b, h, r] = NEG_INF
        cuda.syncthreads()  # line 9 reads what other threads initialised

        for j in range(Tc):  # line 6
            # line 7: load K_j, V_j from HBM to on-chip SRAM (zeros past the key length: keys
            # past it are never read)
            load_key_rows(k, v, Kj, Vj, b, h, j * BC, klen, tid)
            cuda.syncthreads()  # K_j, V_j complete before any thread reads them

            for i in range(Tr):  # line 8
                skip, all_on = skip_block(i, j, BR, BC, Nq, Nk, klen, CAUSAL, PAD, SPARSE, bmask,
                                     mbase, nbk, bq, bk)
                if skip:
                    continue  # block-uniform condition: every thread skips together
                # line 9: load Q_i, O_i from HBM (ℓ_i, m_i are loaded by their row's thread below;
                # O_i entry (r, x) is loaded by the thread that writes it in line 13)
                load_query_rows(q, o_acc, Qi, Oi, b, h, i * BR, Nq, tid)
                cuda.syncthreads()  # Q_i complete before S_ij reads it

                # line 10: S_ij = τ Q_i K_j^T, with MASK applied (Alg. 2; Alg. 5's block mask)
                for e in range(tid, BR * BC, T):
                    r = e // BC
                    c = e % BC
                    if visible(i * BR + r, j * BC + c, Nq, Nk, klen, CAUSAL, False, 0, 0) \
                            and (all_on or block_on(bmask, mbase, nbk, bq, bk, i * BR + r,
                                                    j * BC + c)):
                        s = ZERO
                        for x in range(D):
                            s += Qi[r, x] * Kj[c, x]
                        S[r, c] = mul_rn(s, scale)  # rounded as the backward rounds it
                    else:
                        S[r, c] = NEG_INF
                cuda.syncthreads()  # S_ij complete before the row statistics read it

                # lines 11-12 and 14, one thread per row: m~, P~, ℓ~; m_new, ℓ_new; write ℓ_i, m_i
                # (with dropout, Alg. 2 line 13: P~ ∘ Z / (1 - p) replaces P~ in O's update; ℓ~
                # is the sum before dropout)
                for r in range(tid, BR, T):
                    row = i * BR + r
                    m_blk = NEG_INF
                    for c in range(BC):
                        m_blk = max(m_blk, S[r, c])
                    l_blk = ZERO
                    bits = uint32(0)
                    for c in range(BC):
                        p = ZERO
                        if S[r, c] != NEG_INF:
                            p = math.exp(S[r, c] - m_blk)
                        l_blk += p
                        if DROP:
                            col = j * BC + c
                            if c == 0 or col % 8 == 0:   # one draw per 8 keys
                                bits = keep_bits(seed_lo, seed_hi, b * H + h, offset, row,
                                                 col // 8, thr)
                            p = p * drop_scale if kept(bits, col % 8) else ZERO
                        S[r, c] = p
                    m_i = NEG_INF
                    l_i = ZERO
                    if row < Nq:
                        m_i = m[b, h, row]
                        l_i = l[b, h, row]
                    m_new, l_new, alpha, beta = online_softmax_update(m_i, l_i, m_blk, l_blk)
                    keep[r] = ZERO
                    new[r] = ZERO
                    if l_new != ZERO:   # (a NaN ℓ makes the row NaN: the non-finite rule)
                        keep[r] = l_i * alpha / l_new
                        new[r] = beta / l_new
                    if row < Nq:  # line 14
                        m[b, h, row] = m_new
                        l[b, h, row] = l_new
                cuda.syncthreads()  # P~_ij and the factors complete before line 13 reads them

                # line 13: O_i <- diag(ℓ_new)^-1 (diag(ℓ_i) e^(m_i - m_new) O_i
                #                                 + e^(m~_ij - m_new) P~_ij V_j), written to HBM
                for e in range(tid, BR * D, T):
                    r = e // D
                    x = e % D
                    row = i * BR + r
                    if row < Nq:
                        pv = ZERO
                        for c in range(BC):
                            pv += S[r, c] * Vj[c, x]
                        # both factors 0: the row has seen no key yet, and O stays 0 (not
                        # 0 · pv, which is NaN for a masked key's inf in V_j)
                        o_acc[b, h, row, x] = keep[r] * Oi[r, x] + new[r] * pv \
                            if keep[r] != ZERO or new[r] != ZERO else ZERO
                cuda.syncthreads()  # the next i overwrites Q_i, O_i, S and the factors
            cuda.syncthreads()  # the next j overwrites K_j, V_j (also when every i was skipped)

        # epilogue (after line 17): lse = m + log ℓ, kept for the backward; O in the output
        # dtype. ℓ = 0: o = 0 and lse = -inf for a row that sees no key, NaN for one whose
        # visible scores were all -inf (the non-finite rule, nbflash.kernels.common.softmax)
        for r in range(tid, Nq, T):
            l_r = l[b, h, r]
            if l_r != ZERO:
                m[b, h, r] = m[b, h, r] + math.log(l_r)
            elif sees_a_key(r, Nq, Nk, klen, CAUSAL, False, 0, 0, SPARSE, bmask, mbase, nbk, bq,
                            bk):
                m[b, h, r] = NAN
                for x in range(D):
                    o_acc[b, h, r, x] = NAN
            else:
                m[b, h, r] = NEG_INF
        if CAST:
            cuda.syncthreads()   # the NaN rows complete before other threads convert them
            for e in range(tid, Nq * D, T):
                o[b, h, e // D, e % D] = o_acc[b, h, e // D, e % D]

    return fa1_forward
