"""FlashAttention-2's backward on tensor cores (FA2 Algorithm 2): float16 / bfloat16 inputs,
float32 accumulation; see nbflash.kernels.tc.forward for what the two share.

D = rowsum(dO ∘ O) first (nbflash.kernels.common.softmax.make_delta, on the 16-bit values); then
one block per 16·W keys keeps dK_j, dV_j as fragments while Q_i, dO_i, lse_i, D_i stream
through STAGES buffers (:func:`make_dkdv`). Per step each warp computes Sᵀ = K_j Q_iᵀ and Pᵀ
from lse, dV += P̃ᵀ dO_i, dPᵀ = V_j dO_iᵀ, dSᵀ = Pᵀ ∘ (dPᵀ - D), dK += dSᵀ Q_i; dSᵀ goes to
shared memory, and the warps then share dQ_i += dS K_j (A from dSᵀ by ldmatrix.trans), which is
added into a float32 buffer with atomics (the last bits of dq vary from run to run, as with
fa2's default). :func:`make_convert` turns that buffer into the 16-bit dq. That is FA2's
Algorithm 2 as written; tc's default (nbflash.kernels.tc.tiles.DQ_PASS, and always with
deterministic=True) is faster on the H200: :func:`make_dq` first, one block per query tile as
the forward, computes D for its rows itself (saving the D kernel's launch) and writes it out,
recomputes P and dP and sums dS K_j in registers, so that the order of the additions is fixed;
then the dK/dV pass runs without dQ.

Grouped-query heads (k and v with H / G heads): the dQ pass reads key/value head h // G; a dK/dV
block owns a key tile of one key/value head and walks the query tiles of each of its G query
heads in turn, as one walk over (head, tile) cursors (nbflash.kernels.common.masks
.make_group_walk) along which the Q_i / dO_i pipeline runs on, so dK_j and dV_j are summed over
the group in the fragments and written once, without atomics; the dQ it adds atomically goes to
each query head's rows. Dropout's mask and the block mask stay the query head's.

Large head dims: a dK/dV block's accumulators are 2 x 16 x d float32 per warp, more than the
registers hold for d > 128, so `dsplit` blocks share one key tile, each keeping dK and dV (and
adding dQ) for 1/dsplit of the columns; each recomputes S and dP over all of them.

P = 2^min(s·scale - lse·log2 e, 0) is one fma, a min and the exp2 per score (lse·log2 e is
computed once per query row, in two parts).
"""

from numba import float32, uint16, uint32, uint64

from ..._cuda import SIMULATOR, cuda
from ..common.dropout import check_keep_tile, make_keep_tile, make_tile_kept
from ..common.masks import (band_cuts, cursor_tile, key_range, make_group_walk, make_tile_walk,
                            mask_base, query_range)
from ..common.packed import head_base, lse_base, ordered
from ..common.primitives import commit_async, make_row_reduce, make_wait_async
from ..common.softmax import (LOG2E, LOG2E_LO, ONE, ZERO, alibi_bias, alibi_slope, capped,
                              clamp_nonpositive, row_lse, row_stats, scaled)
from ..common.warp import exp2, make_warp_ops
from .fragments import (fragment_bit, kv_coords, make_async_rows, make_fragment_mask,
                        make_kv_stream, make_load_a, make_mma2, make_pack_a, make_store_rows,
                        put2, thread_coords)


def make_convert(threads, bf16):
    """dq (16-bit) from the float32 accumulator, two elements per thread."""
    T = threads
    pack = make_warp_ops(T, bf16)[3]

    def tc_convert(src, dst, n_pairs):
        e = cuda.blockIdx.x * T + cuda.threadIdx.x
        if e < n_pairs:
            put2(dst, 2 * e, pack(src[2 * e], src[2 * e + 1]))

    return tc_convert


def make_p_of(SOFTCAP, ALIBI):
    """Device function: (P, tanh) of a raw score s, P = 2^min(s·sc - lse2, 0) with lse2 =
    lse·log2 e (the module docstring); SOFTCAP: of the softcapped score, with its tanh, whose
    1 - tanh² the caller multiplies dS by (0 without a softcap); ALIBI: the score plus ALiBi's
    `bias` (base 2, softmax.alibi_bias)."""

    def p_of(s, sc, cap_in, cap_out, lse2, bias):
        if SOFTCAP:   # softcap·tanh(τ s / softcap)
            x, t = capped(s, cap_in, cap_out)
            if ALIBI:
                x += bias
            return exp2(clamp_nonpositive(x - lse2)), t
        if ALIBI:
            return exp2(clamp_nonpositive(cuda.fma(s, sc, bias) - lse2)), ZERO
        return exp2(clamp_nonpositive(cuda.fma(s, sc, -lse2))), ZERO

    return cuda.jit(device=True, inline=True)(p_of)


def make_dkdv(t, causal, bf16, features, dq=True):
    """FA2 backward over key blocks on tensor cores for TcTiles `t` (nbflash.kernels.tc.tiles:
    16·W keys per block, C queries per step, t.dsplit blocks per key tile), dQ added atomically
    (dq=False: no dQ; the dQ pass computes it); see the module docstring."""
    D, DP, DH, SPLIT, W, C, STAGES = t.d, t.dp, t.dh, t.dsplit, t.warps, t.cols, t.stages
    R, T, DS, PS = t.rows, t.threads, t.ds, t.ps
    assert t.mtiles == 1, "the dK/dV pass has one m-tile (16 keys) per warp"
    KD, NT, NVH = DP // 16, C // 8, DH // 8
    N_S, N_O = 4 * NT, 4 * NVH      # fragment array sizes (compile-time constants)
    CAUSAL, DQ = bool(causal), bool(dq)
    DROP, PAD, SPARSE, SOFTCAP, WINDOW, ALIBI, VARLEN = features
    ORDER = ordered(CAUSAL, D)    # the longest key tiles first (packed.block_xyz)
    p_of = make_p_of(SOFTCAP, ALIBI)
    shared = t.smem_plan("dkdv", DROP, DQ)   # offsets in 16-bit elements (keep bits: uint32)
    K_OFF, V_OFF, DS_OFF, Q_OFF = (shared.offset(n) for n in ("K", "V", "dSt", "steps"))
    KEEP_OFF = shared.offset("keep", 4)      # dSᵀ: R keys x C queries, row stride PS
    step_plan = shared.sub("steps")          # stage s at Q_OFF + s * STAGE: Q_i, dO_i, lse_i, D_i
    STAGE, DO_IN, LSE_IN = step_plan.elements, step_plan.offset("dO"), step_plan.offset("lse")
    D_AT = step_plan.offset("D", 4) - step_plan.offset("lse", 4)   # D_i after lse_i (float32)
    ITEMS = (C // 16) * (DH // 16)       # dQ_i's 16 x 16 pieces, shared among the warps
    PER_WARP = -(-ITEMS // W)            # (the last round may leave warps without one)
    ldsm, ldsm_t, mma, pack, _ = make_warp_ops(T, bf16)
    mma2, pack_a = make_mma2(mma), make_pack_a(pack)
    load_rows = make_async_rows(C, D, DP, DS, T)
    load_kv = make_async_rows(R, D, DP, DS, T)
    wait_tile = make_wait_async(STAGES - 2)
    fragment_mask = make_fragment_mask(NT, True, CAUSAL, SPARSE, WINDOW)
    fill_keep, tile_kept = make_keep_tile(C, R, T), make_tile_kept(R)
    check_keep_tile(DROP, R, t)
    store_rows = make_store_rows(D, DH, pack)
    walk = make_tile_walk(C, R, False, SPARSE)   # the query tiles, empty ones skipped (Alg. 5)
    group_walk = make_group_walk(walk)           # ... of each query head of the group

    def load_step(q, do, lse, delta, q_base, qsn, lse_at, row0, Nq, smem, smemf, off, tid):
        """Q_i, dO_i by cp.async, lse_i and D_i (see row_stats) by plain loads."""
        load_rows(q, q_base, qsn, row0, Nq, smem, off, tid)
        load_rows(do, q_base, qsn, row0, Nq, smem, off + DO_IN, tid)
        f = (off + LSE_IN) // 2
        for r in range(tid, C, T):   # lse in base 2 (lse·log2 e, in two parts), and D
            lse_r, dlt = row_stats(lse, delta, lse_at + row0 + r, row0 + r < Nq)
            smemf[f + r] = scaled(lse_r, LOG2E, LOG2E_LO)
            smemf[f + D_AT + r] = dlt

    load_step = cuda.jit(device=True, inline=True)(load_step)

    def load_cursor(q, do, lse, delta, c, n_steps, b, hk, G, H, qsb, qsh, qsn, q0, NqA, Nq,
                    smem, smemf, off, tid):
        """load_step for the tile of cursor c (nbflash.kernels.common.masks.cursor_tile)."""
        g, i = cursor_tile(c, n_steps)
        bh = hk * G + g
        load_step(q, do, lse, delta, head_base(b, bh, H, qsb, qsh, qsn, q0, VARLEN), qsn,
                  lse_base(b, bh, H, NqA, q0, VARLEN), i * C, Nq, smem, smemf, off, tid)

    load_cursor = cuda.jit(device=True, inline=True)(load_cursor)

    def tc_dkdv(q, k, v, do, lse, delta, dq_acc, dk, dv, key_lengths, bmask, slopes, NqA, NkA, H,
                G, qsb, qsh, qsn, ksb, ksh, ksn, sc_hi, sc_lo, scale, cap_in, cap_out, left, right,
                asb, msb, msh, nbk, bq, bk, seed_lo, seed_hi, offset, thr, drop_scale):
        """Grid (ceil(Nk/R) dsplit, H / G, B) over key/value heads, T threads,
        t.smem_bytes("dkdv", dropout, dq) of dynamic shared memory; 16-bit arrays as uint16;
        delta from tc_delta; dq_acc: zeroed float32 in q's layout (a placeholder without dQ); the
        layouts' strides as the forward's. The block walks
        the query tiles of each of its G query heads in turn (grouped-query heads: dK_j, dV_j
        summed over the group in registers, written once, no atomics)."""
        smem = cuda.shared.array(0, uint16)
        smemf = cuda.shared.array(0, float32)    # the same memory: lse_i, D_i
        bits = cuda.shared.array(0, uint32)      # and dropout's keep bits at KEEP_OFF
        tid, warp, lane, b, hk, klen, q0, Nq, k0, Nk, bx = kv_coords(NqA, NkA, key_lengths, PAD,
                                                                     VARLEN, ORDER if G > 1 else 0)
        g, t4 = lane // 4, lane % 4
        mi = lane // 8
        key0 = (bx // SPLIT) * R
        c0 = (bx % SPLIT) * DH      # the first of this block's columns
        wkey0 = key0 + 16 * warp
        if VARLEN and key0 >= Nk:    # past its sequence's keys (a packed batch)
            return
        a_lane = (lane % 8 + 8 * (mi % 2)) * DS + 8 * (mi // 2)    # A, and ldmatrix.trans B
        b_lane = (lane % 8 + 8 * (mi // 2)) * DS + 8 * (mi % 2)    # B from rows (Qᵀ, dOᵀ)
        k_base = head_base(b, hk, cuda.gridDim.y, ksb, ksh, ksn, k0, VARLEN)

        load_kv(k, k_base, ksn, key0, klen, smem, K_OFF, tid)
        load_kv(v, k_base, ksn, key0, klen, smem, V_OFF, tid)
        commit_async()       # K_j, V_j: the first group, complete when step 0's tile is
        dk_acc = cuda.local.array(N_O, float32)
        dv_acc = cuda.local.array(N_O, float32)
        for x in range(N_O):
            dk_acc[x] = ZERO
            dv_acc[x] = ZERO
        st = cuda.local.array(N_S, float32)     # Sᵀ, then Pᵀ
        dpt = cuda.local.array(N_S, float32)    # dPᵀ, then dSᵀ
        dq = cuda.local.array(8, float32)

        # the query tiles that see these keys (query_range; with causal masking and a window
        # those before `first`, with a window those from `last` on, see none)
        first, last = query_range(key0, R, C, Nq, Nk, CAUSAL, WINDOW, left, right)
        n_steps = (Nq + C - 1) // C if key0 < klen else first
        last = min(last, n_steps) if WINDOW else n_steps
        # the group's query heads one after the other: one walk over cursors c = gq·n_steps + i
        # (query head hk·G + gq, its query tile i; group_walk), so that the pipeline runs on
        # across the heads and the loop carries no more than with one head
        end = G * n_steps
        il, _ = group_walk(first, first, last, n_steps, G, hk, b, H, msb, msh, key0, bmask, nbk,
                           bq, bk, Nq, klen)
        ic, all_on = il, True
        if il < end:
            ic, all_on = group_walk(first, first, last, n_steps, G, hk, b, H, msb, msh, key0,
                                    bmask, nbk, bq, bk, Nq, klen)
        for s_ in range(STAGES - 1):
            if il < end:
                load_cursor(q, do, lse, delta, il, n_steps, b, hk, G, H, qsb, qsh, qsn, q0, NqA,
                            Nq, smem, smemf, Q_OFF + s_ * STAGE, tid)
                il, _ = group_walk(il + 1, first, last, n_steps, G, hk, b, H, msb, msh, key0,
                                   bmask, nbk, bq, bk, Nq, klen)
            commit_async()

        step = 0
        while ic < end:
            gq, i = cursor_tile(ic, n_steps)   # this step's query head and tile
            bh = hk * G + gq
            slope2 = alibi_slope(slopes, bh, H, asb) if ALIBI else ZERO   # (base 2)
            q_base = head_base(b, bh, H, qsb, qsh, qsn, q0, VARLEN)
            row0 = i * C
            wait_tile()
            cuda.syncthreads()   # step's Q_i, dO_i are in; the previous step is done with dSᵀ
            # (and with its buffer, which this step's load below overwrites)
            off = Q_OFF + (step % STAGES) * STAGE
            nxt = Q_OFF + ((step + STAGES - 1) % STAGES) * STAGE
            if il < end:
                load_cursor(q, do, lse, delta, il, n_steps, b, hk, G, H, qsb, qsh, qsn, q0, NqA,
                            Nq, smem, smemf, nxt, tid)
                il, _ = group_walk(il + 1, first, last, n_steps, G, hk, b, H, msb, msh, key0,
                                   bmask, nbk, bq, bk, Nq, klen)
            commit_async()
            if DROP:   # the forward's keep bits, drawn again (Alg. 4 line 14)
                fill_keep(bits, KEEP_OFF, row0, key0, bh, seed_lo, seed_hi, offset, thr, tid)
                cuda.syncthreads()
            do_off = off + DO_IN
            f = (off + LSE_IN) // 2              # lse_i, D_i in smemf

            # Sᵀ = K_j Q_iᵀ, dPᵀ = V_j dO_iᵀ: A from this warp's K, V rows, B from Q_i, dO_i
            for x in range(4 * NT):
                st[x] = ZERO
                dpt[x] = ZERO
            for kk in range(KD):
                arow = 16 * warp * DS + 16 * kk + a_lane
                k0, k1, k2, k3 = ldsm(smem, K_OFF + arow)
                v0, v1, v2, v3 = ldsm(smem, V_OFF + arow)
                for np2 in range(NT // 2):
                    brow = 16 * np2 * DS + 16 * kk + b_lane
                    b0, b1, b2, b3 = ldsm(smem, off + brow)
                    x = 8 * np2
                    mma2(st, x, k0, k1, k2, k3, b0, b1, b2, b3)
                    b0, b1, b2, b3 = ldsm(smem, do_off + brow)
                    mma2(dpt, x, v0, v1, v2, v3, b0, b1, b2, b3)

            masked = row0 + C > Nq or key0 + R > klen or \
                band_cuts(row0, C, key0, R, Nq, Nk, CAUSAL, WINDOW, left, right) or not all_on
            vis = fragment_mask(wkey0, row0, lane, Nq, Nk, klen, all_on, bmask,
                                mask_base(b, bh, H, msb, msh), nbk, bq, bk, left,
                                right) if masked else uint64(0)
            for x in range(4 * NT):   # Pᵀ from lse; dSᵀ = Pᵀ ∘ (dPᵀ ∘ Z/(1-p) - D)
                qc = 8 * (x // 4) + 2 * t4 + x % 2        # query column within the step
                lse_q = smemf[f + qc]                      # lse·log2 e
                dp = dpt[x]
                if DROP:
                    if not tile_kept(bits, KEEP_OFF, qc, 16 * warp + g + 8 * ((x // 2) % 2)):
                        dp = ZERO
                    else:
                        dp *= drop_scale
                bias = alibi_bias(slope2, row0 + qc, wkey0 + g + 8 * ((x // 2) % 2), Nq,
                                  Nk) if ALIBI else ZERO
                p, tc_ = p_of(st[x], sc_hi, cap_in, cap_out, lse_q, bias)
                if masked and not fragment_bit(vis, x):
                    p = ZERO
                st[x] = p
                dpt[x] = p * (dp - smemf[f + D_AT + qc])
                if SOFTCAP:
                    dpt[x] *= ONE - tc_ * tc_
            if DROP:   # dV takes P ∘ Z / (1-p) (Alg. 4 line 17)
                for x in range(4 * NT):
                    qc = 8 * (x // 4) + 2 * t4 + x % 2
                    kr = 16 * warp + g + 8 * ((x // 2) % 2)
                    st[x] *= drop_scale if tile_kept(bits, KEEP_OFF, qc, kr) else ZERO

            # dV_j += P̃ᵀ dO_i, dK_j += dSᵀ Q_i: A from the fragments, B by ldmatrix.trans;
            # dSᵀ also to shared memory for dQ
            for kk in range(NT // 2):
                p0, p1, p2, p3 = pack_a(st, 8 * kk)
                s0, s1, s2, s3 = pack_a(dpt, 8 * kk)
                if DQ:
                    at = DS_OFF + (16 * warp + g) * PS + 16 * kk + 2 * t4
                    put2(smem, at, s0)
                    put2(smem, at + 8 * PS, s1)
                    put2(smem, at + 8, s2)
                    put2(smem, at + 8 * PS + 8, s3)
                for dp2 in range(NVH // 2):
                    brow = 16 * kk * DS + c0 + 16 * dp2 + a_lane
                    b0, b1, b2, b3 = ldsm_t(smem, do_off + brow)
                    y = 8 * dp2
                    mma2(dv_acc, y, p0, p1, p2, p3, b0, b1, b2, b3)
                    b0, b1, b2, b3 = ldsm_t(smem, off + brow)
                    mma2(dk_acc, y, s0, s1, s2, s3, b0, b1, b2, b3)
            if DQ:
                cuda.syncthreads()   # dSᵀ complete
                # dQ_i += τ dS K_j, in 16 x 16 pieces shared among the warps, added atomically
                for it in range(PER_WARP):
                    item = warp + W * it
                    own = item < ITEMS
                    if own or SIMULATOR:   # (there every thread must take part in each mma)
                        item = min(item, ITEMS - 1)
                        qm = item // (DH // 16)
                        col = c0 + 16 * (item % (DH // 16))
                        for x in range(8):
                            dq[x] = ZERO
                        for kk in range(R // 16):
                            a0, a1, a2, a3 = ldsm_t(smem, DS_OFF + (16 * kk + lane % 8
                                                                    + 8 * (mi // 2)) * PS
                                                    + 16 * qm + 8 * (mi % 2))
                            b0, b1, b2, b3 = ldsm_t(smem, K_OFF + (16 * kk + lane % 8
                                                                   + 8 * (mi % 2)) * DS
                                                    + col + 8 * (mi // 2))
                            mma2(dq, 0, a0, a1, a2, a3, b0, b1, b2, b3)
                        for x in range(8):
                            row = row0 + 16 * qm + g + 8 * ((x // 2) % 2)
                            cx = col + 8 * (x // 4) + 2 * t4 + x % 2
                            if own and row < Nq and cx < D:
                                cuda.atomic.add(dq_acc, q_base + row * qsn + cx, dq[x] * scale)
            ic, all_on = group_walk(ic + 1, first, last, n_steps, G, hk, b, H, msb, msh, key0,
                                    bmask, nbk, bq, bk, Nq, klen)
            step += 1

        one = float32(1.0)   # dK_j = τ Σ_i dS_ijᵀ Q_i, dV_j = Σ_i P̃_ijᵀ dO_i, written once
        store_rows(dk, k_base, ksn, wkey0, Nk, dk_acc, 0, c0, scale, one, one, False, False, lane)
        store_rows(dv, k_base, ksn, wkey0, Nk, dv_acc, 0, c0, one, one, one, False, False, lane)

    return tc_dkdv


def make_dq(t, causal, bf16, features):
    """FA2's dQ pass on tensor cores for TcTiles `t` (16·W query rows per block, C keys per
    step; it runs before the dK/dV pass without dQ): D of its rows from O and dO, written out
    for the dK/dV pass; then for each key tile K_j, V_j, streamed as in the forward, every warp
    recomputes S = Q_i K_jᵀ and dP = dO_i V_jᵀ for its 16 rows, P from lse, dS = P ∘ (dP - D),
    and adds dQ_i += dS K_j in registers (dS as A fragments, as the forward's P̃); dq = τ dQ is
    written once. No atomics, so dq is the same bits on every run."""
    D, DP, C, STAGES, QREGS = t.d, t.dp, t.cols, t.stages, t.qregs
    R, T, DS = t.rows, t.threads, t.ds
    assert t.mtiles == 1, "the dQ pass has one m-tile (16 query rows) per warp"
    KD, NT, NV = DP // 16, C // 8, DP // 8
    N_Q, N_S, N_O = (4 * KD if QREGS else 4), 4 * NT, 4 * NV
    CAUSAL = bool(causal)
    DROP, PAD, SPARSE, SOFTCAP, WINDOW, ALIBI, VARLEN = features
    ORDER = ordered(CAUSAL, D)    # the longest key tiles first (packed.block_xyz)
    p_of = make_p_of(SOFTCAP, ALIBI)
    shared = t.smem_plan("dq", DROP)         # offsets in 16-bit elements (keep bits: uint32)
    Q_OFF, DO_OFF, KV_OFF = shared.offset("Q"), shared.offset("dO"), shared.offset("KV")
    KEEP_OFF = shared.offset("keep", 4)
    STAGE, V_IN = shared.sub("KV").elements, shared.sub("KV").offset("V")   # K_j, V_j
    ldsm, ldsm_t, mma, pack, to_f32 = make_warp_ops(T, bf16)
    mma2 = make_mma2(mma)
    row_sum = make_row_reduce(4, T)[1]      # over the 4 lanes that hold a row's fragments
    load_q = make_async_rows(R, D, DP, DS, T)
    load_a, pack_a = make_load_a(ldsm), make_pack_a(pack)
    wait_q = make_wait_async(STAGES - 1)
    fragment_mask = make_fragment_mask(NT, False, CAUSAL, SPARSE, WINDOW)
    fill_keep, tile_kept = make_keep_tile(R, C, T), make_tile_kept(C)
    check_keep_tile(DROP, C, t)
    store_rows = make_store_rows(D, DP, pack)
    walk = make_tile_walk(R, C, True, SPARSE)   # the key tiles, empty ones skipped (Alg. 5)
    start_kv, next_kv = make_kv_stream(C, D, DP, DS, T, STAGES, KV_OFF, STAGE, V_IN, walk)
    no_flip = uint32(0)

    def tc_dq(q, k, v, do, o, lse, delta, dq, key_lengths, bmask, slopes, NqA, NkA, H, G, qsb,
              qsh, qsn, ksb, ksh, ksn, sc_hi, sc_lo, scale, cap_in, cap_out, left, right, asb, msb,
              msh, nbk, bq, bk, seed_lo, seed_hi, offset, thr, drop_scale):
        """Grid (ceil(Nq/R), G, B·H / G) (thread_coords), T threads, t.smem_bytes("dq",
        dropout) of dynamic shared memory; 16-bit arrays as uint16 (k, v with H / G heads:
        query head h reads key/value head h // G); delta: written (D of every row, for the
        dK/dV pass)."""
        smem = cuda.shared.array(0, uint16)
        bits = cuda.shared.array(0, uint32)      # the same memory: keep bits at KEEP_OFF
        tid, warp, lane, bh, klen, mbase, q_base, k_base, Nq, Nk, lse_at, bx = thread_coords(
            H, G, NqA, NkA, key_lengths, msb, msh, PAD, VARLEN, -ORDER, qsb, qsh, qsn, ksb, ksh,
            ksn)
        g, t4 = lane // 4, lane % 4
        mi = lane // 8
        row0 = bx * R
        if VARLEN and row0 >= Nq:    # past its sequence's queries (a packed batch)
            return
        wr = 16 * warp                           # this warp's first query row in the block
        slope2 = alibi_slope(slopes, bh, H, asb) if ALIBI else ZERO   # (base 2)
        a_lane = (lane % 8 + 8 * (mi % 2)) * DS + 8 * (mi // 2)    # A and ldmatrix.trans B
        b_lane = (lane % 8 + 8 * (mi // 2)) * DS + 8 * (mi % 2)    # B from rows (Kᵀ, Vᵀ)

        load_q(q, q_base, qsn, row0, Nq, smem, Q_OFF, tid)
        load_q(do, q_base, qsn, row0, Nq, smem, DO_OFF, tid)
        commit_async()
        j0, n_blocks = key_range(row0, R, C, Nq, Nk, klen, CAUSAL, WINDOW, left, right)
        jl, _ = walk(j0, n_blocks, row0, bmask, mbase, nbk, bq, bk, Nq, klen)
        jc, all_on = walk(j0, n_blocks, row0, bmask, mbase, nbk, bq, bk, Nq, klen)
        jl = start_kv(k, v, k_base, ksn, klen, smem, tid, jl, n_blocks, row0, bmask, mbase, nbk, bq,
                      bk, Nq)

        # this lane's two rows (g, g + 8): lse in base 2 (in two parts)
        ra = row0 + wr + g
        lse_a = scaled(row_lse(lse, lse_at + ra, ra < Nq), LOG2E, LOG2E_LO)
        lse_b = scaled(row_lse(lse, lse_at + ra + 8, ra + 8 < Nq), LOG2E, LOG2E_LO)
        wait_q()
        cuda.syncthreads()
        # and D = rowsum(dO ∘ O) (FA2 Algorithm 2, line 4), here rather than in a kernel of its
        # own: the 4 lanes of a row each sum its columns 8s + 2t, 8s + 2t + 1 (dO from shared
        # memory, O from global), a shuffle adds their parts; written out for the dK/dV pass
        pa = ZERO
        pb = ZERO
        for sl in range(DP // 8):
            c = 8 * sl + 2 * t4
            if 8 * sl < D:
                at = DO_OFF + (wr + g) * DS + c
                x = q_base + ra * qsn + c
                if ra < Nq:
                    pa += to_f32(o[x]) * to_f32(smem[at]) + \
                        to_f32(o[x + 1]) * to_f32(smem[at + 1])
                if ra + 8 < Nq:
                    x += 8 * qsn
                    at += 8 * DS
                    pb += to_f32(o[x]) * to_f32(smem[at]) + \
                        to_f32(o[x + 1]) * to_f32(smem[at + 1])
        d_a = row_sum(pa, tid)
        d_b = row_sum(pb, tid)
        if t4 == 0:
            if ra < Nq:
                delta[lse_at + ra] = d_a
            if ra + 8 < Nq:
                delta[lse_at + ra + 8] = d_b
        qf = cuda.local.array(N_Q, uint32)    # Q_i's and dO_i's A fragments
        df = cuda.local.array(N_Q, uint32)
        if QREGS:
            for kk in range(KD):
                load_a(qf, 4 * kk, smem, Q_OFF + wr * DS + 16 * kk + a_lane, no_flip)
                load_a(df, 4 * kk, smem, DO_OFF + wr * DS + 16 * kk + a_lane, no_flip)
        acc = cuda.local.array(N_O, float32)   # dQ_i's fragments
        for x in range(N_O):
            acc[x] = ZERO
        s = cuda.local.array(N_S, float32)     # S, then P, then dS
        dpv = cuda.local.array(N_S, float32)   # dP

        step = 0
        while jc < n_blocks:
            col0 = jc * C
            buf, jl = next_kv(k, v, k_base, ksn, klen, smem, tid, jl, n_blocks, row0, bmask, mbase,
                              nbk, bq, bk, Nq, step)
            if DROP:   # the forward's keep bits, drawn again
                fill_keep(bits, KEEP_OFF, row0, col0, bh, seed_lo, seed_hi, offset, thr, tid)
                cuda.syncthreads()

            # S = Q_i K_jᵀ and dP = dO_i V_jᵀ: B fragments from K_j's and V_j's rows
            for x in range(N_S):
                s[x] = ZERO
                dpv[x] = ZERO
            for kk in range(KD):
                a = 4 * kk if QREGS else 0
                if not QREGS:
                    load_a(qf, 0, smem, Q_OFF + wr * DS + 16 * kk + a_lane, no_flip)
                    load_a(df, 0, smem, DO_OFF + wr * DS + 16 * kk + a_lane, no_flip)
                for np2 in range(NT // 2):
                    brow = buf + 16 * np2 * DS + 16 * kk + b_lane
                    b0, b1, b2, b3 = ldsm(smem, brow)
                    mma2(s, 8 * np2, qf[a], qf[a + 1], qf[a + 2], qf[a + 3], b0, b1, b2, b3)
                    b0, b1, b2, b3 = ldsm(smem, brow + V_IN)
                    mma2(dpv, 8 * np2, df[a], df[a + 1], df[a + 2], df[a + 3], b0, b1, b2,
                         b3)

            masked = col0 + C > klen or band_cuts(row0, R, col0, C, Nq, Nk, CAUSAL, WINDOW,
                                                  left, right) or not all_on
            vis = fragment_mask(row0 + wr, col0, lane, Nq, Nk, klen, all_on, bmask, mbase, nbk,
                                bq, bk, left, right) if masked else uint64(0)
            for x in range(N_S):   # P from lse; dS = P ∘ (dP ∘ Z/(1-p) - D)
                upper = (x // 2) % 2 == 0
                dp = dpv[x]
                if DROP:
                    if tile_kept(bits, KEEP_OFF, wr + g + 8 * ((x // 2) % 2),
                                 8 * (x // 4) + 2 * t4 + x % 2):
                        dp *= drop_scale
                    else:
                        dp = ZERO
                bias = alibi_bias(slope2, row0 + wr + g + 8 * ((x // 2) % 2),
                                  col0 + 8 * (x // 4) + 2 * t4 + x % 2, Nq, Nk) if ALIBI \
                    else ZERO
                p, tc_ = p_of(s[x], sc_hi, cap_in, cap_out, lse_a if upper else lse_b, bias)
                if masked and not fragment_bit(vis, x):
                    p = ZERO
                s[x] = p * (dp - (d_a if upper else d_b))
                if SOFTCAP:
                    s[x] *= ONE - tc_ * tc_

            # dQ_i += dS K_j: dS as A fragments (16 keys = two 8-key slices), B from K_j by
            # ldmatrix.trans
            for kk in range(NT // 2):
                a0, a1, a2, a3 = pack_a(s, 8 * kk)
                for dp2 in range(NV // 2):
                    b0, b1, b2, b3 = ldsm_t(smem, buf + 16 * kk * DS + 16 * dp2 + a_lane)
                    mma2(acc, 8 * dp2, a0, a1, a2, a3, b0, b1, b2, b3)
            jc, all_on = walk(jc + 1, n_blocks, row0, bmask, mbase, nbk, bq, bk, Nq, klen)
            step += 1

        one = float32(1.0)   # dQ_i = τ Σ_j dS_ij K_j, written once
        store_rows(dq, q_base, qsn, row0 + wr, Nq, acc, 0, 0, scale, one, one, False, False, lane)

    return tc_dq
