"""FlashAttention-2 for float32 math on CUDA cores: register-tiled forward and backward kernels.

Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning" (2023).
What differs from fa1 (the FlashAttention paper's Algorithms 1 and 4) is the work partitioning
(FA2 §3.1-3.2); the maths is the same:

- Forward (FA2 Algorithm 1): one block per (query block i, head, batch); it loads Q_i once and
  walks the key/value blocks j. Each thread keeps its rows' running max m and sum ℓ and its
  slice of the *unnormalised* output O_i in registers; O_i is divided by ℓ once at the end and
  only lse = m + log ℓ is written for the backward.
- Backward (FA2 Algorithm 2): D = rowsum(dO ∘ O) first (:func:`make_delta`); then one block per
  (key block j, head, batch) keeps dK_j and dV_j in registers while it walks the query blocks,
  recomputing S and P from Q, K and lse (:func:`make_dkdv`). dQ gets the contribution of each
  (i, j) pair either by atomic adds from that same loop (fast, but the order of the adds, and so
  the last bits of dq, vary from run to run) or, for ``deterministic=True``, from a separate pass
  with one block per query block that walks the key blocks in order (:func:`make_dq`).
- Causal: blocks above the diagonal are skipped; only blocks that straddle the diagonal (or the
  ragged ends of the sequences) evaluate the mask, element by element.

Scores are handled in base 2: τ log2(e) is folded into one scale so that P = 2^(s' - m') with
math.exp2 (``ex2.approx``). That scale is passed as two float32 (hi + lo) and the product is
taken as fma(s, hi, s·lo), so folding it in costs no accuracy: s' is s·τ·log2(e) rounded once,
as the naive baseline rounds s·τ. The forward and the backward compute s' the same way, bit for
bit. lse is stored in natural-log units, as fa1 and the naive baseline store it; the backward
takes s' - lse log2(e) with log2(e) in two parts too, and P = 2^min(s' - lse log2(e), 0) <= 1
(converting lse back can put it an ulp below the forward's largest score).

Key padding, block masks (Algorithm 5 of the FlashAttention paper) and dropout are compile-time
options (nbflash.kernels.options): tiles past a key length or whose mask blocks are all off are
skipped (:func:`next_tile`), and the mask is evaluated element by element only in tiles that
straddle an edge. Dropout's keep bits are drawn per tile into shared memory
(nbflash.kernels.dropout.make_keep_tile), once per 8 keys, in the forward and again in the
backward; ℓ sums P before dropout, O and dV use P ∘ Z / (1-p), and dP is dP ∘ Z / (1-p).

Tiles are described by nbflash.tiling.RegTiles (R rows owned by the block, C rows of the other
operand per step, tm x tn scores per thread); products go through nbflash.kernels.regtile and
the row reductions through warp shuffles (nbflash.kernels.primitives). Inputs are flat
(contiguous) views of the (B, H, N, d) arrays, so a launch passes few arguments.
"""

import math

import numpy as np
from numba import float32, uint32

from .._cuda import cuda
from .dropout import make_drop, make_keep_tile
from .options import Features
from .masks import (ALL, bit_on, first_query_block, key_blocks, make_block_bits, next_tile,
                    tile_status, visible)
from .online_softmax import NEG_INF, ONE, ZERO, new_max
from .primitives import commit_async, make_row_reduce, wait_async_all, wait_async_all_but_1
from .regtile import (make_dot_cols, make_dot_rows, make_pair_loader, make_row_store,
                      make_tile_loader)

LOG2E = float32(math.log2(math.e))
LOG2E_LO = float32(math.log2(math.e) - float(LOG2E))   # LOG2E + LOG2E_LO = log2(e) to ~1e-15
LN2 = float32(math.log(2.0))


def _scaled(s, scale_hi, scale_lo):
    """s · τ log2(e), rounded once: τ log2(e) = scale_hi + scale_lo (see the module docstring)."""
    return cuda.fma(s, scale_hi, s * scale_lo)


_scaled = cuda.jit(device=True, inline=True)(_scaled)


def split_scale(scale):
    """(hi, lo): τ log2(e) as the sum of two float32, for the kernels' scale arguments."""
    exact = float(scale) * math.log2(math.e)
    hi = np.float32(exact)
    return float(hi), float(np.float32(exact - float(hi)))


def _layout(t):
    """Compile-time constants of the kernels for RegTiles `t`:
    R, C, D, TM, TN, L (lanes), RG (row groups), T (threads), TX4, TX (output columns per
    thread), DS (row stride of d-wide tiles), W (columns loaded per row)."""
    return (t.R, t.C, t.d, t.tm, t.tn, t.lanes, t.row_groups, t.threads, t.tx4, 4 * t.tx4,
            t.ds, max(t.dp, 4 * t.d4))


def _coords(L, D, H, Nq, Nk, key_lengths, msb, msh, PAD):
    """Where a thread is: (tid, rg, cg, bh, q_base, k_base, klen, mbase). Thread tid is lane cg
    of row group rg of its block's register tiles; the block works on head bh = b*H + h of grid
    (x, h, b), whose q-shaped rows start at q_base and k-shaped rows at k_base. klen: the key
    length of batch entry b (key_lengths[b] with PAD, else Nk); mbase: the offset of the head's
    block mask (batch and head strides msb, msh)."""
    tid = cuda.threadIdx.x
    b = cuda.blockIdx.z
    h = cuda.blockIdx.y
    bh = b * H + h
    klen = min(Nk, key_lengths[b]) if PAD else Nk
    return tid, tid // L, tid % L, bh, bh * Nq * D, bh * Nk * D, klen, b * msb + h * msh


_coords = cuda.jit(device=True, inline=True)(_coords)


def _row_stats(lse, delta, at, inside):
    """lse and D of a query row for the backward: 0 for a row past Nq, and lse 0 where it is
    -inf (a row that sees no key: all its entries are masked, so any finite value will do)."""
    lse_r = ZERO
    dlt = ZERO
    if inside:
        lse_r = lse[at]
        if lse_r == NEG_INF:
            lse_r = ZERO
        dlt = delta[at]
    return lse_r, dlt


_row_stats = cuda.jit(device=True, inline=True)(_row_stats)


def _check_keep_tile(drop, keys, t):
    if drop and keys % 8:
        raise ValueError(f"{t}: dropout needs tiles with a multiple of 8 keys (has {keys})")


def make_forward(t, causal, dtype="float32", features=Features()):
    """FA2 forward for RegTiles `t` (R query rows per block, C keys per step).

    With t.stages = 2 the K, V tiles are double-buffered: block j + 1 is copied (cp.async for
    float32 inputs) while block j is computed on. `features`: nbflash.kernels.options.Features.
    """
    R, C, D, TM, TN, L, RG, T, TX4, TX, DS, W = _layout(t)
    N_S, N_ACC = TM * TN, TM * TX       # local array sizes (compile-time constants)
    PS = t.ps(C)
    CAUSAL = bool(causal)
    DROP, PAD, SPARSE = features
    STAGES = t.stages
    ASYNC = STAGES == 2 and str(dtype) == "float32" and D % 4 == 0
    KV = 2 * C * DS                     # one stage of K and V
    Q_OFF, K_OFF = 0, R * DS
    P_OFF = K_OFF + STAGES * KV
    KEEP_OFF = t.smem_elements("forward")   # dropout's keep bits (uint32)
    load_q = make_tile_loader(R, D, W, DS, T)
    load_kv = make_pair_loader(make_tile_loader(C, D, W, DS, T, ASYNC), C * DS)
    qk = make_dot_rows(TM, TN, t.d4, RG * DS, L * DS)          # S = Q Kᵀ
    pv = make_dot_cols(TM, TX4, C // 4, RG * PS, DS, 4 * L)    # O += P̃ V
    row_max, row_sum = make_row_reduce(L, T)
    fill_keep, (drop_tile, _) = make_keep_tile(R, C, T), make_drop(TM, TN, RG, L, C)
    _check_keep_tile(DROP, C, t)
    block_bits = make_block_bits(TM, TN, RG, L, SPARSE)

    def fa2_forward(q, k, v, o, lse, key_lengths, bmask, Nq, Nk, H, sc_hi, sc_lo, msb, msh,
                    nbk, bq, bk, seed_lo, seed_hi, offset, thr, drop_scale):
        """Grid (ceil(Nq/R), H, B), T threads, t.smem_bytes("forward", dropout) of dynamic
        shared memory. q, o: flat (B, H, Nq, d); k, v: flat (B, H, Nk, d); lse: flat (B, H, Nq)
        float32. sc_hi + sc_lo = τ log2(e) (:func:`split_scale`); then the options' arguments
        (nbflash.kernels.options)."""
        smem = cuda.shared.array(0, float32)
        bits = cuda.shared.array(0, uint32)      # the same memory: keep bits at KEEP_OFF
        tid, rg, cg, bh, q_base, k_base, klen, mbase = _coords(L, D, H, Nq, Nk, key_lengths,
                                                                 msb, msh, PAD)
        row0 = cuda.blockIdx.x * R

        load_q(q, q_base, row0, Nq, smem, Q_OFF, tid)          # Q_i, once
        m = cuda.local.array(TM, float32)                       # running max (base 2)
        l = cuda.local.array(TM, float32)                       # this thread's part of ℓ
        acc = cuda.local.array(N_ACC, float32)                # unnormalised O_i slice
        for i in range(TM):
            m[i] = NEG_INF
            l[i] = ZERO
        for x in range(TM * TX):
            acc[x] = ZERO
        s = cuda.local.array(N_S, float32)

        # key blocks past the key length, and with causal masking those after the last key the
        # block's last row sees, are skipped; so are those the block mask hides (Alg. 5)
        n_blocks = key_blocks(row0, R, C, Nq, Nk, klen, CAUSAL)
        j, all_on = next_tile(0, n_blocks, row0, R, 0, C, 0, C, bmask, mbase, nbk, bq, bk, Nq,
                              klen) if SPARSE else (0, True)
        if STAGES == 2 and j < n_blocks:   # the first block into stage 0
            load_kv(k, v, k_base, j * C, klen, smem, K_OFF, tid)
            commit_async()
        step = 0
        while j < n_blocks:
            col0 = j * C
            j_next, next_all_on = next_tile(j + 1, n_blocks, row0, R, 0, C, 0, C, bmask, mbase,
                                            nbk, bq, bk, Nq, klen) if SPARSE else (j + 1, True)
            cuda.syncthreads()   # the previous step has finished reading its K, V, P̃ and bits
            if STAGES == 2:      # K_j, V_j were loaded one step ahead; fetch the next ones
                k_off = K_OFF + (step % 2) * KV
                if j_next < n_blocks:
                    load_kv(k, v, k_base, j_next * C, klen, smem,
                            K_OFF + ((step + 1) % 2) * KV, tid)
                    commit_async()
                    wait_async_all_but_1()
                else:
                    wait_async_all()
            else:
                k_off = K_OFF
                load_kv(k, v, k_base, col0, klen, smem, K_OFF, tid)
            if DROP:
                fill_keep(bits, KEEP_OFF, row0, col0, bh, seed_lo, seed_hi, offset, thr, tid)
            v_off = k_off + C * DS
            cuda.syncthreads()   # K_j, V_j (and the keep bits) complete for every thread

            for x in range(TM * TN):
                s[x] = ZERO
            qk(smem, Q_OFF + rg * DS, k_off + cg * DS, s)
            # the mask is evaluated only where the block reaches past the key length, over the
            # diagonal, or over mask blocks that are off
            on = block_bits(all_on, bmask, mbase, nbk, bq, bk, row0, col0, rg, cg, Nq, klen)
            masked = col0 + C > klen or (CAUSAL and col0 + C - 1 > row0 + Nk - Nq) or on != ALL
            for i in range(TM):
                row = row0 + rg + RG * i
                m_blk = NEG_INF
                for u in range(TN):
                    sc = _scaled(s[i * TN + u], sc_hi, sc_lo)
                    if masked and not (visible(row, col0 + cg + L * u, Nq, Nk, klen, CAUSAL)
                                       and bit_on(on, i * TN + u)):
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

        # O_i = diag(ℓ)^-1 O_i, written once; lse = m + log ℓ (natural log)
        for i in range(TM):
            row = row0 + rg + RG * i
            l_row = row_sum(l[i], tid)
            if row < Nq:
                for u in range(TX4):
                    for e in range(4):
                        col = u * 4 * L + 4 * cg + e
                        if col < D:
                            o[q_base + row * D + col] = acc[i * TX + 4 * u + e] / l_row \
                                if l_row > ZERO else ZERO
                if cg == 0:
                    lse[bh * Nq + row] = (m[i] + math.log2(l_row)) * LN2 \
                        if l_row > ZERO else NEG_INF

    return fa2_forward


def make_delta(threads, load=float32):
    """D = rowsum(dO ∘ O) per query row (FA2 Algorithm 2, line 4), one thread per row; also
    zeroes the row of the dQ accumulator that the dK/dV pass adds into (saves a launch).
    load: an element of o or do as float32 (tc passes the conversion of its 16-bit bits)."""
    T = threads

    def fa2_delta(o, do, delta, dq_acc, n_rows, D, zero_dq):
        """Grid ceil(n_rows / T); o, do, dq_acc: flat (rows, D); delta: float32 (rows).
        zero_dq: 1 to zero dq_acc (else it may be a placeholder)."""
        row = cuda.blockIdx.x * T + cuda.threadIdx.x
        if row < n_rows:
            acc = ZERO
            for x in range(D):
                acc += load(o[row * D + x]) * load(do[row * D + x])
                if zero_dq:
                    dq_acc[row * D + x] = ZERO
            delta[row] = acc

    return fa2_delta


def _p_and_ds(s, dp, sc_hi, sc_lo, lse, lse_lo, dlt):
    """P = 2^min(s' - lse log2(e), 0) (see the module docstring) and dS = P (dP - D);
    lse_lo = lse · LOG2E_LO."""
    p = math.exp2(min(cuda.fma(-lse, LOG2E, _scaled(s, sc_hi, sc_lo)) - lse_lo, ZERO))
    return p, p * (dp - dlt)


_p_and_ds = cuda.jit(device=True, inline=True)(_p_and_ds)


def make_dkdv(t, causal, atomic_dq, dtype="float32", features=Features()):
    """FA2 backward over key blocks for RegTiles `t` (R keys per block, C queries per step).

    atomic_dq: also add τ dS K_j into the float32 buffer dq_acc with atomics. With t.stages = 2
    the streamed Q_i, dO_i (and lse_i, D_i) are double-buffered: step i + 1's are copied
    (cp.async for float32 inputs) while step i computes.
    """
    R, C, D, TM, TN, L, RG, T, TX4, TX, DS, W = _layout(t)
    N_S, N_ACC = TM * TN, TM * TX       # local array sizes (compile-time constants)
    PSC, PSR = t.ps(C), t.ps(R)
    TMQ = C // RG        # dQ rows per thread
    N_DQ = TMQ * TX
    CAUSAL, ATOMIC = bool(causal), bool(atomic_dq)
    DROP, PAD, SPARSE = features
    STAGES = t.stages
    ASYNC = STAGES == 2 and str(dtype) == "float32" and D % 4 == 0
    KEEP_OFF = t.smem_elements("dkdv")   # dropout's keep bits (uint32): C queries x R keys
    K_OFF, V_OFF = 0, R * DS
    PT_OFF = 2 * R * DS
    DST_OFF = PT_OFF + R * PSC
    DS_OFF = DST_OFF + R * PSC
    Q_OFF = DS_OFF + C * PSR            # stage s: Q, dO, lse, D at Q_OFF + s * STAGE
    STAGE = 2 * C * DS + 2 * C
    load_kv = make_pair_loader(make_tile_loader(R, D, W, DS, T), R * DS)
    load_q = make_pair_loader(make_tile_loader(C, D, W, DS, T, ASYNC), C * DS)
    rows_dot = make_dot_rows(TM, TN, t.d4, RG * DS, L * DS)        # Sᵀ = K Qᵀ, dPᵀ = V dOᵀ
    cols_dot = make_dot_cols(TM, TX4, C // 4, RG * PSC, DS, 4 * L)  # dV += Pᵀ dO, dK += dSᵀ Q
    dq_dot = make_dot_cols(TMQ, TX4, R // 4, RG * PSR, DS, 4 * L)   # dQ_i += dS K_j
    store_row, add_row = make_row_store(TX4, L, D)
    fill_keep, (drop_tile, drop_regs) = make_keep_tile(C, R, T), make_drop(TM, TN, RG, L, R, True)
    _check_keep_tile(DROP, R, t)
    block_bits = make_block_bits(TM, TN, RG, L, SPARSE, True)

    def load_step(q, do, lse, delta, q_base, bh, row0, Nq, smem, off, tid):
        """Q_i, dO_i, lse_i and D_i (see _row_stats) to `off`."""
        load_q(q, do, q_base, row0, Nq, smem, off, tid)
        for r in range(tid, C, T):
            row = row0 + r
            lse_r, dlt = _row_stats(lse, delta, bh * Nq + row, row < Nq)
            smem[off + 2 * C * DS + r] = lse_r
            smem[off + 2 * C * DS + C + r] = dlt

    load_step = cuda.jit(device=True, inline=True)(load_step)

    def fa2_dkdv(q, k, v, do, lse, delta, dq_acc, dk, dv, key_lengths, bmask, Nq, Nk, H, sc_hi,
                 sc_lo, scale, msb, msh, nbk, bq, bk, seed_lo, seed_hi, offset, thr,
                 drop_scale):
        """Grid (ceil(Nk/R), H, B), T threads, t.smem_bytes("dkdv", dropout) of dynamic shared
        memory. delta: D from fa2_delta; dq_acc: zeroed float32 (B, H, Nq, d), used if
        atomic_dq; then the options' arguments (nbflash.kernels.options)."""
        smem = cuda.shared.array(0, float32)
        bits = cuda.shared.array(0, uint32)      # the same memory: keep bits at KEEP_OFF
        tid, rg, cg, bh, q_base, k_base, klen, mbase = _coords(L, D, H, Nq, Nk, key_lengths,
                                                                 msb, msh, PAD)
        key0 = cuda.blockIdx.x * R

        load_kv(k, v, k_base, key0, klen, smem, K_OFF, tid)
        dk_acc = cuda.local.array(N_ACC, float32)
        dv_acc = cuda.local.array(N_ACC, float32)
        for x in range(TM * TX):
            dk_acc[x] = ZERO
            dv_acc[x] = ZERO
        st = cuda.local.array(N_S, float32)
        dpt = cuda.local.array(N_S, float32)
        dq_part = cuda.local.array(N_DQ, float32)

        # causal: query blocks whose last row sees no key of this block come first; skip them.
        # Keys past the key length get no step (dK, dV = 0); nor do query blocks that the block
        # mask hides from these keys (Alg. 5)
        first = first_query_block(key0, C, Nq, Nk, CAUSAL)
        n_steps = (Nq + C - 1) // C if key0 < klen else first
        i, all_on = next_tile(first, n_steps, 0, C, key0, R, C, 0, bmask, mbase, nbk, bq, bk,
                              Nq, klen) if SPARSE else (first, True)
        if STAGES == 2 and i < n_steps:
            load_step(q, do, lse, delta, q_base, bh, i * C, Nq, smem, Q_OFF, tid)
            commit_async()
        step = 0
        while i < n_steps:
            row0 = i * C
            i_next, next_all_on = next_tile(i + 1, n_steps, 0, C, key0, R, C, 0, bmask, mbase,
                                            nbk, bq, bk, Nq, klen) if SPARSE else (i + 1, True)
            cuda.syncthreads()   # the previous step has finished with its stage, Pᵀ, dSᵀ, dS
            if STAGES == 2:
                off = Q_OFF + (step % 2) * STAGE
                if i_next < n_steps:
                    load_step(q, do, lse, delta, q_base, bh, i_next * C, Nq, smem,
                              Q_OFF + ((step + 1) % 2) * STAGE, tid)
                    commit_async()
                    wait_async_all_but_1()
                else:
                    wait_async_all()
            else:
                off = Q_OFF
                load_step(q, do, lse, delta, q_base, bh, row0, Nq, smem, off, tid)
            if DROP:   # the forward's keep bits, drawn again (Alg. 4 line 14)
                fill_keep(bits, KEEP_OFF, row0, key0, bh, seed_lo, seed_hi, offset, thr, tid)
            do_off = off + C * DS
            lse_off = off + 2 * C * DS
            cuda.syncthreads()   # Q_i, dO_i, lse_i, D_i (and the keep bits) complete

            for x in range(TM * TN):
                st[x] = ZERO
                dpt[x] = ZERO
            rows_dot(smem, K_OFF + rg * DS, off + cg * DS, st)
            rows_dot(smem, V_OFF + rg * DS, do_off + cg * DS, dpt)
            if DROP:   # dropout: dP ∘ Z / (1-p) enters dS (Alg. 4 line 19) ...
                drop_regs(dpt, bits, KEEP_OFF, rg, cg, drop_scale)
            on = block_bits(all_on, bmask, mbase, nbk, bq, bk, row0, key0, rg, cg, Nq, klen)
            masked = row0 + C > Nq or key0 + R > klen or \
                (CAUSAL and key0 + R - 1 > row0 + Nk - Nq) or on != ALL
            for a in range(TM):
                kr = rg + RG * a                  # key row within the block
                for u in range(TN):
                    qr = cg + L * u               # query row within the block
                    lse_q = smem[lse_off + qr]
                    p, ds = _p_and_ds(st[a * TN + u], dpt[a * TN + u], sc_hi, sc_lo, lse_q,
                                      lse_q * LOG2E_LO, smem[lse_off + C + qr])
                    if masked and not (visible(row0 + qr, key0 + kr, Nq, Nk, klen, CAUSAL)
                                       and bit_on(on, a * TN + u)):
                        p = ZERO
                        ds = ZERO
                    smem[PT_OFF + kr * PSC + qr] = p
                    smem[DST_OFF + kr * PSC + qr] = ds
                    if ATOMIC:
                        smem[DS_OFF + qr * PSR + kr] = ds
            if DROP:   # ... and dV takes P ∘ Z / (1-p) (line 17)
                drop_tile(smem, PT_OFF, PSC, bits, KEEP_OFF, rg, cg, drop_scale)
            cuda.syncthreads()   # Pᵀ, dSᵀ (and dS) complete
            cols_dot(smem, PT_OFF + rg * PSC, do_off + 4 * cg, dv_acc)
            cols_dot(smem, DST_OFF + rg * PSC, off + 4 * cg, dk_acc)
            if ATOMIC:
                for x in range(TMQ * TX):
                    dq_part[x] = ZERO
                dq_dot(smem, DS_OFF + rg * PSR, K_OFF + 4 * cg, dq_part)
                for a in range(TMQ):
                    row = row0 + rg + RG * a
                    if row < Nq:
                        add_row(dq_acc, q_base, row, dq_part, a, cg, scale)
            i, all_on = i_next, next_all_on
            step += 1

        for a in range(TM):   # dK_j = τ Σ_i dS_ijᵀ Q_i, dV_j = Σ_i P_ijᵀ dO_i, written once
            key = key0 + rg + RG * a
            if key < Nk:
                store_row(dk, k_base, key, dk_acc, a, cg, scale)
                store_row(dv, k_base, key, dv_acc, a, cg, ONE)

    return fa2_dkdv


def make_dq(t, causal, features=Features()):
    """The deterministic dQ pass for RegTiles `t` (R queries per block, C keys per step): the
    forward's structure, with dS in place of P̃ and K in place of V."""
    R, C, D, TM, TN, L, RG, T, TX4, TX, DS, W = _layout(t)
    N_S, N_ACC = TM * TN, TM * TX       # local array sizes (compile-time constants)
    PS = t.ps(C)
    CAUSAL = bool(causal)
    DROP, PAD, SPARSE = features
    Q_OFF, DO_OFF = 0, R * DS
    K_OFF = 2 * R * DS
    V_OFF = K_OFF + C * DS
    DS_OFF = V_OFF + C * DS
    LSE_OFF = DS_OFF + R * PS           # lse_i, D_i (R each)
    KEEP_OFF = t.smem_elements("dq")     # dropout's keep bits (uint32)
    load_q = make_pair_loader(make_tile_loader(R, D, W, DS, T), R * DS)
    load_kv = make_pair_loader(make_tile_loader(C, D, W, DS, T), C * DS)
    rows_dot = make_dot_rows(TM, TN, t.d4, RG * DS, L * DS)        # S = Q Kᵀ, dP = dO Vᵀ
    dq_dot = make_dot_cols(TM, TX4, C // 4, RG * PS, DS, 4 * L)     # dQ_i += dS K_j
    store_row = make_row_store(TX4, L, D)[0]
    fill_keep, (_, drop_regs) = make_keep_tile(R, C, T), make_drop(TM, TN, RG, L, C)
    _check_keep_tile(DROP, C, t)
    block_bits = make_block_bits(TM, TN, RG, L, SPARSE)

    def fa2_dq(q, k, v, do, lse, delta, dq, key_lengths, bmask, Nq, Nk, H, sc_hi, sc_lo, scale,
               msb, msh, nbk, bq, bk, seed_lo, seed_hi, offset, thr, drop_scale):
        """Grid (ceil(Nq/R), H, B), T threads, t.smem_bytes("dq", dropout) of dynamic shared
        memory; the options' arguments last (nbflash.kernels.options)."""
        smem = cuda.shared.array(0, float32)
        bits = cuda.shared.array(0, uint32)      # the same memory: keep bits at KEEP_OFF
        tid, rg, cg, bh, q_base, k_base, klen, mbase = _coords(L, D, H, Nq, Nk, key_lengths,
                                                                 msb, msh, PAD)
        row0 = cuda.blockIdx.x * R

        load_q(q, do, q_base, row0, Nq, smem, Q_OFF, tid)
        for r in range(tid, R, T):              # lse_i and D_i, see _row_stats
            row = row0 + r
            lse_r, dlt = _row_stats(lse, delta, bh * Nq + row, row < Nq)
            smem[LSE_OFF + r] = lse_r
            smem[LSE_OFF + R + r] = dlt
        acc = cuda.local.array(N_ACC, float32)
        for x in range(TM * TX):
            acc[x] = ZERO
        s = cuda.local.array(N_S, float32)
        dp = cuda.local.array(N_S, float32)

        for j in range(key_blocks(row0, R, C, Nq, Nk, klen, CAUSAL)):
            col0 = j * C
            any_on, all_on = tile_status(bmask, mbase, nbk, bq, bk, row0, R, col0, C, Nq,
                                         klen) if SPARSE else (True, True)
            if not any_on:
                continue   # the same for every thread of the block
            cuda.syncthreads()
            load_kv(k, v, k_base, col0, klen, smem, K_OFF, tid)
            if DROP:
                fill_keep(bits, KEEP_OFF, row0, col0, bh, seed_lo, seed_hi, offset, thr, tid)
            cuda.syncthreads()
            for x in range(TM * TN):
                s[x] = ZERO
                dp[x] = ZERO
            rows_dot(smem, Q_OFF + rg * DS, K_OFF + cg * DS, s)
            rows_dot(smem, DO_OFF + rg * DS, V_OFF + cg * DS, dp)
            if DROP:   # dropout: dP ∘ Z / (1-p) enters dS
                drop_regs(dp, bits, KEEP_OFF, rg, cg, drop_scale)
            on = block_bits(all_on, bmask, mbase, nbk, bq, bk, row0, col0, rg, cg, Nq, klen)
            masked = col0 + C > klen or (CAUSAL and col0 + C - 1 > row0 + Nk - Nq) or on != ALL
            for a in range(TM):
                row = row0 + rg + RG * a
                lse_r = smem[LSE_OFF + rg + RG * a]
                dlt = smem[LSE_OFF + R + rg + RG * a]
                for u in range(TN):
                    p, ds = _p_and_ds(s[a * TN + u], dp[a * TN + u], sc_hi, sc_lo, lse_r,
                                      lse_r * LOG2E_LO, dlt)
                    if masked and not (visible(row, col0 + cg + L * u, Nq, Nk, klen, CAUSAL)
                                       and bit_on(on, a * TN + u)):
                        ds = ZERO
                    smem[DS_OFF + (rg + RG * a) * PS + cg + L * u] = ds
            cuda.syncthreads()
            dq_dot(smem, DS_OFF + rg * PS, K_OFF + 4 * cg, acc)

        for a in range(TM):
            row = row0 + rg + RG * a
            if row < Nq:
                store_row(dq, q_base, row, acc, a, cg, scale)

    return fa2_dq
