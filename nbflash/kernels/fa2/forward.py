"""FlashAttention-2's forward for float32 math on CUDA cores, register-tiled (FA2 Algorithm 1).

Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning" (2023).
What differs from fa1 (the FlashAttention paper's Algorithms 1 and 4) is the work partitioning
(FA2 §3.1-3.2); the maths is the same. The backward (FA2 Algorithm 2) is in
nbflash.kernels.fa2.backward.

- One block per (query block i, head, batch); it loads Q_i once and walks the key/value blocks
  j. Each thread keeps its rows' running max m and sum ℓ and its slice of the *unnormalised*
  output O_i in registers; O_i is divided by ℓ once at the end and only lse = m + log ℓ is
  written for the backward.
- Causal: blocks above the diagonal are skipped; only blocks that straddle the diagonal (or the
  ragged ends of the sequences) evaluate the mask, element by element.

Scores are handled in base 2 (nbflash.kernels.common.softmax): τ log2(e) is folded into one
scale so that P = 2^(s' - m') with math.exp2 (``ex2.approx``). That scale is passed as two
float32 (hi + lo) and the product is taken as fma(s, hi, s·lo), so folding it in costs no
accuracy: s' is s·τ·log2(e) rounded once, as the naive baseline rounds s·τ. The forward and the
backward compute s' the same way, bit for bit. lse is stored in natural-log units, as fa1 and
the naive baseline store it.

Key padding, block masks (Algorithm 5 of the FlashAttention paper) and dropout are compile-time
options (nbflash.kernels.common.options): tiles past a key length or whose mask blocks are all
off are skipped (nbflash.kernels.common.masks), and the mask is evaluated element by element
only in tiles that straddle an edge. Dropout's keep bits are drawn per tile into shared memory
(nbflash.kernels.common.dropout.make_keep_tile), once per 8 keys, in the forward and again in
the backward; ℓ sums P before dropout, O uses P ∘ Z / (1-p).

Tiles are described by nbflash.kernels.fa2.tiles.RegTiles (R rows owned by the block, C rows of
the other operand per step, tm x tn scores per thread); products go through
nbflash.kernels.fa2.regtile and the row reductions through warp shuffles
(nbflash.kernels.common.primitives). Inputs are flat (contiguous) views of the (B, H, N, d)
arrays, so a launch passes few arguments.
"""

import math

from numba import float32, uint32

from ..._cuda import cuda
from ..common.dropout import check_keep_tile, make_drop, make_keep_tile
from ..common.masks import (ALL, band_cuts, bit_on, key_range, make_block_bits, make_tile_walk,
                           sees_a_key, visible)
from ..common.options import Features
from ..common.primitives import (commit_async, make_row_reduce, wait_async_all,
                                 wait_async_all_but_1)
from ..common.softmax import (NAN, NEG_INF, ZERO, alibi_slope, finish_row,
                              make_bias_scores, make_cap_scores, new_max, scaled)
from .regtile import (make_dot_cols, make_dot_rows, make_pair_loader, make_tile_loader,
                      thread_coords, tile_constants)


def make_forward(t, causal, dtype="float32", features=Features()):
    """FA2 forward for RegTiles `t` (R query rows per block, C keys per step).

    With t.stages = 2 the K, V tiles are double-buffered: block j + 1 is copied (cp.async for
    float32 inputs) while block j is computed on. `features`: the options' Features
    (nbflash.kernels.common.options).
    """
    R, C, D, TM, TN, L, RG, T, TX4, TX, DS, W = tile_constants(t)
    N_S, N_ACC = TM * TN, TM * TX       # local array sizes (compile-time constants)
    PS = t.ps(C)
    CAUSAL = bool(causal)
    DROP, PAD, SPARSE, SOFTCAP, WINDOW, ALIBI, VARLEN = features
    ORDER = 0    # the hardware's block order (tc's causal kernels change it: packed.block_xyz)
    STAGES = t.stages
    ASYNC = STAGES == 2 and str(dtype) == "float32" and D % 4 == 0
    smem = t.smem_plan("forward", DROP)     # the regions' offsets, in float32 elements
    Q_OFF, K_OFF, P_OFF, KEEP_OFF = (smem.offset(n) for n in ("Q", "KV", "P", "keep"))
    KV, V_IN_KV = smem.sub("KV").elements, smem.sub("KV").offset("V")   # a stage of K_j, V_j
    load_q = make_tile_loader(R, D, W, DS, T)
    load_kv = make_pair_loader(make_tile_loader(C, D, W, DS, T, ASYNC), V_IN_KV)
    qk = make_dot_rows(TM, TN, t.d4, RG * DS, L * DS)          # S = Q Kᵀ
    pv = make_dot_cols(TM, TX4, C // 4, RG * PS, DS, 4 * L)    # O += P̃ V
    row_max, row_sum = make_row_reduce(L, T)
    fill_keep, (drop_tile, _) = make_keep_tile(R, C, T), make_drop(TM, TN, RG, L, C)
    check_keep_tile(DROP, C, t)
    block_bits = make_block_bits(TM, TN, RG, L, SPARSE)
    walk = make_tile_walk(R, C, True, SPARSE)   # the key tiles, empty ones skipped (Alg. 5)
    cap_scores = make_cap_scores(N_S)
    bias_scores = make_bias_scores(TM, TN, RG, L, SOFTCAP)
    SCALED = SOFTCAP or ALIBI      # the scores are in base 2 after those passes

    def fa2_forward(q, k, v, o, lse, key_lengths, bmask, slopes, NqA, NkA, H, G, qsb, qsh, qsn,
                    ksb, ksh, ksn, sc_hi, sc_lo, cap_in, cap_out, left, right, asb, msb, msh, nbk,
                    bq, bk, seed_lo, seed_hi, offset, thr, drop_scale):
        """Grid (ceil(Nq/R), G, B·H / G) (thread_coords), T threads, t.smem_bytes("forward",
        dropout) of dynamic shared memory. q, o: (B, H, Nq, d); k, v: (B, H / G, Nk, d) (query
        head h reads key/value head h // G), flat in the layouts of strides qsb, qsh, qsn and
        ksb, ksh, ksn (nbflash.kernels.common.layouts); lse: flat (B, H, Nq) float32. NqA, NkA:
        the arrays' rows (Nq, Nk; a packed batch's total_q, total_k, its grid over
        max_seqlen_q: nbflash.kernels.common.packed).
        sc_hi + sc_lo = τ log2(e) (:func:`split_scale`); cap_in, cap_out: the softcap's
        (options.softcap_scalars); then the options' arguments (nbflash.kernels.common.options:
        the window's bounds first)."""
        smem = cuda.shared.array(0, float32)
        bits = cuda.shared.array(0, uint32)      # the same memory: keep bits at KEEP_OFF
        tid, rg, cg, bh, q_base, k_base, klen, mbase, Nq, Nk, lse_at, bx = thread_coords(
            L, H, G, NqA, NkA, key_lengths, msb, msh, PAD, VARLEN, ORDER, qsb, qsh, qsn, ksb, ksh,
            ksn)
        row0 = bx * R
        if VARLEN and row0 >= Nq:    # past its sequence's queries (a packed batch)
            return
        slope2 = alibi_slope(slopes, bh, H, asb) if ALIBI else ZERO   # (base 2)

        load_q(q, q_base, qsn, row0, Nq, smem, Q_OFF, tid)          # Q_i, once
        m = cuda.local.array(TM, float32)                       # running max (base 2)
        l = cuda.local.array(TM, float32)                       # this thread's part of ℓ
        acc = cuda.local.array(N_ACC, float32)                # unnormalised O_i slice
        for i in range(TM):
            m[i] = NEG_INF
            l[i] = ZERO
        for x in range(TM * TX):
            acc[x] = ZERO
        s = cuda.local.array(N_S, float32)

        # key blocks past the key length, with causal masking those after the last key the
        # block's last row sees, and with a window those outside the block's rows' windows are
        # skipped; so are those the block mask hides (Alg. 5)
        j, n_blocks = key_range(row0, R, C, Nq, Nk, klen, CAUSAL, WINDOW, left, right)
        j, all_on = walk(j, n_blocks, row0, bmask, mbase, nbk, bq, bk, Nq, klen)
        if STAGES == 2 and j < n_blocks:   # the first block into stage 0
            load_kv(k, v, k_base, ksn, j * C, klen, smem, K_OFF, tid)
            commit_async()
        step = 0
        while j < n_blocks:
            col0 = j * C
            j_next, next_all_on = walk(j + 1, n_blocks, row0, bmask, mbase, nbk, bq, bk, Nq,
                                       klen)
            cuda.syncthreads()   # the previous step has finished reading its K, V, P̃ and bits
            if STAGES == 2:      # K_j, V_j were loaded one step ahead; fetch the next ones
                k_off = K_OFF + (step % 2) * KV
                if j_next < n_blocks:
                    load_kv(k, v, k_base, ksn, j_next * C, klen, smem,
                            K_OFF + ((step + 1) % 2) * KV, tid)
                    commit_async()
                    wait_async_all_but_1()
                else:
                    wait_async_all()
            else:
                k_off = K_OFF
                load_kv(k, v, k_base, ksn, col0, klen, smem, K_OFF, tid)
            if DROP:
                fill_keep(bits, KEEP_OFF, row0, col0, bh, seed_lo, seed_hi, offset, thr, tid)
            v_off = k_off + V_IN_KV
            cuda.syncthreads()   # K_j, V_j (and the keep bits) complete for every thread

            for x in range(TM * TN):
                s[x] = ZERO
            qk(smem, Q_OFF + rg * DS, k_off + cg * DS, s)
            if SOFTCAP:   # softcap·tanh(τ s / softcap) in base 2 (make_cap_scores)
                cap_scores(s, cap_in, cap_out)
            if ALIBI:     # and ALiBi's bias after it (make_bias_scores)
                bias_scores(s, sc_hi, sc_lo, slope2, row0 + rg, col0 + cg, Nq, Nk)
            # the mask is evaluated only where the block reaches past the key length, over the
            # diagonal, or over mask blocks that are off
            on = block_bits(all_on, bmask, mbase, nbk, bq, bk, row0, col0, rg, cg, Nq, klen)
            masked = col0 + C > klen or band_cuts(row0, R, col0, C, Nq, Nk, CAUSAL, WINDOW,
                                                  left, right) or on != ALL
            for i in range(TM):
                row = row0 + rg + RG * i
                m_blk = NEG_INF
                for u in range(TN):
                    sc = s[i * TN + u] if SCALED else scaled(s[i * TN + u], sc_hi, sc_lo)
                    if masked and not (visible(row, col0 + cg + L * u, Nq, Nk, klen, CAUSAL,
                                               WINDOW, left, right) and bit_on(on, i * TN + u)):
                        sc = NEG_INF
                    s[i * TN + u] = sc
                    m_blk = max(m_blk, sc)
                m_new, m_ref, alpha = new_max(m[i], row_max(m_blk, tid))
                m[i] = m_new
                l_blk = ZERO
                for u in range(TN):
                    p = math.exp2(s[i * TN + u] - m_ref)
                    l_blk += p        # ℓ: the softmax's sum, before dropout
                    smem[P_OFF + (rg + RG * i) * PS + cg + L * u] = p
                l[i] = l[i] * alpha + l_blk
                for x in range(TX):
                    acc[i * TX + x] *= alpha
            if DROP:   # P̃ ∘ Z / (1 - p) for O (FlashAttention Alg. 2 line 13), the thread's own
                drop_tile(smem, P_OFF, PS, bits, KEEP_OFF, rg, cg, drop_scale)   # entries
            cuda.syncthreads()   # P̃ complete
            pv(smem, P_OFF + rg * PS, v_off + 4 * cg, acc)
            j, all_on = j_next, next_all_on
            step += 1

        # O_i = diag(ℓ)^-1 O_i, written once; lse = m + log ℓ (natural log); rows that see no
        # key get 0 and -inf, non-finite scores NaN (finish_row). With a block mask, whether a
        # row with ℓ = 0 sees keys takes a loop over its mask blocks: such a row is written as
        # one that sees none, then made NaN by a second loop if it does (a loop inside this
        # one would keep it from unrolling, and acc from staying in registers)
        empty = uint32(0)
        for i in range(TM):
            row = row0 + rg + RG * i
            l_row = row_sum(l[i], tid)
            if row < Nq:
                sees = l_row != ZERO or (not SPARSE and sees_a_key(
                    row, Nq, Nk, klen, CAUSAL, WINDOW, left, right, False, bmask, mbase, nbk,
                    bq, bk))
                div, lse_row = finish_row(m[i], l_row, sees)
                if SPARSE and l_row == ZERO:
                    empty |= uint32(1) << uint32(i)
                for u in range(TX4):
                    for e in range(4):
                        col = u * 4 * L + 4 * cg + e
                        if col < D:
                            # (0, not 0 / 1: a masked key's 0 · inf in acc is NaN)
                            o[q_base + row * qsn + col] = ZERO if lse_row == NEG_INF \
                                else acc[i * TX + 4 * u + e] / div
                if cg == 0:
                    lse[lse_at + row] = lse_row
        if SPARSE and empty != 0:
            for i in range(TM):
                row = row0 + rg + RG * i
                if (empty >> uint32(i)) & uint32(1) != 0 and sees_a_key(
                        row, Nq, Nk, klen, CAUSAL, WINDOW, left, right, SPARSE, bmask, mbase,
                        nbk, bq, bk):
                    for u in range(TX4):
                        for e in range(4):
                            col = u * 4 * L + 4 * cg + e
                            if col < D:
                                o[q_base + row * qsn + col] = NAN
                    if cg == 0:
                        lse[lse_at + row] = NAN

    return fa2_forward
