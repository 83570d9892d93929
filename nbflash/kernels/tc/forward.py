"""FlashAttention-2's forward on tensor cores (FA2 Algorithm 1): float16 / bfloat16 inputs,
float32 accumulation.

The same algorithm as nbflash.kernels.fa2.forward (FlashAttention-2, Dao 2023), with every
matrix product on the tensor cores through nbflash.kernels.common.warp (mma.sync m16n8k16,
ldmatrix) and tiles streamed into shared memory with cp.async; the backward is in
nbflash.kernels.tc.backward. Each warp owns 16 query rows of the block's tile (or two such
m-tiles) and holds its accumulators as mma fragments in registers (nbflash.kernels.tc.fragments
says which lane holds what).

One block of W warps per 16·W·RM query rows; Q_i is loaded once and kept in registers as A
fragments; K_j, V_j stream through STAGES shared buffers (the next STAGES - 1 tiles are in
flight while one is computed). S = Q K_jᵀ (B from K by ldmatrix), the online softmax on the S
fragments (row max and sum over the 4 lanes of a row by shuffles), P̃ converted to 16-bit A
fragments in registers (the S fragments of two 8-key slices are exactly one A fragment),
O += P̃ V_j (B from V by ldmatrix.trans). O is divided by ℓ at the end, and lse = m + log ℓ is
written.

Scores are in base 2, τ log2(e) folded into one float32 scale (fa2 splits it in two so as to
round the scaled score once; here P is rounded to 16 bits before its product, far coarser), and
2^x is ex2.approx.ftz (warp.exp2). As in FlashAttention-2's kernels the row max is taken over
the raw scores and scaled once per row, so that P̃ = 2^(s·scale - m) is one fma: per score the
forward spends a max, the fma, the exp2 and an add. That needs scale >= 0; a negative τ is
applied by flipping the sign bits of Q's fragments (exact), so s·|scale| is the same product.
Head dims that are not a multiple of 16 run on tiles padded to one (zero columns, loaded as
zeros and never stored). Masking, key padding, block sparsity and dropout use the device functions
every family shares (nbflash.kernels.common.masks, .dropout). Shared tiles hold 16-bit elements
as uint16 (numba-cuda has no bfloat16 type), rows padded by 8 elements (16 bytes) so that the 8
row addresses of an ldmatrix fall in different banks (nbflash.kernels.tc.tiles).
"""

import math

from numba import float32, uint16, uint32, uint64

from ..._cuda import cuda
from ..common.dropout import check_keep_tile, make_keep_tile, make_tile_kept
from ..common.masks import band_cuts, key_range, make_tile_walk, sees_a_key
from ..common.packed import ordered
from ..common.primitives import commit_async, make_row_reduce, make_wait_async
from ..common.softmax import NEG_INF, ZERO, alibi_bias, alibi_slope, finish_row, new_max
from ..common.warp import exp2, make_warp_ops
from .fragments import (fragment_bit, make_async_rows, make_fragment_mask, make_kv_stream,
                        make_load_a, make_mma2, make_pack_a, make_store_rows, store_lse_rows,
                        thread_coords)


def make_forward(t, causal, bf16, features):
    """FA2 forward on tensor cores for TcTiles `t` (nbflash.kernels.tc.tiles: W warps of
    RM = t.mtiles m-tiles of 16 query rows each, R = 16·W·RM rows per block; C keys per step);
    see the module docstring.
    With RM = 2 each K or V fragment a warp reads from shared memory feeds two mma, as in
    FlashAttention-2's kernels."""
    D, DP, C, STAGES, RM, QREGS = t.d, t.dp, t.cols, t.stages, t.mtiles, t.qregs
    R, T, DS = t.rows, t.threads, t.ds
    KD, NT, NV = DP // 16, C // 8, DP // 8
    # fragment array sizes (compile-time constants); m-tile mt's entries start at mt * size
    QF, SF, OF = 4 * KD, 4 * NT, 4 * NV
    N_Q, N_S, N_O, N_R, N_P = RM * QF, RM * SF, RM * OF, 2 * RM, 4 * RM
    N_QF = N_Q if QREGS else 4 * RM    # Q_i's fragments held: all, or one 16-dim step's
    CAUSAL = bool(causal)
    DROP, PAD, SPARSE, SOFTCAP, WINDOW, ALIBI, VARLEN = features
    ORDER = -ordered(CAUSAL, D)    # the longest query tiles first (packed.block_xyz)
    shared = t.smem_plan("forward", DROP)    # offsets in 16-bit elements (keep bits: uint32)
    Q_OFF, K_OFF, KEEP_OFF = shared.offset("Q"), shared.offset("KV"), shared.offset("keep", 4)
    STAGE, V_IN = shared.sub("KV").elements, shared.sub("KV").offset("V")   # K_j, V_j
    ldsm, ldsm_t, mma, pack, _ = make_warp_ops(T, bf16)
    mma2 = make_mma2(mma)
    load_q = make_async_rows(R, D, DP, DS, T)
    load_a, pack_a = make_load_a(ldsm), make_pack_a(pack)
    wait_q = make_wait_async(STAGES - 1)
    row_max, row_sum = make_row_reduce(4, T)
    fragment_mask = make_fragment_mask(NT, False, CAUSAL, SPARSE, WINDOW)
    fill_keep, tile_kept = make_keep_tile(R, C, T), make_tile_kept(C)
    check_keep_tile(DROP, C, t)
    store_rows = make_store_rows(D, DP, pack)
    walk = make_tile_walk(R, C, True, SPARSE)   # the key tiles, empty ones skipped (Alg. 5)
    start_kv, next_kv = make_kv_stream(C, D, DP, DS, T, STAGES, K_OFF, STAGE, V_IN, walk)

    def softmax_row(s, m, l, mt, h, vis, masked, tid, sc, ci, co, slope2, row, col0, Nq, Nk):
        """The online softmax (FA2 Alg. 1 lines 8-10) of row g + 8h of m-tile mt (query `row`):
        the running max of the scaled, visible scores (the raw scores' max times sc >= 0),
        P̃ = 2^(s·sc - m) in place of S (0 where masked), ℓ rescaled and added to; returns the
        factor alpha that rescales the row's output. SOFTCAP: the scores are tanh(s·ci)·co
        (ci >= 0: increasing in s, so the raw scores' max gives theirs). ALIBI: each score takes
        its own bias (softmax.alibi_bias, base 2), so the scores are scaled and biased first and
        their max taken after."""
        if ALIBI:
            t4 = tid % 4
            m_blk = NEG_INF
            for sl in range(NT):
                for e in range(2):
                    y = 4 * sl + 2 * h + e
                    x = mt * SF + y
                    z = math.tanh(s[x] * ci) * co if SOFTCAP else s[x] * sc
                    z += alibi_bias(slope2, row, col0 + 8 * sl + 2 * t4 + e, Nq, Nk)
                    if masked and not fragment_bit(vis, y):
                        z = NEG_INF
                    s[x] = z
                    m_blk = max(m_blk, z)
            r = 2 * mt + h
            m_new, m_ref, alpha = new_max(m[r], row_max(m_blk, tid))
            m[r] = m_new
            l_blk = ZERO
            for sl in range(NT):
                for e in range(2):
                    x = mt * SF + 4 * sl + 2 * h + e
                    p = exp2(s[x] - m_ref)      # (0 where masked: 2^-inf)
                    l_blk += p
                    s[x] = p
            l[r] = l[r] * alpha + l_blk
            return alpha
        m_blk = NEG_INF
        for sl in range(NT):
            for e in range(2):
                y = 4 * sl + 2 * h + e
                x = s[mt * SF + y]
                if masked and not fragment_bit(vis, y):
                    x = NEG_INF
                m_blk = max(m_blk, x)
        r = 2 * mt + h
        m_blk = row_max(m_blk, tid)
        if m_blk != NEG_INF:    # (-inf · 0 would be NaN for τ = 0)
            if SOFTCAP:
                m_blk = math.tanh(m_blk * ci) * co
            else:
                m_blk *= sc
        m_new, m_ref, alpha = new_max(m[r], m_blk)
        m[r] = m_new
        l_blk = ZERO
        for sl in range(NT):
            for e in range(2):
                y = 4 * sl + 2 * h + e
                x = mt * SF + y
                if SOFTCAP:
                    p = exp2(cuda.fma(math.tanh(s[x] * ci), co, -m_ref))
                else:
                    p = exp2(cuda.fma(s[x], sc, -m_ref))
                if masked and not fragment_bit(vis, y):
                    p = ZERO
                l_blk += p     # ℓ: the softmax's sum, before dropout
                s[x] = p
        l[r] = l[r] * alpha + l_blk
        return alpha

    def softmax_mtile(s, m, l, acc, mt, r0, col0, lane, tid, masked, Nq, Nk, klen, all_on,
                      bmask, mbase, nbk, bq, bk, sc, ci, co, left, right, slope2):
        """softmax_row for both rows of m-tile mt (r0 + g, r0 + g + 8), then its output rows
        rescaled. (One call per row rather than a loop: LLVM leaves a loop around so large a
        body rolled at d = 256, which puts the output fragments in local memory.)"""
        vis = fragment_mask(r0, col0, lane, Nq, Nk, klen, all_on, bmask, mbase, nbk, bq,
                            bk, left, right) if masked else uint64(0)
        row = r0 + lane // 4
        alpha0 = softmax_row(s, m, l, mt, 0, vis, masked, tid, sc, ci, co, slope2, row, col0,
                             Nq, Nk)
        alpha1 = softmax_row(s, m, l, mt, 1, vis, masked, tid, sc, ci, co, slope2, row + 8,
                             col0, Nq, Nk)
        for vt in range(NV):
            acc[mt * OF + 4 * vt] *= alpha0
            acc[mt * OF + 4 * vt + 1] *= alpha0
            acc[mt * OF + 4 * vt + 2] *= alpha1
            acc[mt * OF + 4 * vt + 3] *= alpha1

    def finish_mtile(o, lse, m, l, acc, mt, q_base, qsn, lse_at, r0, Nq, Nk, klen, bmask, mbase,
                     nbk, bq, bk, lane, tid, left, right):
        """O = diag(ℓ)^-1 O and lse = m + log ℓ of m-tile mt (rows r0 + g, r0 + g + 8); rows
        that see no key get 0 and -inf, non-finite scores NaN (finish_row)."""
        row = r0 + lane // 4
        l0 = row_sum(l[2 * mt], tid)
        l1 = row_sum(l[2 * mt + 1], tid)
        d0, lse0 = finish_row(m[2 * mt], l0, l0 != ZERO or sees_a_key(
            row, Nq, Nk, klen, CAUSAL, WINDOW, left, right, SPARSE, bmask, mbase, nbk, bq,
            bk))
        d1, lse1 = finish_row(m[2 * mt + 1], l1, l1 != ZERO or sees_a_key(
            row + 8, Nq, Nk, klen, CAUSAL, WINDOW, left, right, SPARSE, bmask, mbase, nbk, bq,
            bk))
        store_rows(o, q_base, qsn, r0, Nq, acc, mt * OF, 0, float32(1.0), d0, d1, lse0 == NEG_INF,
                   lse1 == NEG_INF, lane)
        store_lse_rows(lse, lse_at, row, Nq, lse0, lse1, lane)

    softmax_row = cuda.jit(device=True, inline=True)(softmax_row)
    softmax_mtile = cuda.jit(device=True, inline=True)(softmax_mtile)
    finish_mtile = cuda.jit(device=True, inline=True)(finish_mtile)
    assert RM in (1, 2), RM

    def tc_forward(q, k, v, o, lse, key_lengths, bmask, slopes, NqA, NkA, H, G, qsb, qsh, qsn,
                   ksb, ksh, ksn, sc_hi, sc_lo, cap_in, cap_out, left, right, asb, msb, msh, nbk,
                   bq, bk, seed_lo, seed_hi, offset, thr, drop_scale):
        """Grid (ceil(Nq/R), G, B·H / G), T threads, t.smem_bytes("forward", dropout) of dynamic
        shared memory; q, k, v, o: 16-bit bits (uint16), (B, H, N, d) flat in the layouts of
        strides qsb, qsh, qsn and ksb, ksh, ksn (nbflash.kernels.common.layouts), k and v with
        H / G heads (query head h reads key/value head h // G; thread_coords); lse: float32.
        NqA, NkA: the arrays' rows (Nq, Nk; a packed batch's total_q, total_k, its grid over
        max_seqlen_q: nbflash.kernels.common.packed).
        sc_hi = τ log2(e) rounded to float32; sc_lo is not used (fa2's argument layout);
        cap_in, cap_out: the softcap's (options.softcap_scalars; τ's sign is Q's flip)."""
        sc, ci = abs(sc_hi), abs(cap_in)
        flip = uint32(0x80008000) if sc_hi < ZERO else uint32(0)   # -Q for τ < 0 (sign bits)
        smem = cuda.shared.array(0, uint16)
        bits = cuda.shared.array(0, uint32)      # the same memory: keep bits at KEEP_OFF
        tid, warp, lane, bh, klen, mbase, q_base, k_base, Nq, Nk, lse_at, bx = thread_coords(
            H, G, NqA, NkA, key_lengths, msb, msh, PAD, VARLEN, ORDER, qsb, qsh, qsn, ksb, ksh,
            ksn)
        g, t4 = lane // 4, lane % 4
        row0 = bx * R
        if VARLEN and row0 >= Nq:    # past its sequence's queries (a packed batch)
            return
        slope2 = alibi_slope(slopes, bh, H, asb) if ALIBI else ZERO   # (base 2)
        wr = 16 * RM * warp                    # this warp's first query row in the block

        load_q(q, q_base, qsn, row0, Nq, smem, Q_OFF, tid)
        commit_async()
        j0, n_blocks = key_range(row0, R, C, Nq, Nk, klen, CAUSAL, WINDOW, left, right)
        # the tile walks (Alg. 5 skips tiles whose mask blocks are all off): jl is the next tile
        # to load, jc the next to compute; both visit the same tiles
        jl, _ = walk(j0, n_blocks, row0, bmask, mbase, nbk, bq, bk, Nq, klen)
        jc, all_on = walk(j0, n_blocks, row0, bmask, mbase, nbk, bq, bk, Nq, klen)
        jl = start_kv(k, v, k_base, ksn, klen, smem, tid, jl, n_blocks, row0, bmask, mbase, nbk, bq,
                      bk, Nq)                 # the first STAGES - 1 tiles in flight

        wait_q()              # Q_i is in (its group was committed first)
        cuda.syncthreads()
        mi = lane // 8
        a_lane = (lane % 8 + 8 * (mi % 2)) * DS + 8 * (mi // 2)    # A and ldmatrix.trans B
        b_lane = (lane % 8 + 8 * (mi // 2)) * DS + 8 * (mi % 2)    # B from rows (Kᵀ)
        qf = cuda.local.array(N_QF, uint32)   # Q_i's A fragments
        if QREGS:    # kept for every step
            for mt in range(RM):
                for kk in range(KD):
                    load_a(qf, mt * QF + 4 * kk, smem,
                           Q_OFF + (wr + 16 * mt) * DS + 16 * kk + a_lane, flip)

        m = cuda.local.array(N_R, float32)    # running max of rows g, g + 8 of each m-tile
        l = cuda.local.array(N_R, float32)    # this lane's part of their ℓ
        acc = cuda.local.array(N_O, float32)   # unnormalised O_i fragments
        s = cuda.local.array(N_S, float32)
        pa = cuda.local.array(N_P, uint32)    # P̃'s A fragments for one 16-key step
        for r in range(N_R):
            m[r] = NEG_INF
            l[r] = ZERO
        for x in range(N_O):
            acc[x] = ZERO

        step = 0
        while jc < n_blocks:
            col0 = jc * C
            buf, jl = next_kv(k, v, k_base, ksn, klen, smem, tid, jl, n_blocks, row0, bmask, mbase,
                              nbk, bq, bk, Nq, step)
            if DROP:
                fill_keep(bits, KEEP_OFF, row0, col0, bh, seed_lo, seed_hi, offset, thr, tid)
                cuda.syncthreads()

            # S = Q_i K_jᵀ: B fragments of 16 keys x 16 dims from K_j's rows, each used by the
            # warp's RM m-tiles
            for x in range(N_S):
                s[x] = ZERO
            for kk in range(KD):
                if not QREGS:   # Q_i's fragments for these 16 dims, from shared memory
                    for mt in range(RM):
                        load_a(qf, 4 * mt, smem, Q_OFF + (wr + 16 * mt) * DS + 16 * kk + a_lane,
                               flip)
                for np2 in range(NT // 2):
                    b0, b1, b2, b3 = ldsm(smem, buf + 16 * np2 * DS + 16 * kk + b_lane)
                    for mt in range(RM):
                        a = mt * QF + 4 * kk if QREGS else 4 * mt
                        x = mt * SF + 8 * np2
                        mma2(s, x, qf[a], qf[a + 1], qf[a + 2], qf[a + 3], b0, b1, b2, b3)

            masked = col0 + C > klen or band_cuts(row0, R, col0, C, Nq, Nk, CAUSAL, WINDOW,
                                                  left, right) or not all_on
            softmax_mtile(s, m, l, acc, 0, row0 + wr, col0, lane, tid, masked, Nq, Nk, klen,
                          all_on, bmask, mbase, nbk, bq, bk, sc, ci, cap_out, left, right,
                          slope2)
            if RM == 2:   # (a call per m-tile: LLVM leaves a loop around this body rolled)
                softmax_mtile(s, m, l, acc, 1, row0 + wr + 16, col0, lane, tid, masked, Nq,
                              Nk, klen, all_on, bmask, mbase, nbk, bq, bk, sc, ci, cap_out, left,
                              right, slope2)
            if DROP:   # P̃ ∘ Z / (1 - p) for O (FlashAttention Alg. 2 line 13)
                for x in range(N_S):
                    y = x % SF
                    r = wr + 16 * (x // SF) + g + 8 * ((y // 2) % 2)
                    c = 8 * (y // 4) + 2 * t4 + y % 2
                    s[x] *= drop_scale if tile_kept(bits, KEEP_OFF, r, c) else ZERO

            # O_i += P̃ V_j: P̃ as A fragments (16 keys = two 8-key slices), B from V_j by
            # ldmatrix.trans, each used by the warp's RM m-tiles
            for kk in range(NT // 2):
                for mt in range(RM):
                    pa[4 * mt], pa[4 * mt + 1], pa[4 * mt + 2], pa[4 * mt + 3] = pack_a(
                        s, mt * SF + 8 * kk)
                for dp in range(NV // 2):
                    b0, b1, b2, b3 = ldsm_t(smem, buf + V_IN + 16 * kk * DS + 16 * dp + a_lane)
                    for mt in range(RM):
                        y = mt * OF + 8 * dp
                        a0, a1, a2, a3 = pa[4 * mt], pa[4 * mt + 1], pa[4 * mt + 2], \
                            pa[4 * mt + 3]
                        mma2(acc, y, a0, a1, a2, a3, b0, b1, b2, b3)
            jc, all_on = walk(jc + 1, n_blocks, row0, bmask, mbase, nbk, bq, bk, Nq, klen)
            step += 1

        # O_i = diag(ℓ)^-1 O_i, written once; lse = m + log ℓ (natural log)
        finish_mtile(o, lse, m, l, acc, 0, q_base, qsn, lse_at, row0 + wr, Nq, Nk, klen, bmask,
                     mbase, nbk, bq, bk, lane, tid, left, right)
        if RM == 2:
            finish_mtile(o, lse, m, l, acc, 1, q_base, qsn, lse_at, row0 + wr + 16, Nq, Nk, klen,
                         bmask, mbase, nbk, bq, bk, lane, tid, left, right)

    return tc_forward
