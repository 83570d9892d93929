"""A first FlashAttention forward on Hopper's wgmma and TMA (FlashAttention-3's building
blocks; FA2 Algorithm 1 as the order of work).

One block (one warpgroup, 128 threads) per 64 query rows of one (batch, head): its thread 0
loads Q_i by TMA and keeps the next K_j, V_j tiles in flight through `stages` shared buffers,
each guarded by an mbarrier that counts the tile's bytes in; every thread waits on the
barrier's phase, then
- S = Q_i K_jᵀ: d/16 wgmma with A (Q_i) and B (K_j) from shared memory (K-major, 128-byte
  swizzle, as TMA writes them);
- the online softmax on S's fragments (each thread holds rows g and g + 8 of its warp's 16,
  the 4 lanes of a row reduce by shuffles), P̃ = 2^(s·scale - m) packed to 16 bits as wgmma's
  A fragments in registers;
- O += P̃ V_j: C/16 wgmma with A from registers and B = V_j from shared memory (MN-major);
- a block barrier, after which thread 0 reuses the stage for tile j + stages.
O = diag(ℓ)⁻¹ O and lse = m + log ℓ are written at the end, as the tc forward does.

The softmax and the epilogue are tc's (nbflash.kernels.tc.forward, .fragments): the wgmma
accumulator of a warp is the mma.m16n8 layout. What FlashAttention-3 adds on top and this does
not have yet: a producer warp (warp specialisation with setmaxnreg), two consumer warpgroups
whose softmax overlaps the other's GEMMs (ping-pong), the softmax of one step overlapped with
the GEMMs of the next within a warpgroup, and TMA stores. Options (dropout, key padding, block
masks), grouped-query heads and τ <= 0 are not taken yet (the plan refuses them).
"""

from numba import float32, uint16, uint32, uint64

from ..._cuda import cuda
from ..common.masks import key_range, sees_a_key, visible
from ..common.groups import make_quad_reduce
from ..common.softmax import NEG_INF, ZERO, finish_row, new_max
from ..common.tma import (fence_barrier_init, fence_tensormap, make_tma_load_3d,
                          mbar_arrive_expect_tx, mbar_init, mbar_try_wait)
from ..common.warp import exp2, make_warp_ops, rcp_approx
from ..common.wgmma import (KMajor, MNMajor, aligned_start, commit, fence, make_fence_acc,
                            make_wait, make_wgmma, make_wgmma_rs)
from ..tc.fragments import make_pack_a, make_store_rows, store_lse_rows
from .tiles import ROWS, THREADS


def make_forward(t, causal, bf16):
    """The forward kernel for Fa3Tiles `t`; see the module docstring."""
    D, C, STAGES = t.d, t.cols, t.stages
    NB = D // 64                          # TMA boxes (64 columns each) per row of a tile
    lq, lk, lv = KMajor(ROWS, D, 128), KMajor(C, D, 128), MNMajor(C, D, 128)
    KV_AT, STAGE = t.q_elements, t.stage_elements
    RS, RO, NP = C // 2, D // 2, 4 * (C // 16)    # S, O accumulators; P̃'s A words per thread
    NBAR = 4 * (1 + STAGES)               # barrier words: Q's, then one per stage
    Q_BYTES, KV_BYTES = 2 * ROWS * D, 2 * 2 * C * D
    CAUSAL = bool(causal)
    mma_s = make_wgmma(C, bf16, lq, lk)
    mma_o = make_wgmma_rs(D, bf16, lv, THREADS)
    wait_all, fence_s, fence_o = make_wait(0), make_fence_acc(RS), make_fence_acc(RO)
    load_q, load_kv = make_tma_load_3d(ROWS), make_tma_load_3d(C)
    row_max, row_sum = make_quad_reduce()       # over the 4 lanes of a row
    pack = make_warp_ops(THREADS, bf16)[3]
    pack_a, store_rows = make_pack_a(pack), make_store_rows(D, D, pack)

    def issue_kv(j, st, k, v, kmap, vmap, smem, base, bars, bh, Nk):
        """(thread 0) K_j, V_j into stage st, their bytes counted on that stage's barrier."""
        at = 4 * (1 + st)
        mbar_arrive_expect_tx(bars, at, KV_BYTES)
        kb = base + KV_AT + st * STAGE
        for b in range(NB):
            load_kv(smem, kb + b * C * 64, kmap, k, Nk, D, bh, j * C, 64 * b, bars, at)
            load_kv(smem, kb + C * D + b * C * 64, vmap, v, Nk, D, bh, j * C, 64 * b, bars,
                    at)

    def softmax_row(s, o, m, l, h, r, col0, masked, Nq, Nk, tid, sc):
        """The online softmax of this thread's row h (query r) over the tile's C keys: P̃ in
        place of S, m and ℓ updated, the row's O rescaled."""
        t4 = tid % 4
        m_blk = NEG_INF
        for sl in range(C // 8):
            for e in range(2):
                x = 4 * sl + 2 * h + e
                if masked and not visible(r, col0 + 8 * sl + 2 * t4 + e, Nq, Nk, Nk, CAUSAL,
                                          False, 0, 0):
                    s[x] = NEG_INF
                m_blk = max(m_blk, s[x])
        m_blk = row_max(m_blk, tid)
        if m_blk != NEG_INF:
            m_blk *= sc
        m_new, m_ref, alpha = new_max(m[h], m_blk)
        m[h] = m_new
        l_blk = ZERO
        for sl in range(C // 8):
            for e in range(2):
                x = 4 * sl + 2 * h + e
                p = ZERO if s[x] == NEG_INF else exp2(cuda.fma(s[x], sc, -m_ref))
                l_blk += p
                s[x] = p
        l[h] = l[h] * alpha + l_blk
        for vt in range(D // 8):
            o[4 * vt + 2 * h] *= alpha
            o[4 * vt + 2 * h + 1] *= alpha

    issue_kv = cuda.jit(device=True, inline=True)(issue_kv)
    softmax_row = cuda.jit(device=True, inline=True)(softmax_row)

    def fa3_forward(q, k, v, qmap, kmap, vmap, o, lse, Nq, Nk, H, sc):
        """Grid (ceil(Nq/64), H, B), 128 threads, t.smem_bytes() of dynamic shared memory;
        q, k, v, o: 16-bit bits, flat (B, H, N, d); q/k/v maps: their TMA tensor maps (3-D:
        B·H heads of N rows of d; placeholders in the simulator, which reads q, k, v);
        sc = τ log2(e) > 0."""
        smem = cuda.shared.array(0, uint16)
        bars = cuda.shared.array(NBAR, uint64)
        tid = cuda.threadIdx.x
        lane = tid % 32
        bh = cuda.blockIdx.z * H + cuda.blockIdx.y
        row0 = cuda.blockIdx.x * ROWS
        wr = row0 + 16 * (tid // 32)          # this warp's first query row
        base = aligned_start(smem)
        n_tiles = key_range(row0, ROWS, C, Nq, Nk, Nk, CAUSAL, False, 0, 0)[1]
        if tid == 0:
            fence_tensormap(qmap)
            fence_tensormap(kmap)
            fence_tensormap(vmap)
            for b in range(1 + STAGES):
                mbar_init(bars, 4 * b, 1)
            fence_barrier_init()
        cuda.syncthreads()
        if tid == 0:
            mbar_arrive_expect_tx(bars, 0, Q_BYTES)
            for b in range(NB):
                load_q(smem, base + b * ROWS * 64, qmap, q, Nq, D, bh, row0, 64 * b, bars, 0)
            for st in range(STAGES):
                if st < n_tiles:
                    issue_kv(st, st, k, v, kmap, vmap, smem, base, bars, bh, Nk)

        m = cuda.local.array(2, float32)      # rows g, g + 8: running max (base 2), ℓ part
        l = cuda.local.array(2, float32)
        acc = cuda.local.array(RO, float32)   # O_i's fragments
        s = cuda.local.array(RS, float32)     # S, then P̃
        pf = cuda.local.array(NP, uint32)     # P̃ as wgmma A fragments
        for h in range(2):
            m[h] = NEG_INF
            l[h] = ZERO
        for x in range(RO):
            acc[x] = ZERO
        while mbar_try_wait(bars, 0, 0) == 0:
            pass

        for j in range(n_tiles):
            st = j % STAGES
            while mbar_try_wait(bars, 4 * (1 + st), (j // STAGES) % 2) == 0:
                pass
            kb = base + KV_AT + st * STAGE
            # S = Q_i K_jᵀ
            fence()
            for kk in range(D // 16):
                mma_s(s, 0, smem, base, kb, 16 * kk, 1 if kk else 0)
            commit()
            wait_all()
            fence_s(s, 0)
            col0 = j * C
            masked = col0 + C > Nk or (CAUSAL and col0 + C - 1 > row0 + Nk - Nq)
            softmax_row(s, acc, m, l, 0, wr + lane // 4, col0, masked, Nq, Nk, tid, sc)
            softmax_row(s, acc, m, l, 1, wr + lane // 4 + 8, col0, masked, Nq, Nk, tid, sc)
            for kc in range(C // 16):
                pf[4 * kc], pf[4 * kc + 1], pf[4 * kc + 2], pf[4 * kc + 3] = pack_a(s, 8 * kc)
            # O_i += P̃ V_j
            fence()
            for kc in range(C // 16):
                mma_o(acc, 0, pf[4 * kc], pf[4 * kc + 1], pf[4 * kc + 2], pf[4 * kc + 3], smem,
                      kb + C * D, 16 * kc, 1)
            commit()
            wait_all()
            fence_o(acc, 0)
            cuda.syncthreads()     # every thread is done with this stage's K_j, V_j
            if tid == 0 and j + STAGES < n_tiles:
                issue_kv(j + STAGES, st, k, v, kmap, vmap, smem, base, bars, bh, Nk)

        # O_i = diag(ℓ)⁻¹ O_i and lse = m + log ℓ (tc's epilogue)
        r = wr + lane // 4
        l0 = row_sum(l[0], tid)
        l1 = row_sum(l[1], tid)
        d0, lse0 = finish_row(m[0], l0, l0 != ZERO or sees_a_key(
            r, Nq, Nk, Nk, CAUSAL, False, 0, 0, False, lse, 0, 0, 1, 1))
        d1, lse1 = finish_row(m[1], l1, l1 != ZERO or sees_a_key(
            r + 8, Nq, Nk, Nk, CAUSAL, False, 0, 0, False, lse, 0, 0, 1, 1))
        # (1/ℓ by rcp.approx and the divisors passed as 1: an IEEE division is a subroutine
        # call, and a call anywhere in the kernel makes ptxas serialise its wgmma)
        inv0, inv1 = rcp_approx(d0), rcp_approx(d1)
        for vt in range(D // 8):
            acc[4 * vt] *= inv0
            acc[4 * vt + 1] *= inv0
            acc[4 * vt + 2] *= inv1
            acc[4 * vt + 3] *= inv1
        one = float32(1.0)
        store_rows(o, bh * Nq * D, D, wr, Nq, acc, 0, 0, one, one, one, lse0 == NEG_INF,
                   lse1 == NEG_INF, lane)
        store_lse_rows(lse, bh * Nq, r, Nq, lse0, lse1, lane)

    return fa3_forward
