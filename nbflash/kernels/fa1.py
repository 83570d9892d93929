"""FlashAttention as the paper writes it: Algorithm 1 (forward) and Algorithm 4 (backward).

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
compile-time options (`opts`, nbflash.kernels.launch.Features): a padded key block or a tile
whose mask blocks are all off is skipped like a causally hidden one; dropout draws each entry's
keep bit from nbflash.kernels.dropout in the forward and draws it again in the backward.

The kernels are built by :func:`make_forward` and :func:`make_backward` for fixed tile shapes,
head dim, causal flag, options and output cast; :mod:`nbflash.kernels.launch` caches what they
build. Both take the options' arguments last (see :func:`nbflash.kernels.launch.fa1_forward`):
key_lengths and the block mask (arrays, placeholders when unused), then the mask's batch and
head strides, its number of key blocks and its block size (bq, bk), then dropout's seed (low and
high words), offset, threshold and 1/(1-p).
"""

import math

from numba import float32

from numba import uint32

from .._cuda import cuda, mul_rn
from .dropout import keep_bits, kept
from .masks import block_hidden, block_on, tile_status, visible
from .online_softmax import NEG_INF, ZERO, online_softmax_update


def make_tile_loader(ROWS, D, T):
    """Device function loading rows start .. start+ROWS-1 of two (B, H, n, D) arrays of head
    (b, h) into two (ROWS, >=D) shared tiles as float32, with zeros past row n - 1; the T threads
    of the block share the work, entry e = r*D + x going to thread e mod T."""

    def load_tiles(src1, src2, tile1, tile2, b, h, start, n, tid):
        for e in range(tid, ROWS * D, T):
            r = e // D
            x = e % D
            if start + r < n:
                tile1[r, x] = float32(src1[b, h, start + r, x])
                tile2[r, x] = float32(src2[b, h, start + r, x])
            else:
                tile1[r, x] = ZERO
                tile2[r, x] = ZERO

    return cuda.jit(device=True, inline=True)(load_tiles)


def _skip(i, j, BR, BC, Nq, Nk, klen, CAUSAL, PAD, SPARSE, bmask, mbase, nbk, bq, bk):
    """(skip, all_on) for block (i, j): skip when the causal mask, the key length or the block
    mask hides all of it (Algorithm 5, line 8); all_on: every mask block of it is on."""
    if CAUSAL and block_hidden(i, j, BR, BC, Nq, Nk):
        return True, True
    if PAD and j * BC >= klen:
        return True, True
    if SPARSE:
        any_on, all_on = tile_status(bmask, mbase, nbk, bq, bk, i * BR, BR, j * BC, BC, Nq,
                                     klen)
        return not any_on, all_on
    return False, True


_skip = cuda.jit(device=True, inline=True)(_skip)


def make_forward(tiles, causal, cast_output, opts):
    """Build the Algorithm 1 kernel for `tiles` (Br, Bc, d, threads).

    `cast_output`: the output dtype is not float32, so O, accumulated in a float32 buffer, is
    converted into the output array at the end; otherwise the float32 buffer is the output.
    """
    BR, BC, D, T = tiles.Br, tiles.Bc, tiles.d, tiles.threads
    DP, BCP = tiles.dp, tiles.bcp
    CAUSAL, CAST = bool(causal), bool(cast_output)
    DROP, PAD, SPARSE = opts.dropout, opts.padding, opts.sparse
    load_key_rows = make_tile_loader(BC, D, T)
    load_query_rows = make_tile_loader(BR, D, T)

    def fa1_forward(q, k, v, o_acc, o, m, l, scale, key_lengths, bmask, msb, msh, nbk, bq, bk,
                    seed_lo, seed_hi, offset, thr, drop_scale):
        """FlashAttention forward, Algorithm 1 with Algorithm 2's scaling and masking.

        Grid: B*H blocks, block b*H + h computes head (b, h). Block: T threads.
        Shared memory (float32): Q_i (Br x d), K_j, V_j (Bc x d), O_i (Br x d), S_ij / P~_ij
        (Br x Bc), and per-row rescaling factors (2 x Br). Rows of Q, K, V and S are padded to
        an odd stride (d', Bc') against bank conflicts, so the kernel uses
        4 ((Br + 2 Bc) d' + Br d + Br Bc' + 2 Br) bytes (nbflash.tiling.Tiles counts them;
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

        Qi = cuda.shared.array((BR, DP), float32)
        Kj = cuda.shared.array((BC, DP), float32)
        Vj = cuda.shared.array((BC, DP), float32)
        Oi = cuda.shared.array((BR, D), float32)
        S = cuda.shared.array((BR, BCP), float32)      # S_ij, then P~_ij in place
        keep = cuda.shared.array(BR, float32)          # diag(ℓ_new)^-1 diag(ℓ_i) e^(m_i - m_new)
        new = cuda.shared.array(BR, float32)           # diag(ℓ_new)^-1 e^(m~_ij - m_new)

        # line 3: initialise O = 0, ℓ = 0, m = -inf in HBM
        for e in range(tid, Nq * D, T):
            o_acc[b, h, e // D, e % D] = ZERO
        for r in range(tid, Nq, T):
            l[b, h, r] = ZERO
            m[b, h, r] = NEG_INF
        cuda.syncthreads()  # line 9 reads what other threads initialised

        for j in range(Tc):  # line 6
            # line 7: load K_j, V_j from HBM to on-chip SRAM (zeros past Nk)
            load_key_rows(k, v, Kj, Vj, b, h, j * BC, Nk, tid)
            cuda.syncthreads()  # K_j, V_j complete before any thread reads them

            for i in range(Tr):  # line 8
                skip, all_on = _skip(i, j, BR, BC, Nq, Nk, klen, CAUSAL, PAD, SPARSE, bmask,
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
                    if visible(i * BR + r, j * BC + c, Nq, Nk, klen, CAUSAL) and (
                            all_on or block_on(bmask, mbase, nbk, bq, bk, i * BR + r, j * BC + c)):
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
                    if l_new > ZERO:
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
                        o_acc[b, h, row, x] = keep[r] * Oi[r, x] + new[r] * pv
                cuda.syncthreads()  # the next i overwrites Q_i, O_i, S and the factors
            cuda.syncthreads()  # the next j overwrites K_j, V_j (also when every i was skipped)

        # epilogue (after line 17): lse = m + log ℓ, kept for the backward; O in the output dtype
        for r in range(tid, Nq, T):
            l_r = l[b, h, r]
            m[b, h, r] = m[b, h, r] + math.log(l_r) if l_r > ZERO else NEG_INF
        if CAST:
            for e in range(tid, Nq * D, T):
                o[b, h, e // D, e % D] = o_acc[b, h, e // D, e % D]

    return fa1_forward


def make_backward(tiles, causal, cast_dq, opts):
    """Build the Algorithm 4 kernel for `tiles` (Br, Bc, d, threads).

    `cast_dq`: the gradient dtype is not float32, so dQ, accumulated in a float32 buffer, is
    converted into dq at the end; otherwise the float32 buffer is dq.
    """
    BR, BC, D, T = tiles.Br, tiles.Bc, tiles.d, tiles.threads
    DP, BCP = tiles.dp, tiles.bcp
    CAUSAL, CAST = bool(causal), bool(cast_dq)
    DROP, PAD, SPARSE = opts.dropout, opts.padding, opts.sparse
    load_key_rows = make_tile_loader(BC, D, T)
    load_query_rows = make_tile_loader(BR, D, T)

    def fa1_backward(q, k, v, o, do, lse, dq_acc, dq, dk, dv, scale, key_lengths, bmask, msb,
                     msh, nbk, bq, bk, seed_lo, seed_hi, offset, thr, drop_scale):
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

        Qi = cuda.shared.array((BR, DP), float32)
        dOi = cuda.shared.array((BR, DP), float32)
        Kj = cuda.shared.array((BC, DP), float32)
        Vj = cuda.shared.array((BC, DP), float32)
        P = cuda.shared.array((BR, BCP), float32)
        dS = cuda.shared.array((BR, BCP), float32)
        lse_i = cuda.shared.array(BR, float32)
        D_i = cuda.shared.array(BR, float32)
        dKj = cuda.shared.array((BC, D), float32)      # dK~_j
        dVj = cuda.shared.array((BC, D), float32)      # dV~_j

        # line 6: initialise dQ = 0 in HBM (dK_j and dV_j are written whole, once per j)
        for e in range(tid, Nq * D, T):
            dq_acc[b, h, e // D, e % D] = ZERO
        cuda.syncthreads()  # line 22 adds to what other threads initialised

        for j in range(Tc):  # line 7
            # line 8: load K_j, V_j from HBM to on-chip SRAM (zeros past Nk)
            load_key_rows(k, v, Kj, Vj, b, h, j * BC, Nk, tid)
            # line 9: dK~_j = 0, dV~_j = 0 on SRAM (the same thread owns each entry below)
            for e in range(tid, BC * D, T):
                dKj[e // D, e % D] = ZERO
                dVj[e // D, e % D] = ZERO
            cuda.syncthreads()  # K_j, V_j complete before any thread reads them

            for i in range(Tr):  # line 10
                skip, all_on = _skip(i, j, BR, BC, Nq, Nk, klen, CAUSAL, PAD, SPARSE, bmask,
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
                    if visible(row, col, Nq, Nk, klen, CAUSAL) and (
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
