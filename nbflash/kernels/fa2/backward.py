"""FlashAttention-2's backward for float32 math on CUDA cores, register-tiled (FA2 Algorithm 2).

The forward (FA2 Algorithm 1) and what the two share are described in
nbflash.kernels.fa2.forward. The backward recomputes S and P from Q, K and the forward's lse:

- D = rowsum(dO ∘ O) first (nbflash.kernels.common.softmax.make_delta, FA2 Alg. 2 line 4);
- then one block per (key block j, head, batch) keeps dK_j and dV_j in registers while it
  walks the query blocks (:func:`make_dkdv`; for float32 inputs each block's share is summed on
  its own and then added, so that the float32 sums do not lose bits in proportion to Nq). dQ gets the contribution of each (i, j) pair
  either by atomic adds from that same loop (fast, but the order of the adds, and so the last
  bits of dq, vary from run to run) or, for ``deterministic=True``, from a separate pass with
  one block per query block that walks the key blocks in order (:func:`make_dq`).

Grouped-query heads (k and v with H / G heads): the forward and the dQ pass read key/value head
h // G; a dK/dV block owns a key block of one key/value head and walks the query blocks of each
of its G query heads in turn (one walk over (head, block) cursors:
nbflash.kernels.common.masks.make_group_walk), so dK_j and dV_j are summed over the group in registers and
written once (no atomics); the dQ it adds atomically goes to each query head's rows. Dropout's
mask and the block mask stay the query head's.

The backward takes s' - lse log2(e) with log2(e) in two parts (LOG2E + LOG2E_LO), and
P = 2^min(s' - lse log2(e), 0) <= 1 (converting lse back can put it an ulp below the forward's
largest score). With dropout the forward's keep bits are drawn again: dV uses P ∘ Z / (1-p) and
dP is dP ∘ Z / (1-p).
"""

import math

from numba import float32, uint32

from ..._cuda import cuda
from ..common.dropout import check_keep_tile, make_drop, make_keep_tile
from ..common.masks import (ALL, band_cuts, bit_on, cursor_tile, key_range, make_block_bits,
                            make_group_walk, make_tile_walk, mask_base, query_range,
                            tile_status, visible)
from ..common.packed import head_base, lse_base
from ..common.options import Features
from ..common.primitives import commit_async, wait_async_all, wait_async_all_but_1
from ..common.softmax import (LOG2E, LOG2E_LO, ONE, ZERO, alibi_bias, alibi_slope,
                              clamp_nonpositive, make_cap_scores, row_stats, scaled)
from .regtile import (kv_coords, make_dot_cols, make_dot_rows, make_pair_loader, make_row_store,
                      make_tile_loader, thread_coords, tile_constants)


def make_p_and_ds(SOFTCAP, ALIBI):
    """Device function: P = 2^min(s' - lse log2(e), 0) (see the module docstring) and
    dS = P (dP - D); lse_lo = lse · LOG2E_LO. SOFTCAP: s is the softcapped score already
    (base 2, softmax.make_cap_scores), whose tanh is s · inv_co, and dS takes the derivative's
    factor 1 - tanh² (the chain rule through softcap·tanh(τ s / softcap)). ALIBI: s' takes
    ALiBi's `bias` too (base 2, softmax.alibi_bias: a constant of the score, so dS as without)."""

    def p_and_ds(s, dp, sc_hi, sc_lo, inv_co, lse, lse_lo, dlt, bias):
        x = s if SOFTCAP else scaled(s, sc_hi, sc_lo)
        if ALIBI:
            x += bias
        p = math.exp2(clamp_nonpositive(cuda.fma(-lse, LOG2E, x) - lse_lo))
        ds = p * (dp - dlt)
        if SOFTCAP:
            t = s * inv_co
            ds *= ONE - t * t
        return p, ds

    return cuda.jit(device=True, inline=True)(p_and_ds)



def make_dkdv(t, causal, atomic_dq, dtype="float32", features=Features()):
    """FA2 backward over key blocks for RegTiles `t` (R keys per block, C queries per step).

    atomic_dq: also add τ dS K_j into the float32 buffer dq_acc with atomics. With t.stages = 2
    the streamed Q_i, dO_i (and lse_i, D_i) are double-buffered: step i + 1's are copied
    (cp.async for float32 inputs) while step i computes.
    """
    R, C, D, TM, TN, L, RG, T, TX4, TX, DS, W = tile_constants(t)
    N_S, N_ACC = TM * TN, TM * TX       # local array sizes (compile-time constants)
    PSC, PSR = t.ps(C), t.ps(R)
    TMQ = C // RG        # dQ rows per thread
    N_DQ = TMQ * TX
    CAUSAL, ATOMIC = bool(causal), bool(atomic_dq)
    DROP, PAD, SPARSE, SOFTCAP, WINDOW, ALIBI, VARLEN = features
    ORDER = 0    # the hardware's block order (tc's causal kernels change it: packed.block_xyz)
    p_and_ds, cap_scores = make_p_and_ds(SOFTCAP, ALIBI), make_cap_scores(N_S)
    STAGES = t.stages
    ASYNC = STAGES == 2 and str(dtype) == "float32" and D % 4 == 0
    # dK_j, dV_j of float32 inputs summed in two levels (each step's share on its own, then
    # added): one running float32 sum over every query row loses bits in proportion to Nq
    # (3.9-5.7x the naive baseline's dV error at Nk = 1, Nq = 239 on the H200; two levels
    # 1.4-2.1x). The step's share takes N_ACC more registers, which the dropout variant does not
    # have (it spilled): that one keeps one sum, as do 16-bit inputs, whose dK, dV are rounded
    # to 16 bits far above that error
    TWO_LEVEL = not DROP and str(dtype) == "float32"
    smem = t.smem_plan("dkdv", DROP)        # the regions' offsets, in float32 elements
    K_OFF, V_OFF, PT_OFF, DST_OFF, DS_OFF, Q_OFF, KEEP_OFF = (smem.offset(n) for n in (
        "K", "V", "Pt", "dSt", "dS", "steps", "keep"))     # keep bits: C queries x R keys
    step_plan = smem.sub("steps")         # stage s: Q_i, dO_i, lse_i, D_i at Q_OFF + s * STAGE
    STAGE, DO_IN, LSE_IN, D_IN = (step_plan.elements, *(step_plan.offset(n) for n in
                                                        ("dO", "lse", "D")))
    load_kv = make_pair_loader(make_tile_loader(R, D, W, DS, T), V_OFF - K_OFF)
    load_q = make_pair_loader(make_tile_loader(C, D, W, DS, T, ASYNC), DO_IN)
    rows_dot = make_dot_rows(TM, TN, t.d4, RG * DS, L * DS)        # Sᵀ = K Qᵀ, dPᵀ = V dOᵀ
    cols_dot = make_dot_cols(TM, TX4, C // 4, RG * PSC, DS, 4 * L)  # dV += Pᵀ dO, dK += dSᵀ Q
    dq_dot = make_dot_cols(TMQ, TX4, R // 4, RG * PSR, DS, 4 * L)   # dQ_i += dS K_j
    store_row, add_row = make_row_store(TX4, L, D)
    fill_keep, (drop_tile, drop_regs) = make_keep_tile(C, R, T), make_drop(TM, TN, RG, L, R, True)
    check_keep_tile(DROP, R, t)
    block_bits = make_block_bits(TM, TN, RG, L, SPARSE, True)
    walk = make_tile_walk(C, R, False, SPARSE)   # the query tiles, empty ones skipped (Alg. 5)
    group_walk = make_group_walk(walk)           # ... of each query head of the group

    def load_step(q, do, lse, delta, q_base, qsn, lse_at, row0, Nq, smem, off, tid):
        """Q_i, dO_i (rows qsn apart), lse_i and D_i (see row_stats; the head's row 0 at
        lse_at) to `off`."""
        load_q(q, do, q_base, qsn, row0, Nq, smem, off, tid)
        for r in range(tid, C, T):
            row = row0 + r
            lse_r, dlt = row_stats(lse, delta, lse_at + row, row < Nq)
            smem[off + LSE_IN + r] = lse_r
            smem[off + D_IN + r] = dlt

    load_step = cuda.jit(device=True, inline=True)(load_step)

    def load_cursor(q, do, lse, delta, c, n_steps, q_group, lse_group, NqA, qsh, qsn, Nq, smem,
                    off, tid):
        """load_step for the tile of cursor c (nbflash.kernels.common.masks.cursor_tile);
        q_group, lse_group: where the group's first query head starts, and its lse (a head's
        lse NqA further on)."""
        g, i = cursor_tile(c, n_steps)
        load_step(q, do, lse, delta, q_group + g * qsh, qsn, lse_group + g * NqA, i * C, Nq,
                  smem, off, tid)

    load_cursor = cuda.jit(device=True, inline=True)(load_cursor)

    def fa2_dkdv(q, k, v, do, lse, delta, dq_acc, dk, dv, key_lengths, bmask, slopes, NqA, NkA, H,
                 G, qsb, qsh, qsn, ksb, ksh, ksn, sc_hi, sc_lo, scale, cap_in, cap_out, left, right,
                 asb, msb, msh, nbk, bq, bk, seed_lo, seed_hi, offset, thr, drop_scale):
        """Grid (ceil(Nk/R), H / G, B) over key/value heads, T threads, t.smem_bytes("dkdv",
        dropout) of dynamic shared memory. The block walks the query tiles of each of its G
        query heads in turn (grouped-query heads: dK_j, dV_j summed over the group in
        registers, written once, no atomics). delta: D from fa2_delta; dq_acc: zeroed float32
        (B, H, Nq, d) in q's layout, used if atomic_dq (the layouts' strides: as the
        forward's); then the options' arguments
        (nbflash.kernels.common.options)."""
        smem = cuda.shared.array(0, float32)
        inv_co = ONE / cap_out if SOFTCAP else ZERO    # a softcapped score's tanh: s / cap_out
        bits = cuda.shared.array(0, uint32)      # the same memory: keep bits at KEEP_OFF
        tid, rg, cg, b, hk, klen, q0, Nq, k0, Nk, bx = kv_coords(L, NqA, NkA, key_lengths, PAD,
                                                                 VARLEN, ORDER)
        key0 = bx * R
        if VARLEN and key0 >= Nk:    # past its sequence's keys (a packed batch)
            return
        k_base = head_base(b, hk, cuda.gridDim.y, ksb, ksh, ksn, k0, VARLEN)
        q_group = head_base(b, hk * G, H, qsb, qsh, qsn, q0, VARLEN)   # the group's first
        lse_group = lse_base(b, hk * G, H, NqA, q0, VARLEN)             # query head

        load_kv(k, v, k_base, ksn, key0, klen, smem, K_OFF, tid)
        dk_acc = cuda.local.array(N_ACC, float32)
        dv_acc = cuda.local.array(N_ACC, float32)
        part = cuda.local.array(N_ACC, float32)   # one step's share of dV, then of dK
        for x in range(TM * TX):
            dk_acc[x] = ZERO
            dv_acc[x] = ZERO
        st = cuda.local.array(N_S, float32)
        dpt = cuda.local.array(N_S, float32)
        dq_part = cuda.local.array(N_DQ, float32)

        # causal: query blocks whose last row sees no key of this block come first; skip them
        # (with a window, also those from `last` on, whose first keys come after these).
        # Keys past the key length get no step (dK, dV = 0); nor do query blocks that the block
        # mask hides from these keys (Alg. 5)
        first, last = query_range(key0, R, C, Nq, Nk, CAUSAL, WINDOW, left, right)
        n_steps = (Nq + C - 1) // C if key0 < klen else first
        last = min(last, n_steps) if WINDOW else n_steps
        # the group's query heads one after the other, as one walk over cursors
        # c = gq·n_steps + i (query head hk·G + gq, its query tile i; masks.make_group_walk)
        end = G * n_steps
        c, all_on = group_walk(first, first, last, n_steps, G, hk, b, H, msb, msh, key0, bmask,
                               nbk, bq, bk, Nq, klen)
        if STAGES == 2 and c < end:
            load_cursor(q, do, lse, delta, c, n_steps, q_group, lse_group, NqA, qsh, qsn, Nq, smem,
                        Q_OFF, tid)
            commit_async()
        step = 0
        while c < end:
            gq, i = cursor_tile(c, n_steps)   # this step's query head and tile
            bh = hk * G + gq
            slope2 = alibi_slope(slopes, bh, H, asb) if ALIBI else ZERO   # (base 2)
            q_base = q_group + gq * qsh
            row0 = i * C
            c_next, next_all_on = group_walk(c + 1, first, last, n_steps, G, hk, b, H, msb,
                                             msh, key0, bmask, nbk, bq, bk, Nq, klen)
            cuda.syncthreads()   # the previous step has finished with its stage, Pᵀ, dSᵀ, dS
            if STAGES == 2:
                off = Q_OFF + (step % 2) * STAGE
                if c_next < end:
                    load_cursor(q, do, lse, delta, c_next, n_steps, q_group, lse_group, NqA, qsh,
                                qsn, Nq, smem, Q_OFF + ((step + 1) % 2) * STAGE, tid)
                    commit_async()
                    wait_async_all_but_1()
                else:
                    wait_async_all()
            else:
                off = Q_OFF
                load_step(q, do, lse, delta, q_base, qsn, lse_group + gq * NqA, row0, Nq, smem,
                          off, tid)
            if DROP:   # the forward's keep bits, drawn again (Alg. 4 line 14)
                fill_keep(bits, KEEP_OFF, row0, key0, bh, seed_lo, seed_hi, offset, thr, tid)
            do_off = off + DO_IN
            lse_off = off + LSE_IN
            d_off = off + D_IN
            cuda.syncthreads()   # Q_i, dO_i, lse_i, D_i (and the keep bits) complete

            for x in range(TM * TN):
                st[x] = ZERO
                dpt[x] = ZERO
            rows_dot(smem, K_OFF + rg * DS, off + cg * DS, st)
            if SOFTCAP:
                cap_scores(st, cap_in, cap_out)
            rows_dot(smem, V_OFF + rg * DS, do_off + cg * DS, dpt)
            if DROP:   # dropout: dP ∘ Z / (1-p) enters dS (Alg. 4 line 19) ...
                drop_regs(dpt, bits, KEEP_OFF, rg, cg, drop_scale)
            on = block_bits(all_on, bmask, mask_base(b, bh, H, msb, msh), nbk, bq, bk, row0, key0,
                            rg, cg, Nq, klen)
            masked = row0 + C > Nq or key0 + R > klen or \
                band_cuts(row0, C, key0, R, Nq, Nk, CAUSAL, WINDOW, left, right) or on != ALL
            for a in range(TM):
                kr = rg + RG * a                  # key row within the block
                for u in range(TN):
                    qr = cg + L * u               # query row within the block
                    lse_q = smem[lse_off + qr]
                    bias = alibi_bias(slope2, row0 + qr, key0 + kr, Nq, Nk) if ALIBI else ZERO
                    p, ds = p_and_ds(st[a * TN + u], dpt[a * TN + u], sc_hi, sc_lo, inv_co,
                                      lse_q, lse_q * LOG2E_LO, smem[d_off + qr], bias)
                    if masked and not (visible(row0 + qr, key0 + kr, Nq, Nk, klen, CAUSAL,
                                               WINDOW, left, right) and bit_on(on, a * TN + u)):
                        p = ZERO
                        ds = ZERO
                    smem[PT_OFF + kr * PSC + qr] = p
                    smem[DST_OFF + kr * PSC + qr] = ds
                    if ATOMIC:
                        smem[DS_OFF + qr * PSR + kr] = ds
            if DROP:   # ... and dV takes P ∘ Z / (1-p) (line 17)
                drop_tile(smem, PT_OFF, PSC, bits, KEEP_OFF, rg, cg, drop_scale)
            cuda.syncthreads()   # Pᵀ, dSᵀ (and dS) complete
            if TWO_LEVEL:   # dV += Pᵀ dO_i, dK += dSᵀ Q_i, the step's share summed on its
                for x in range(N_ACC):   # own, then added to the running sums
                    part[x] = ZERO
                cols_dot(smem, PT_OFF + rg * PSC, do_off + 4 * cg, part)
                for x in range(N_ACC):
                    dv_acc[x] += part[x]
                    part[x] = ZERO
                cols_dot(smem, DST_OFF + rg * PSC, off + 4 * cg, part)
                for x in range(N_ACC):
                    dk_acc[x] += part[x]
            else:
                cols_dot(smem, PT_OFF + rg * PSC, do_off + 4 * cg, dv_acc)
                cols_dot(smem, DST_OFF + rg * PSC, off + 4 * cg, dk_acc)
            if ATOMIC:
                for x in range(TMQ * TX):
                    dq_part[x] = ZERO
                dq_dot(smem, DS_OFF + rg * PSR, K_OFF + 4 * cg, dq_part)
                for a in range(TMQ):
                    row = row0 + rg + RG * a
                    if row < Nq:
                        add_row(dq_acc, q_base, qsn, row, dq_part, a, cg, scale)
            c, all_on = c_next, next_all_on
            step += 1

        for a in range(TM):   # dK_j = τ Σ_i dS_ijᵀ Q_i, dV_j = Σ_i P_ijᵀ dO_i, written once
            key = key0 + rg + RG * a
            if key < Nk:
                store_row(dk, k_base, ksn, key, dk_acc, a, cg, scale)
                store_row(dv, k_base, ksn, key, dv_acc, a, cg, ONE)

    return fa2_dkdv


def make_dq(t, causal, features=Features()):
    """The deterministic dQ pass for RegTiles `t` (R queries per block, C keys per step): the
    forward's structure, with dS in place of P̃ and K in place of V."""
    R, C, D, TM, TN, L, RG, T, TX4, TX, DS, W = tile_constants(t)
    N_S, N_ACC = TM * TN, TM * TX       # local array sizes (compile-time constants)
    PS = t.ps(C)
    CAUSAL = bool(causal)
    DROP, PAD, SPARSE, SOFTCAP, WINDOW, ALIBI, VARLEN = features
    ORDER = 0    # the hardware's block order (tc's causal kernels change it: packed.block_xyz)
    p_and_ds, cap_scores = make_p_and_ds(SOFTCAP, ALIBI), make_cap_scores(N_S)
    smem = t.smem_plan("dq", DROP)          # the regions' offsets, in float32 elements
    Q_OFF, DO_OFF, K_OFF, V_OFF, DS_OFF, LSE_OFF, D_OFF, KEEP_OFF = (smem.offset(n) for n in (
        "Q", "dO", "K", "V", "dS", "lse", "D", "keep"))
    load_q = make_pair_loader(make_tile_loader(R, D, W, DS, T), DO_OFF - Q_OFF)
    load_kv = make_pair_loader(make_tile_loader(C, D, W, DS, T), V_OFF - K_OFF)
    rows_dot = make_dot_rows(TM, TN, t.d4, RG * DS, L * DS)        # S = Q Kᵀ, dP = dO Vᵀ
    dq_dot = make_dot_cols(TM, TX4, C // 4, RG * PS, DS, 4 * L)     # dQ_i += dS K_j
    store_row = make_row_store(TX4, L, D)[0]
    fill_keep, (_, drop_regs) = make_keep_tile(R, C, T), make_drop(TM, TN, RG, L, C)
    check_keep_tile(DROP, C, t)
    block_bits = make_block_bits(TM, TN, RG, L, SPARSE)

    def fa2_dq(q, k, v, do, lse, delta, dq, key_lengths, bmask, slopes, NqA, NkA, H, G, qsb, qsh,
               qsn, ksb, ksh, ksn, sc_hi, sc_lo, scale, cap_in, cap_out, left, right, asb, msb,
               msh, nbk, bq, bk, seed_lo, seed_hi, offset, thr, drop_scale):
        """Grid (ceil(Nq/R), G, B·H / G) (thread_coords), T threads, t.smem_bytes("dq",
        dropout) of dynamic shared memory; query head h reads key/value head h // G; the
        options' arguments last (nbflash.kernels.common.options)."""
        smem = cuda.shared.array(0, float32)
        inv_co = ONE / cap_out if SOFTCAP else ZERO    # a softcapped score's tanh: s / cap_out
        bits = cuda.shared.array(0, uint32)      # the same memory: keep bits at KEEP_OFF
        tid, rg, cg, bh, q_base, k_base, klen, mbase, Nq, Nk, lse_at, bx = thread_coords(
            L, H, G, NqA, NkA, key_lengths, msb, msh, PAD, VARLEN, ORDER, qsb, qsh, qsn, ksb,
            ksh, ksn)
        row0 = bx * R
        if VARLEN and row0 >= Nq:    # past its sequence's queries (a packed batch)
            return
        slope2 = alibi_slope(slopes, bh, H, asb) if ALIBI else ZERO   # (base 2)

        load_q(q, do, q_base, qsn, row0, Nq, smem, Q_OFF, tid)
        for r in range(tid, R, T):              # lse_i and D_i, see row_stats
            row = row0 + r
            lse_r, dlt = row_stats(lse, delta, lse_at + row, row < Nq)
            smem[LSE_OFF + r] = lse_r
            smem[D_OFF + r] = dlt
        acc = cuda.local.array(N_ACC, float32)
        for x in range(TM * TX):
            acc[x] = ZERO
        s = cuda.local.array(N_S, float32)
        dp = cuda.local.array(N_S, float32)

        j0, n_blocks = key_range(row0, R, C, Nq, Nk, klen, CAUSAL, WINDOW, left, right)
        for j in range(j0, n_blocks):
            col0 = j * C
            any_on, all_on = tile_status(bmask, mbase, nbk, bq, bk, row0, R, col0, C, Nq,
                                         klen) if SPARSE else (True, True)
            if not any_on:
                continue   # the same for every thread of the block
            cuda.syncthreads()
            load_kv(k, v, k_base, ksn, col0, klen, smem, K_OFF, tid)
            if DROP:
                fill_keep(bits, KEEP_OFF, row0, col0, bh, seed_lo, seed_hi, offset, thr, tid)
            cuda.syncthreads()
            for x in range(TM * TN):
                s[x] = ZERO
                dp[x] = ZERO
            rows_dot(smem, Q_OFF + rg * DS, K_OFF + cg * DS, s)
            if SOFTCAP:
                cap_scores(s, cap_in, cap_out)
            rows_dot(smem, DO_OFF + rg * DS, V_OFF + cg * DS, dp)
            if DROP:   # dropout: dP ∘ Z / (1-p) enters dS
                drop_regs(dp, bits, KEEP_OFF, rg, cg, drop_scale)
            on = block_bits(all_on, bmask, mbase, nbk, bq, bk, row0, col0, rg, cg, Nq, klen)
            masked = col0 + C > klen or band_cuts(row0, R, col0, C, Nq, Nk, CAUSAL, WINDOW,
                                                  left, right) or on != ALL
            for a in range(TM):
                row = row0 + rg + RG * a
                lse_r = smem[LSE_OFF + rg + RG * a]
                dlt = smem[D_OFF + rg + RG * a]
                for u in range(TN):
                    bias = alibi_bias(slope2, row, col0 + cg + L * u, Nq, Nk) if ALIBI \
                        else ZERO
                    p, ds = p_and_ds(s[a * TN + u], dp[a * TN + u], sc_hi, sc_lo, inv_co,
                                      lse_r, lse_r * LOG2E_LO, dlt, bias)
                    if masked and not (visible(row, col0 + cg + L * u, Nq, Nk, klen, CAUSAL,
                                               WINDOW, left, right) and bit_on(on, a * TN + u)):
                        ds = ZERO
                    smem[DS_OFF + (rg + RG * a) * PS + cg + L * u] = ds
            cuda.syncthreads()
            dq_dot(smem, DS_OFF + rg * PS, K_OFF + 4 * cg, acc)

        for a in range(TM):
            row = row0 + rg + RG * a
            if row < Nq:
                store_row(dq, q_base, qsn, row, acc, a, cg, scale)

    return fa2_dq
