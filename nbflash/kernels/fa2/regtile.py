"""Register tiling for the fa2 kernels: where a thread is, shared-memory tile loads and the two
tile products.

Every fa2 kernel keeps its operand tiles in one dynamic shared-memory array of float32, row-major
with padded strides (nbflash.kernels.fa2.tiles.RegTiles), and every thread accumulates a small
tile of the result in registers (:func:`thread_coords` says which):

- :func:`make_dot_rows`: acc[i, t] += Σ_k A[row_i, k] · B[col_t, k] (A Bᵀ, e.g. S = Q Kᵀ). Both
  operands are read along k, four at a time, with 16-byte loads.
- :func:`make_dot_cols`: acc[i, x] += Σ_j A[row_i, j] · B[j, x] (A B, e.g. O += P V): A read
  along j, B along x, both four at a time.

For tm x tn register tiles each step loads tm + tn 16-byte vectors and does 4·tm·tn FMAs.
The loops have compile-time trip counts, so the accumulators and operands stay in registers.
"""

from numba import float32

from ..._cuda import cuda
from ..common.packed import head_base, key_coords, lse_base, query_coords
from ..common.primitives import copy16_async, load4, store4
from ..common.softmax import ZERO


def tile_constants(t):
    """Compile-time constants of the kernels for RegTiles `t`:
    R, C, D, TM, TN, L (lanes), RG (row groups), T (threads), TX4, TX (output columns per
    thread), DS (row stride of d-wide tiles), W (columns loaded per row)."""
    return (t.R, t.C, t.d, t.tm, t.tn, t.lanes, t.row_groups, t.threads, t.tx4, 4 * t.tx4,
            t.ds, max(t.dp, 4 * t.d4))


def thread_coords(L, H, G, Nq, Nk, key_lengths, msb, msh, PAD, VARLEN, ORDER, qsb, qsh, qsn,
                  ksb, ksh, ksn):
    """Where a thread is: (tid, rg, cg, bh, q_base, k_base, klen, mbase, Nq_b, Nk_b, lse_at,
    x), x its block's query tile (ORDER: nbflash.kernels.common.packed.block_xyz).
    Thread tid is lane cg of row group rg of its block's register tiles. The grid (x, G, B·H_kv)
    is over query heads grouped by key/value head (nbflash.kernels.common.packed.query_coords):
    the block works on key/value head hk = b*H_kv + h // G (z), whose k-shaped rows start at
    k_base, and on its query head bh = hk·G + y = b*H + h, whose q-shaped rows start at q_base
    and its lse at lse_at (the layouts' strides: nbflash.kernels.common.layouts). Nq_b, Nk_b:
    the rows of batch entry b (of sequence b of a packed batch, VARLEN); klen: the keys its
    rows may see (key_lengths[b] with PAD, else Nk_b); mbase: the offset of the head's block
    mask (batch and head strides msb, msh)."""
    tid = cuda.threadIdx.x
    x, bh, b, hk, q0, nq, k0, nk, klen = query_coords(H, G, Nq, Nk, key_lengths, PAD, VARLEN,
                                                      ORDER)
    return (tid, tid // L, tid % L, bh, head_base(b, bh, H, qsb, qsh, qsn, q0, VARLEN),
            head_base(b, hk, H // G, ksb, ksh, ksn, k0, VARLEN), klen,
            b * msb + (bh - b * H) * msh, nq, nk, lse_base(b, bh, H, Nq, q0, VARLEN), x)


def kv_coords(L, Nq, Nk, key_lengths, PAD, VARLEN, ORDER):
    """Where a thread of a dK/dV block is: (tid, rg, cg, b, hk, klen, q0, Nq_b, k0, Nk_b, x). The
    grid is (x, h_kv, b) over key/value heads: the block owns key/value head hk = b*H_kv + h_kv
    (its query heads are hk·G .. hk·G + G - 1, as b*H + h); klen as in :func:`thread_coords`;
    q0, k0: the first rows of sequence b (packed batches; else 0); x: its key tile."""
    tid = cuda.threadIdx.x
    x, b, hk, q0, nq, k0, nk, klen = key_coords(Nq, Nk, key_lengths, PAD, VARLEN, ORDER)
    return tid, tid // L, tid % L, b, hk, klen, q0, nq, k0, nk, x


thread_coords = cuda.jit(device=True, inline=True)(thread_coords)
kv_coords = cuda.jit(device=True, inline=True)(kv_coords)


def make_tile_loader(ROWS, D, WIDTH, STRIDE, T, ASYNC=False):
    """Device function: rows start .. start+ROWS-1 of the head whose row 0 is at `base` (rows
    `rs` elements apart: nbflash.kernels.common.layouts) of a flat array into shared memory at `off`, as float32 rows of WIDTH values
    (zeros past column D - 1 and past row n - 1) with row stride STRIDE. Consecutive threads take
    consecutive columns: the global reads coalesce and the shared writes hit distinct banks.
    When D is a multiple of 4 each thread moves 4 columns at a time with vector loads and
    stores (the rows are then 16-byte aligned in both memories). ASYNC (float32 sources, D a
    multiple of 4): the copies are cp.async, issued but not waited for (see primitives)."""
    if D % 4 == 0:
        W4 = WIDTH // 4

        def load_vec(src, base, rs, start, n, smem, off, tid):
            for e in range(tid, ROWS * W4, T):
                r = e // W4
                x = 4 * (e % W4)
                inside = start + r < n and x < D
                if ASYNC:   # zeros where outside (nothing is read; the address must be valid)
                    copy16_async(smem, off + r * STRIDE + x, src,
                                 base + (start + r) * rs + x if inside else base,
                                 16 if inside else 0)
                else:
                    v0 = v1 = v2 = v3 = ZERO
                    if inside:
                        v0, v1, v2, v3 = load4(src, base + (start + r) * rs + x)
                    store4(smem, off + r * STRIDE + x, v0, v1, v2, v3)

        return cuda.jit(device=True, inline=True)(load_vec)
    assert not ASYNC, "asynchronous copies need D % 4 == 0"

    def load(src, base, rs, start, n, smem, off, tid):
        for e in range(tid, ROWS * WIDTH, T):
            r = e // WIDTH
            x = e % WIDTH
            val = ZERO
            if start + r < n and x < D:
                val = float32(src[base + (start + r) * rs + x])
            smem[off + r * STRIDE + x] = val

    return cuda.jit(device=True, inline=True)(load)


def make_pair_loader(load, SECOND):
    """Device function: two arrays' rows with one tile loader, the second tile SECOND floats
    after the first (K_j and V_j; Q_i and dO_i)."""

    def load_pair(src1, src2, base, rs, start, n, smem, off, tid):
        load(src1, base, rs, start, n, smem, off, tid)
        load(src2, base, rs, start, n, smem, off + SECOND, tid)

    return cuda.jit(device=True, inline=True)(load_pair)


def _make_vectors(N, STEP):
    """Device function: dst[4i .. 4i+3] = smem[a + i STEP .. +3] for i < N (16-byte loads)."""

    def vectors(smem, a, dst):
        for i in range(N):
            dst[4 * i], dst[4 * i + 1], dst[4 * i + 2], dst[4 * i + 3] = \
                load4(smem, a + i * STEP)

    return cuda.jit(device=True, inline=True)(vectors)


def make_dot_rows(TM, TN, K4, A_STEP, B_STEP):
    """acc[i*TN + t] += Σ_{k < 4 K4} smem[a + i A_STEP + k] · smem[b + t B_STEP + k]."""

    NA, NB = TM * 4, TN * 4   # local array sizes must be compile-time constants
    a_vectors, b_vectors = _make_vectors(TM, A_STEP), _make_vectors(TN, B_STEP)

    def dot_rows(smem, a, b, acc):
        av = cuda.local.array(NA, float32)
        bv = cuda.local.array(NB, float32)
        for k4 in range(K4):
            a_vectors(smem, a + 4 * k4, av)
            b_vectors(smem, b + 4 * k4, bv)
            for i in range(TM):
                for t in range(TN):
                    s = acc[i * TN + t]
                    for e in range(4):
                        s += av[4 * i + e] * bv[4 * t + e]
                    acc[i * TN + t] = s

    return cuda.jit(device=True, inline=True)(dot_rows)


def make_dot_cols(TM, TX4, J4, A_STEP, B_ROW, B_CHUNK):
    """acc[i*4*TX4 + 4u + e] += Σ_{j < 4 J4} smem[a + i A_STEP + j] · smem[b + j B_ROW + u B_CHUNK + e]
    (b includes the thread's first column)."""

    NA = TM * 4
    a_vectors = _make_vectors(TM, A_STEP)

    def dot_cols(smem, a, b, acc):
        av = cuda.local.array(NA, float32)
        for j4 in range(J4):
            j = 4 * j4
            a_vectors(smem, a + j, av)
            for jj in range(4):
                for u in range(TX4):
                    b0, b1, b2, b3 = load4(smem, b + (j + jj) * B_ROW + u * B_CHUNK)
                    for i in range(TM):
                        p = av[4 * i + jj]
                        base = i * 4 * TX4 + 4 * u
                        acc[base] += p * b0
                        acc[base + 1] += p * b1
                        acc[base + 2] += p * b2
                        acc[base + 3] += p * b3

    return cuda.jit(device=True, inline=True)(dot_cols)


def make_row_store(TX4, L, D):
    """(store_scaled, add_scaled): a thread's slice of one row of an R x D output, held in
    acc[a*4*TX4 + 4u + e] (column u*4*L + 4*cg + e, see nbflash.kernels.fa2.tiles.RegTiles), times
    `factor`, written to (store) or atomically added into (add) dst[base + row*rs + column], for
    the columns below D."""

    def store_scaled(dst, base, rs, row, acc, a, cg, factor):
        for u in range(TX4):
            for e in range(4):
                col = u * 4 * L + 4 * cg + e
                if col < D:
                    dst[base + row * rs + col] = acc[a * 4 * TX4 + 4 * u + e] * factor

    def add_scaled(dst, base, rs, row, acc, a, cg, factor):
        for u in range(TX4):
            for e in range(4):
                col = u * 4 * L + 4 * cg + e
                if col < D:
                    cuda.atomic.add(dst, base + row * rs + col,
                                    acc[a * 4 * TX4 + 4 * u + e] * factor)

    jit = cuda.jit(device=True, inline=True)
    return jit(store_scaled), jit(add_scaled)
