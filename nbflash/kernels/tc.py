"""FlashAttention-2 on tensor cores: float16 / bfloat16 inputs, float32 accumulation.

The same algorithms as nbflash.kernels.fa2 (FlashAttention-2, Dao 2023, Algorithms 1 and 2),
with every matrix product on the tensor cores through nbflash.kernels.warp (mma.sync m16n8k16,
ldmatrix) and tiles streamed into shared memory with cp.async. Each warp owns 16 rows of the
block's tile (query rows in the forward, where a warp may own two such m-tiles; key rows in the
backward) and holds its accumulators as
mma fragments in registers: lane l has rows g = l // 4 and g + 8 and columns 2t, 2t + 1 (t =
l % 4) of each 8-column slice (entry x = 4·slice + 2·h + e of a fragment array is row g + 8h,
column 8·slice + 2t + e).

- Forward (:func:`make_forward`, FA2 Alg. 1): one block of W warps per 16·W·RM query rows; Q_i is
  loaded once and kept in registers as A fragments; K_j, V_j stream through STAGES shared
  buffers (the next STAGES - 1 tiles are in flight while one is computed). S = Q K_jᵀ (B from
  K by ldmatrix), the online softmax on the S fragments (row max and sum over the 4 lanes of a
  row by shuffles), P̃ converted to 16-bit A fragments in registers (the S fragments of two
  8-key slices are exactly one A fragment), O += P̃ V_j (B from V by ldmatrix.trans). O is
  divided by ℓ at the end, and lse = m + log ℓ is written.
- Backward (:func:`make_dkdv`, FA2 Alg. 2): D = rowsum(dO ∘ O) first (fa2's make_delta, on the
  16-bit values); then
  one block per 16·W keys keeps dK_j, dV_j as fragments while Q_i, dO_i, lse_i, D_i stream
  through STAGES buffers. Per step each warp computes Sᵀ = K_j Q_iᵀ and Pᵀ from lse, dV +=
  P̃ᵀ dO_i, dPᵀ = V_j dO_iᵀ, dSᵀ = Pᵀ ∘ (dPᵀ - D), dK += dSᵀ Q_i; dSᵀ goes to shared memory,
  and the warps then share dQ_i += dS K_j (A from dSᵀ by ldmatrix.trans), which is added into a
  float32 buffer with atomics (the last bits of dq vary from run to run, as with fa2's default).
  :func:`make_convert` turns that buffer into the 16-bit dq.

Scores are in base 2, τ log2(e) folded into one float32 scale (fa2 splits it in two so as to
round the scaled score once; here P is rounded to 16 bits before its product, far coarser), and
2^x is ex2.approx.ftz (warp.exp2): per score the forward spends a multiply, a max, a subtract,
the exp2 and an add, and the backward's P = 2^min(s·scale - lse·log2 e, 0) is one fma, a min
and the exp2 (lse·log2 e is computed once per query row, in two parts). Masking, key padding,
block sparsity and dropout use the same device functions as fa2 (nbflash.kernels.masks,
nbflash.kernels.dropout). Shared tiles hold 16-bit elements as
uint16 (numba-cuda has no bfloat16 type), rows padded by 8 elements (16 bytes) so that the 8
row addresses of an ldmatrix fall in different banks.
"""

import math

from numba import float32, uint16, uint32, uint64

from .._cuda import cuda
from .dropout import make_keep_tile, make_tile_kept
from .fa2 import LN2, LOG2E, LOG2E_LO, _check_keep_tile, _row_stats
from .masks import block_on, first_query_block, key_blocks, next_tile, visible
from .online_softmax import NEG_INF, ZERO, new_max
from .primitives import commit_async, copy16_async, make_row_reduce, make_wait_async
from .warp import exp2, make_warp_ops, split16


def put2(dst, at, word):
    """dst[at], dst[at + 1] = the low and high halves of `word` (16-bit arrays)."""
    lo, hi = split16(word)
    dst[at] = lo
    dst[at + 1] = hi


put2 = cuda.jit(device=True, inline=True)(put2)


def make_async_rows(ROWS, D, DS, T):
    """Device function: rows start .. start+ROWS-1 (zeros from row n on) of one head (flat
    offset `base`) of a flat (B, H, n, D) 16-bit array into shared memory at `off` with row
    stride DS, by cp.async in 16-byte pieces; issued, not waited for."""
    CH = D // 8                       # 16-byte pieces per row

    def load(src, base, start, n, smem, off, tid):
        for e in range(tid, ROWS * CH, T):
            r = e // CH
            x = 8 * (e % CH)
            inside = start + r < n
            copy16_async(smem, off + r * DS + x, src,
                         base + (start + r) * D + x if inside else base, 16 if inside else 0)

    return cuda.jit(device=True, inline=True)(load)


def make_store_rows(D, pack):
    """Device function: the fragments acc[a0:] of one m-tile (16 rows x D columns of a warp,
    see the module docstring) times `scale`, divided by d0 (row g) and d1 (row g + 8), as
    16-bit values into rows row0 + g, row0 + g + 8 (those below n) of a flat head at `base`."""
    NV = D // 8

    def store(dst, base, row0, n, acc, a0, scale, d0, d1, lane):
        g, t = lane // 4, lane % 4
        for h in range(2):
            row = row0 + g + 8 * h
            div = d0 if h == 0 else d1
            if row < n:
                for vt in range(NV):
                    put2(dst, base + row * D + 8 * vt + 2 * t,
                         pack(acc[a0 + 4 * vt + 2 * h] * scale / div,
                              acc[a0 + 4 * vt + 2 * h + 1] * scale / div))

    return cuda.jit(device=True, inline=True)(store)


def make_mma2(mma):
    """Device function: acc[y:y+8] += A B for a 16 x 16 A fragment (a0..a3) and one 16 x 16 B
    fragment as ldmatrix.x4 gives it (b0, b1: its first 8 columns; b2, b3: the next 8), i.e.
    two mma.m16n8k16 into two 8-column slices of a fragment array."""

    def mma2(acc, y, a0, a1, a2, a3, b0, b1, b2, b3):
        acc[y], acc[y + 1], acc[y + 2], acc[y + 3] = mma(
            a0, a1, a2, a3, b0, b1, acc[y], acc[y + 1], acc[y + 2], acc[y + 3])
        acc[y + 4], acc[y + 5], acc[y + 6], acc[y + 7] = mma(
            a0, a1, a2, a3, b2, b3, acc[y + 4], acc[y + 5], acc[y + 6], acc[y + 7])

    return cuda.jit(device=True, inline=True)(mma2)


def _coords(H, Nk, key_lengths, msb, msh, PAD):
    """(tid, warp, lane, bh, klen, mbase) of the calling thread (see fa2's _coords)."""
    tid = cuda.threadIdx.x
    b = cuda.blockIdx.z
    h = cuda.blockIdx.y
    klen = min(Nk, key_lengths[b]) if PAD else Nk
    return tid, tid // 32, tid % 32, b * H + h, klen, b * msb + h * msh


_coords = cuda.jit(device=True, inline=True)(_coords)


def make_fragment_mask(NT, TRANSPOSED, CAUSAL, SPARSE):
    """Device function: a 64-bit word whose bit x says whether entry x of a warp's score
    fragments (rows r0 + g + 8h, columns c0 + 8·slice + 2t + e) is visible: inside the
    sequences, not hidden by the causal mask, and (unless `all_on`) in a mask block that is on.
    TRANSPOSED: rows are keys and columns queries (the dK/dV pass). Computed once per tile that
    needs it, so that the score loops only test bits."""
    assert 4 * NT <= 64

    def mask(r0, c0, lane, Nq, Nk, klen, all_on, bmask, mbase, nbk, bq, bk):
        g, t = lane // 4, lane % 4
        bits = uint64(0)
        for s in range(NT):
            for h in range(2):
                for e in range(2):
                    a = r0 + g + 8 * h
                    c = c0 + 8 * s + 2 * t + e
                    row, col = (c, a) if TRANSPOSED else (a, c)
                    on = visible(row, col, Nq, Nk, klen, CAUSAL)
                    if on and SPARSE and not all_on:
                        on = block_on(bmask, mbase, nbk, bq, bk, row, col)
                    if on:
                        bits |= uint64(1) << uint64(4 * s + 2 * h + e)
        return bits

    return cuda.jit(device=True, inline=True)(mask)


def _bit(bits, x):
    return (bits >> uint64(x)) & uint64(1) != uint64(0)


_bit = cuda.jit(device=True, inline=True)(_bit)


def make_forward(t, causal, bf16, features):
    """FA2 forward on tensor cores for tiling.TcTiles `t` (W warps of RM = t.mtiles m-tiles of
    16 query rows each: R = 16·W·RM rows per block; C keys per step); see the module docstring.
    With RM = 2 each K or V fragment a warp reads from shared memory feeds two mma, as in
    FlashAttention-2's kernels."""
    D, W, C, STAGES, RM = t.d, t.warps, t.cols, t.stages, t.mtiles
    R, T, DS = t.rows, t.threads, t.ds
    KD, NT, NV = D // 16, C // 8, D // 8
    # fragment array sizes (compile-time constants); m-tile mt's entries start at mt * size
    QF, SF, OF = 4 * KD, 4 * NT, 4 * NV
    N_Q, N_S, N_O, N_R, N_P = RM * QF, RM * SF, RM * OF, 2 * RM, 4 * RM
    CAUSAL = bool(causal)
    DROP, PAD, SPARSE = features
    Q_OFF, K_OFF = 0, R * DS
    STAGE = 2 * C * DS                  # K_j and V_j
    KEEP_OFF = t.keep_offset("forward")  # uint32 index of dropout's keep bits
    ldsm, ldsm_t, mma, pack, _ = make_warp_ops(T, bf16)
    mma2 = make_mma2(mma)
    load_q = make_async_rows(R, D, DS, T)
    load_kv = make_async_rows(C, D, DS, T)
    wait_tile, wait_q = make_wait_async(STAGES - 2), make_wait_async(STAGES - 1)
    row_max, row_sum = make_row_reduce(4, T)
    fragment_mask = make_fragment_mask(NT, False, CAUSAL, SPARSE)
    fill_keep, tile_kept = make_keep_tile(R, C, T), make_tile_kept(C)
    _check_keep_tile(DROP, C, t)
    store_rows = make_store_rows(D, pack)

    def softmax_mtile(s, m, l, acc, mt, r0, col0, lane, tid, masked, Nq, Nk, klen, all_on,
                      bmask, mbase, nbk, bq, bk, sc_hi, sc_lo):
        """The online softmax (FA2 Alg. 1 lines 8-10) of m-tile mt (rows r0 + g, r0 + g + 8):
        scores scaled to base 2 and masked, running max, P̃ = 2^(s - m) in place of S, ℓ and
        the output rows rescaled."""
        vis = fragment_mask(r0, col0, lane, Nq, Nk, klen, all_on, bmask, mbase, nbk, bq,
                            bk) if masked else uint64(0)
        for h in range(2):
            m_blk = NEG_INF
            for sl in range(NT):
                for e in range(2):
                    y = 4 * sl + 2 * h + e
                    sc = s[mt * SF + y] * sc_hi
                    if masked and not _bit(vis, y):
                        sc = NEG_INF
                    s[mt * SF + y] = sc
                    m_blk = max(m_blk, sc)
            r = 2 * mt + h
            m_new, m_ref, alpha = new_max(m[r], row_max(m_blk, tid))
            m[r] = m_new
            l_blk = ZERO
            for sl in range(NT):
                for e in range(2):
                    x = mt * SF + 4 * sl + 2 * h + e
                    p = exp2(s[x] - m_ref)
                    l_blk += p     # ℓ: the softmax's sum, before dropout
                    s[x] = p
            l[r] = l[r] * alpha + l_blk
            for vt in range(NV):
                acc[mt * OF + 4 * vt + 2 * h] *= alpha
                acc[mt * OF + 4 * vt + 2 * h + 1] *= alpha

    def finish_mtile(o, lse, m, l, acc, mt, q_base, bh, r0, Nq, lane, tid):
        """O = diag(ℓ)^-1 O and lse = m + log ℓ of m-tile mt (rows r0 + g, r0 + g + 8)."""
        one = float32(1.0)
        l0 = row_sum(l[2 * mt], tid)
        l1 = row_sum(l[2 * mt + 1], tid)
        store_rows(o, q_base, r0, Nq, acc, mt * OF, one, l0 if l0 > ZERO else one,
                   l1 if l1 > ZERO else one, lane)
        if lane % 4 == 0:
            for h in range(2):
                row = r0 + lane // 4 + 8 * h
                l_row = l0 if h == 0 else l1
                if row < Nq:
                    lse[bh * Nq + row] = (m[2 * mt + h] + math.log2(l_row)) * LN2 \
                        if l_row > ZERO else NEG_INF

    softmax_mtile = cuda.jit(device=True, inline=True)(softmax_mtile)
    finish_mtile = cuda.jit(device=True, inline=True)(finish_mtile)
    assert RM in (1, 2), RM

    def tc_forward(q, k, v, o, lse, key_lengths, bmask, Nq, Nk, H, sc_hi, sc_lo, msb, msh, nbk,
                   bq, bk, seed_lo, seed_hi, offset, thr, drop_scale):
        """Grid (ceil(Nq/R), H, B), T threads, t.smem_bytes("forward", dropout) of dynamic
        shared memory; q, k, v, o: 16-bit bits (uint16), flat (B, H, N, d); lse: float32.
        sc_hi = τ log2(e) rounded to float32; sc_lo is not used (fa2's argument layout)."""
        smem = cuda.shared.array(0, uint16)
        bits = cuda.shared.array(0, uint32)      # the same memory: keep bits at KEEP_OFF
        tid, warp, lane, bh, klen, mbase = _coords(H, Nk, key_lengths, msb, msh, PAD)
        g, t4 = lane // 4, lane % 4
        row0 = cuda.blockIdx.x * R
        wr = 16 * RM * warp                    # this warp's first query row in the block
        q_base, k_base = bh * Nq * D, bh * Nk * D

        load_q(q, q_base, row0, Nq, smem, Q_OFF, tid)
        commit_async()
        n_blocks = key_blocks(row0, R, C, Nq, Nk, klen, CAUSAL)
        # the tile walks (Alg. 5 skips tiles whose mask blocks are all off): jl is the next tile
        # to load, jc the next to compute; both visit the same tiles
        jl, _ = next_tile(0, n_blocks, row0, R, 0, C, 0, C, bmask, mbase, nbk, bq, bk, Nq,
                          klen) if SPARSE else (0, True)
        jc, all_on = next_tile(0, n_blocks, row0, R, 0, C, 0, C, bmask, mbase, nbk, bq, bk,
                               Nq, klen) if SPARSE else (0, True)
        for st in range(STAGES - 1):            # the first STAGES - 1 tiles in flight
            if jl < n_blocks:
                load_kv(k, k_base, jl * C, klen, smem, K_OFF + st * STAGE, tid)
                load_kv(v, k_base, jl * C, klen, smem, K_OFF + st * STAGE + C * DS, tid)
                jl, _ = next_tile(jl + 1, n_blocks, row0, R, 0, C, 0, C, bmask, mbase, nbk,
                                  bq, bk, Nq, klen) if SPARSE else (jl + 1, True)
            commit_async()

        wait_q()              # Q_i is in (its group was committed first)
        cuda.syncthreads()
        qf = cuda.local.array(N_Q, uint32)   # Q_i's A fragments, kept for every step
        mi = lane // 8
        a_lane = (lane % 8 + 8 * (mi % 2)) * DS + 8 * (mi // 2)    # A and ldmatrix.trans B
        b_lane = (lane % 8 + 8 * (mi // 2)) * DS + 8 * (mi % 2)    # B from rows (Kᵀ)
        for mt in range(RM):
            for kk in range(KD):
                a0, a1, a2, a3 = ldsm(smem, Q_OFF + (wr + 16 * mt) * DS + 16 * kk + a_lane)
                x = mt * QF + 4 * kk
                qf[x] = a0
                qf[x + 1] = a1
                qf[x + 2] = a2
                qf[x + 3] = a3

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
            wait_tile()            # tile `step` is in ...
            cuda.syncthreads()     # ... for every thread, and the buffer of step - 1 is free
            buf = K_OFF + (step % STAGES) * STAGE
            nxt = K_OFF + ((step + STAGES - 1) % STAGES) * STAGE
            if jl < n_blocks:
                load_kv(k, k_base, jl * C, klen, smem, nxt, tid)
                load_kv(v, k_base, jl * C, klen, smem, nxt + C * DS, tid)
                jl, _ = next_tile(jl + 1, n_blocks, row0, R, 0, C, 0, C, bmask, mbase, nbk,
                                  bq, bk, Nq, klen) if SPARSE else (jl + 1, True)
            commit_async()
            if DROP:
                fill_keep(bits, KEEP_OFF, row0, col0, bh, seed_lo, seed_hi, offset, thr, tid)
                cuda.syncthreads()

            # S = Q_i K_jᵀ: B fragments of 16 keys x 16 dims from K_j's rows, each used by the
            # warp's RM m-tiles
            for x in range(N_S):
                s[x] = ZERO
            for kk in range(KD):
                for np2 in range(NT // 2):
                    b0, b1, b2, b3 = ldsm(smem, buf + 16 * np2 * DS + 16 * kk + b_lane)
                    for mt in range(RM):
                        a = mt * QF + 4 * kk
                        x = mt * SF + 8 * np2
                        mma2(s, x, qf[a], qf[a + 1], qf[a + 2], qf[a + 3], b0, b1, b2, b3)

            masked = col0 + C > klen or (CAUSAL and col0 + C - 1 > row0 + Nk - Nq) \
                or not all_on
            softmax_mtile(s, m, l, acc, 0, row0 + wr, col0, lane, tid, masked, Nq, Nk, klen,
                          all_on, bmask, mbase, nbk, bq, bk, sc_hi, sc_lo)
            if RM == 2:   # (a call per m-tile: LLVM leaves a loop around this body rolled)
                softmax_mtile(s, m, l, acc, 1, row0 + wr + 16, col0, lane, tid, masked, Nq,
                              Nk, klen, all_on, bmask, mbase, nbk, bq, bk, sc_hi, sc_lo)
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
                    x = mt * SF + 8 * kk
                    pa[4 * mt] = pack(s[x], s[x + 1])
                    pa[4 * mt + 1] = pack(s[x + 2], s[x + 3])
                    pa[4 * mt + 2] = pack(s[x + 4], s[x + 5])
                    pa[4 * mt + 3] = pack(s[x + 6], s[x + 7])
                for dp in range(NV // 2):
                    b0, b1, b2, b3 = ldsm_t(smem, buf + C * DS + 16 * kk * DS + 16 * dp + a_lane)
                    for mt in range(RM):
                        y = mt * OF + 8 * dp
                        a0, a1, a2, a3 = pa[4 * mt], pa[4 * mt + 1], pa[4 * mt + 2], \
                            pa[4 * mt + 3]
                        mma2(acc, y, a0, a1, a2, a3, b0, b1, b2, b3)
            jc, all_on = next_tile(jc + 1, n_blocks, row0, R, 0, C, 0, C, bmask, mbase, nbk,
                                   bq, bk, Nq, klen) if SPARSE else (jc + 1, True)
            step += 1

        # O_i = diag(ℓ)^-1 O_i, written once; lse = m + log ℓ (natural log)
        finish_mtile(o, lse, m, l, acc, 0, q_base, bh, row0 + wr, Nq, lane, tid)
        if RM == 2:
            finish_mtile(o, lse, m, l, acc, 1, q_base, bh, row0 + wr + 16, Nq, lane, tid)

    return tc_forward


def make_convert(threads, bf16):
    """dq (16-bit) from the float32 accumulator, two elements per thread."""
    T = threads
    pack = make_warp_ops(T, bf16)[3]

    def tc_convert(src, dst, n_pairs):
        e = cuda.blockIdx.x * T + cuda.threadIdx.x
        if e < n_pairs:
            put2(dst, 2 * e, pack(src[2 * e], src[2 * e + 1]))

    return tc_convert


def make_dkdv(t, causal, bf16, features):
    """FA2 backward over key blocks on tensor cores for tiling.TcTiles `t` (16·W keys per block,
    C queries per step), dQ added atomically; see the module docstring."""
    D, W, C, STAGES = t.d, t.warps, t.cols, t.stages
    R, T, DS, PS = t.rows, t.threads, t.ds, t.ps
    assert t.mtiles == 1, "the dK/dV pass has one m-tile (16 keys) per warp"
    KD, NT, NV = D // 16, C // 8, D // 8
    N_S, N_O = 4 * NT, 4 * NV       # fragment array sizes (compile-time constants)
    CAUSAL = bool(causal)
    DROP, PAD, SPARSE = features
    K_OFF, V_OFF = 0, R * DS
    DS_OFF = 2 * R * DS                  # dSᵀ: R keys x C queries, row stride PS
    Q_OFF = DS_OFF + R * PS              # stage s: Q_i, dO_i, then lse_i and D_i (float32)
    STAGE = 2 * C * DS + 4 * C
    KEEP_OFF = t.keep_offset("dkdv")
    ITEMS = (C // 16) * (D // 16)        # dQ_i's 16 x 16 pieces, shared among the warps
    assert ITEMS % W == 0, (C, D, W)
    ldsm, ldsm_t, mma, pack, _ = make_warp_ops(T, bf16)
    mma2 = make_mma2(mma)
    load_rows = make_async_rows(C, D, DS, T)
    load_kv = make_async_rows(R, D, DS, T)
    wait_tile = make_wait_async(STAGES - 2)
    fragment_mask = make_fragment_mask(NT, True, CAUSAL, SPARSE)
    fill_keep, tile_kept = make_keep_tile(C, R, T), make_tile_kept(R)
    _check_keep_tile(DROP, R, t)
    store_rows = make_store_rows(D, pack)

    def load_step(q, do, lse, delta, q_base, bh, row0, Nq, smem, smemf, off, tid):
        """Q_i, dO_i by cp.async, lse_i and D_i (see fa2's _row_stats) by plain loads."""
        load_rows(q, q_base, row0, Nq, smem, off, tid)
        load_rows(do, q_base, row0, Nq, smem, off + C * DS, tid)
        f = (off + 2 * C * DS) // 2
        for r in range(tid, C, T):   # lse in base 2 (lse·log2 e, in two parts), and D
            lse_r, dlt = _row_stats(lse, delta, bh * Nq + row0 + r, row0 + r < Nq)
            smemf[f + r] = cuda.fma(lse_r, LOG2E, lse_r * LOG2E_LO)
            smemf[f + C + r] = dlt

    load_step = cuda.jit(device=True, inline=True)(load_step)

    def tc_dkdv(q, k, v, do, lse, delta, dq_acc, dk, dv, key_lengths, bmask, Nq, Nk, H, sc_hi,
                sc_lo, scale, msb, msh, nbk, bq, bk, seed_lo, seed_hi, offset, thr, drop_scale):
        """Grid (ceil(Nk/R), H, B), T threads, t.smem_bytes("dkdv", dropout) of dynamic shared
        memory; 16-bit arrays as uint16; delta from tc_delta; dq_acc: zeroed float32."""
        smem = cuda.shared.array(0, uint16)
        smemf = cuda.shared.array(0, float32)    # the same memory: lse_i, D_i
        bits = cuda.shared.array(0, uint32)      # and dropout's keep bits at KEEP_OFF
        tid, warp, lane, bh, klen, mbase = _coords(H, Nk, key_lengths, msb, msh, PAD)
        g, t4 = lane // 4, lane % 4
        mi = lane // 8
        key0 = cuda.blockIdx.x * R
        wkey0 = key0 + 16 * warp
        a_lane = (lane % 8 + 8 * (mi % 2)) * DS + 8 * (mi // 2)    # A, and ldmatrix.trans B
        b_lane = (lane % 8 + 8 * (mi // 2)) * DS + 8 * (mi % 2)    # B from rows (Qᵀ, dOᵀ)
        q_base, k_base = bh * Nq * D, bh * Nk * D

        load_kv(k, k_base, key0, klen, smem, K_OFF, tid)
        load_kv(v, k_base, key0, klen, smem, V_OFF, tid)
        commit_async()       # K_j, V_j: the first group, complete when step 0's tile is
        dk_acc = cuda.local.array(N_O, float32)
        dv_acc = cuda.local.array(N_O, float32)
        for x in range(4 * NV):
            dk_acc[x] = ZERO
            dv_acc[x] = ZERO
        st = cuda.local.array(N_S, float32)     # Sᵀ, then Pᵀ
        dpt = cuda.local.array(N_S, float32)    # dPᵀ, then dSᵀ
        dq = cuda.local.array(8, float32)

        first = first_query_block(key0, C, Nq, Nk, CAUSAL)
        n_steps = (Nq + C - 1) // C if key0 < klen else first
        il, _ = next_tile(first, n_steps, 0, C, key0, R, C, 0, bmask, mbase, nbk, bq, bk, Nq,
                          klen) if SPARSE else (first, True)
        ic, all_on = next_tile(first, n_steps, 0, C, key0, R, C, 0, bmask, mbase, nbk, bq, bk,
                               Nq, klen) if SPARSE else (first, True)
        for s_ in range(STAGES - 1):
            if il < n_steps:
                load_step(q, do, lse, delta, q_base, bh, il * C, Nq, smem, smemf,
                          Q_OFF + s_ * STAGE, tid)
                il, _ = next_tile(il + 1, n_steps, 0, C, key0, R, C, 0, bmask, mbase, nbk, bq,
                                  bk, Nq, klen) if SPARSE else (il + 1, True)
            commit_async()

        step = 0
        while ic < n_steps:
            row0 = ic * C
            wait_tile()
            cuda.syncthreads()   # step's Q_i, dO_i are in; the previous step is done with dSᵀ
            off = Q_OFF + (step % STAGES) * STAGE
            nxt = Q_OFF + ((step + STAGES - 1) % STAGES) * STAGE
            if il < n_steps:
                load_step(q, do, lse, delta, q_base, bh, il * C, Nq, smem, smemf, nxt, tid)
                il, _ = next_tile(il + 1, n_steps, 0, C, key0, R, C, 0, bmask, mbase, nbk, bq,
                                  bk, Nq, klen) if SPARSE else (il + 1, True)
            commit_async()
            if DROP:   # the forward's keep bits, drawn again (Alg. 4 line 14)
                fill_keep(bits, KEEP_OFF, row0, key0, bh, seed_lo, seed_hi, offset, thr, tid)
                cuda.syncthreads()
            do_off = off + C * DS
            f = (off + 2 * C * DS) // 2          # lse_i, D_i in smemf

            # Sᵀ = K_j Q_iᵀ and dPᵀ = V_j dO_iᵀ: A from this warp's K, V rows, B from Q_i, dO_i
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
                (CAUSAL and key0 + R - 1 > row0 + Nk - Nq) or not all_on
            vis = fragment_mask(wkey0, row0, lane, Nq, Nk, klen, all_on, bmask, mbase, nbk,
                                bq, bk) if masked else uint64(0)
            for x in range(4 * NT):   # Pᵀ from lse; dSᵀ = Pᵀ ∘ (dPᵀ ∘ Z/(1-p) - D)
                qc = 8 * (x // 4) + 2 * t4 + x % 2        # query column within the step
                lse_q = smemf[f + qc]                      # lse·log2 e
                dp = dpt[x]
                if DROP:
                    if not tile_kept(bits, KEEP_OFF, qc, 16 * warp + g + 8 * ((x // 2) % 2)):
                        dp = ZERO
                    else:
                        dp *= drop_scale
                p = exp2(min(cuda.fma(st[x], sc_hi, -lse_q), ZERO))
                if masked and not _bit(vis, x):
                    p = ZERO
                st[x] = p
                dpt[x] = p * (dp - smemf[f + C + qc])
            if DROP:   # dV takes P ∘ Z / (1-p) (Alg. 4 line 17)
                for x in range(4 * NT):
                    qc = 8 * (x // 4) + 2 * t4 + x % 2
                    kr = 16 * warp + g + 8 * ((x // 2) % 2)
                    st[x] *= drop_scale if tile_kept(bits, KEEP_OFF, qc, kr) else ZERO

            # dV_j += P̃ᵀ dO_i and dK_j += dSᵀ Q_i: A from the fragments, B by ldmatrix.trans;
            # dSᵀ also to shared memory for dQ
            for kk in range(NT // 2):
                x = 8 * kk
                p0 = pack(st[x], st[x + 1])
                p1 = pack(st[x + 2], st[x + 3])
                p2 = pack(st[x + 4], st[x + 5])
                p3 = pack(st[x + 6], st[x + 7])
                s0 = pack(dpt[x], dpt[x + 1])
                s1 = pack(dpt[x + 2], dpt[x + 3])
                s2 = pack(dpt[x + 4], dpt[x + 5])
                s3 = pack(dpt[x + 6], dpt[x + 7])
                at = DS_OFF + (16 * warp + g) * PS + 16 * kk + 2 * t4
                put2(smem, at, s0)
                put2(smem, at + 8 * PS, s1)
                put2(smem, at + 8, s2)
                put2(smem, at + 8 * PS + 8, s3)
                for dp2 in range(NV // 2):
                    brow = 16 * kk * DS + 16 * dp2 + a_lane
                    b0, b1, b2, b3 = ldsm_t(smem, do_off + brow)
                    y = 8 * dp2
                    mma2(dv_acc, y, p0, p1, p2, p3, b0, b1, b2, b3)
                    b0, b1, b2, b3 = ldsm_t(smem, off + brow)
                    mma2(dk_acc, y, s0, s1, s2, s3, b0, b1, b2, b3)
            cuda.syncthreads()   # dSᵀ complete

            # dQ_i += τ dS K_j, in 16 x 16 pieces shared among the warps, added atomically
            for it in range(ITEMS // W):
                item = warp + W * it
                qm = item // (D // 16)
                dp2 = item % (D // 16)
                for x in range(8):
                    dq[x] = ZERO
                for kk in range(R // 16):
                    a0, a1, a2, a3 = ldsm_t(smem, DS_OFF + (16 * kk + lane % 8 + 8 * (mi // 2))
                                            * PS + 16 * qm + 8 * (mi % 2))
                    b0, b1, b2, b3 = ldsm_t(smem, K_OFF + (16 * kk + lane % 8 + 8 * (mi % 2))
                                            * DS + 16 * dp2 + 8 * (mi // 2))
                    mma2(dq, 0, a0, a1, a2, a3, b0, b1, b2, b3)
                for x in range(8):
                    row = row0 + 16 * qm + g + 8 * ((x // 2) % 2)
                    if row < Nq:
                        cuda.atomic.add(dq_acc, q_base + row * D + 16 * dp2 + 8 * (x // 4)
                                        + 2 * t4 + x % 2, dq[x] * scale)
            ic, all_on = next_tile(ic + 1, n_steps, 0, C, key0, R, C, 0, bmask, mbase, nbk, bq,
                                   bk, Nq, klen) if SPARSE else (ic + 1, True)
            step += 1

        one = float32(1.0)   # dK_j = τ Σ_i dS_ijᵀ Q_i, dV_j = Σ_i P̃_ijᵀ dO_i, written once
        store_rows(dk, k_base, wkey0, Nk, dk_acc, 0, scale, one, one, lane)
        store_rows(dv, k_base, wkey0, Nk, dv_acc, 0, one, one, one, lane)

    return tc_dkdv


__all__ = ["make_forward", "make_dkdv", "make_convert", "make_async_rows"]
