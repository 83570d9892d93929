"""What the tensor-core kernels share: mma fragments and how tiles reach them.

A warp's accumulators are mma fragments (nbflash.kernels.common.warp): lane l holds rows
g = l // 4 and g + 8 and columns 2t, 2t + 1 (t = l % 4) of each 8-column slice, so entry
x = 4·slice + 2·h + e of a fragment array is row g + 8h, column 8·slice + 2t + e. These device
functions move tiles into shared memory (:func:`make_async_rows`, cp.async; K and V streamed
through pipeline stages by :func:`make_kv_stream`), fragments out to global memory
(:func:`make_store_rows`), load and pack A fragments (:func:`make_load_a`,
:func:`make_pack_a`), pair two mma into one 16 x 16 product (:func:`make_mma2`), and mask a
warp's fragments (:func:`make_fragment_mask`).
"""

from numba import float32, uint64

from ..._cuda import cuda
from ..common.masks import block_on, visible
from ..common.packed import head_base, key_coords, lse_base, query_coords
from ..common.primitives import commit_async, copy16_async, make_wait_async
from ..common.warp import split16


def put2(dst, at, word):
    """dst[at], dst[at + 1] = the low and high halves of `word` (16-bit arrays)."""
    lo, hi = split16(word)
    dst[at] = lo
    dst[at + 1] = hi


put2 = cuda.jit(device=True, inline=True)(put2)


def zero_if(z, x):
    """0 where z, else x (a select: x may be NaN, 0 · x would keep it)."""
    return float32(0.0) if z else x


zero_if = cuda.jit(device=True, inline=True)(zero_if)


def make_async_rows(ROWS, D, DP, DS, T):
    """Device function: rows start .. start+ROWS-1 (zeros from row n on) of one head (row 0 at
    flat offset `base`, rows `rs` elements apart: nbflash.kernels.common.layouts) of a flat
    16-bit array into shared memory at `off` with row
    stride DS, DP columns (zeros from column D on), by cp.async in 16-byte pieces; issued, not
    waited for. Where the block's threads cover whole rows (T a multiple of the pieces per
    row, and ROWS of the rows they cover at once), each thread keeps its column and copies
    every (T / pieces)-th row, a loop of a constant trip count that unrolls; otherwise the
    pieces are dealt out one by one."""
    CH = DP // 8                      # 16-byte pieces per shared row
    assert D % 8 == 0 and DP >= D
    RPI = T // CH if T % CH == 0 else 0      # rows the block covers at once
    if RPI and ROWS % RPI == 0:
        ITERS = ROWS // RPI

        def load(src, base, rs, start, n, smem, off, tid):
            r0, x = tid // CH, 8 * (tid % CH)
            col_in = DP == D or x < D
            for i in range(ITERS):
                r = r0 + i * RPI
                inside = start + r < n and col_in
                copy16_async(smem, off + r * DS + x, src,
                             base + (start + r) * rs + x if inside else base, 16 if inside else 0)

        return cuda.jit(device=True, inline=True)(load)

    def load(src, base, rs, start, n, smem, off, tid):
        for e in range(tid, ROWS * CH, T):
            r = e // CH
            x = 8 * (e % CH)
            inside = start + r < n and (DP == D or x < D)
            copy16_async(smem, off + r * DS + x, src,
                         base + (start + r) * rs + x if inside else base, 16 if inside else 0)

    return cuda.jit(device=True, inline=True)(load)


def make_store_rows(D, WIDTH, pack):
    """Device function: the fragments acc[a0:] of one m-tile (16 rows x WIDTH columns of a
    warp, see the module docstring) times scale / d0 (row g) and scale / d1 (row g + 8), as
    16-bit values into rows row0 + g, row0 + g + 8 (those below n), columns col0 .. (those below
    D) of a flat head at `base` whose rows are `rs` elements apart; zeros instead for a row whose `z0` / `z1` is
    true (a row that sees no key)."""
    NV = WIDTH // 8

    def store(dst, base, rs, row0, n, acc, a0, col0, scale, d0, d1, z0, z1, lane):
        g, t = lane // 4, lane % 4
        r0, r1 = row0 + g, row0 + g + 8
        f0, f1 = scale / d0, scale / d1
        # (the two rows written out rather than in a loop: at d = 256 LLVM would leave such a
        # loop rolled and put the fragments in local memory)
        for vt in range(NV):
            col = col0 + 8 * vt
            x = a0 + 4 * vt
            if col < D:
                if r0 < n:
                    put2(dst, base + r0 * rs + col + 2 * t,
                         pack(zero_if(z0, acc[x] * f0), zero_if(z0, acc[x + 1] * f0)))
                if r1 < n:
                    put2(dst, base + r1 * rs + col + 2 * t,
                         pack(zero_if(z1, acc[x + 2] * f1), zero_if(z1, acc[x + 3] * f1)))

    return cuda.jit(device=True, inline=True)(store)


def store_lse_rows(lse, at, row, n, lse0, lse1, lane):
    """lse of rows `row` and row + 8 (those below n) of a warp's m-tile, held by each row's
    four lanes, written once by the first of them at lse[at + row], lse[at + row + 8]."""
    if lane % 4 == 0:
        if row < n:
            lse[at + row] = lse0
        if row + 8 < n:
            lse[at + row + 8] = lse1


store_lse_rows = cuda.jit(device=True, inline=True)(store_lse_rows)


def make_load_a(ldsm):
    """Device function: dst[x:x+4] = the A fragment (16 rows x 16 columns) of a shared tile at
    element `at` (ldmatrix.x4), each word XOR `flip` (0x80008000 negates both halves: the
    forward's -Q for a negative softmax scale; 0 leaves it)."""

    def load_a(dst, x, smem, at, flip):
        a0, a1, a2, a3 = ldsm(smem, at)
        dst[x] = a0 ^ flip
        dst[x + 1] = a1 ^ flip
        dst[x + 2] = a2 ^ flip
        dst[x + 3] = a3 ^ flip

    return cuda.jit(device=True, inline=True)(load_a)


def make_pack_a(pack):
    """Device function: the A fragment (4 words) of 16 rows x 16 columns whose float32 values
    are the score-layout fragments s[x:x+8] of two 8-column slices (see the module docstring:
    the S fragments of two slices are exactly one A fragment), rounded to 16 bits."""

    def pack_a(s, x):
        return (pack(s[x], s[x + 1]), pack(s[x + 2], s[x + 3]), pack(s[x + 4], s[x + 5]),
                pack(s[x + 6], s[x + 7]))

    return cuda.jit(device=True, inline=True)(pack_a)


def make_kv_stream(C, D, DP, DS, T, STAGES, KV_OFF, STAGE, V_IN, walk):
    """Device functions streaming K_j, V_j tiles of C keys through STAGES shared buffers (at
    KV_OFF + s·STAGE, V_j at + V_IN within one) by cp.async, over the key tiles `walk` visits
    (the forward and the dQ pass): start(...) puts the first STAGES - 1 tiles in flight and
    returns the next tile to load; next(..., step) waits until tile `step` is in for every
    thread (so the buffer of step - 1 is free too), issues the next tile into that buffer and
    returns (tile `step`'s buffer, the next tile to load)."""
    load_kv = make_async_rows(C, D, DP, DS, T)
    wait_tile = make_wait_async(STAGES - 2)

    def start(k, v, k_base, ksn, klen, smem, tid, jl, n_blocks, row0, bmask, mbase, nbk, bq,
              bk, Nq):
        for st in range(STAGES - 1):
            if jl < n_blocks:
                load_kv(k, k_base, ksn, jl * C, klen, smem, KV_OFF + st * STAGE, tid)
                load_kv(v, k_base, ksn, jl * C, klen, smem, KV_OFF + st * STAGE + V_IN, tid)
                jl, _ = walk(jl + 1, n_blocks, row0, bmask, mbase, nbk, bq, bk, Nq, klen)
            commit_async()
        return jl

    def next_(k, v, k_base, ksn, klen, smem, tid, jl, n_blocks, row0, bmask, mbase, nbk, bq,
              bk, Nq, step):
        wait_tile()
        cuda.syncthreads()
        buf = KV_OFF + (step % STAGES) * STAGE
        nxt = KV_OFF + ((step + STAGES - 1) % STAGES) * STAGE
        if jl < n_blocks:
            load_kv(k, k_base, ksn, jl * C, klen, smem, nxt, tid)
            load_kv(v, k_base, ksn, jl * C, klen, smem, nxt + V_IN, tid)
            jl, _ = walk(jl + 1, n_blocks, row0, bmask, mbase, nbk, bq, bk, Nq, klen)
        commit_async()
        return buf, jl

    jit = cuda.jit(device=True, inline=True)
    return jit(start), jit(next_)


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


def thread_coords(H, G, Nq, Nk, key_lengths, msb, msh, PAD, VARLEN, ORDER, qsb, qsh, qsn, ksb,
                  ksh, ksn):
    """(tid, warp, lane, bh, klen, mbase, q_base, k_base, Nq_b, Nk_b, lse_at, x) of the calling
    thread of the forward or the dQ pass, whose grid (x, G, B·H_kv) is over query heads grouped
    by key/value head (nbflash.kernels.common.packed.query_coords): query head bh = b*H + h,
    key/value head hk = b*H_kv + h // G; q_base and k_base: where their row 0 is (the layouts'
    strides), lse_at: where their row 0's lse is; Nq_b, Nk_b: the rows of batch entry b (of
    sequence b of a packed batch, VARLEN); x: its query tile (ORDER: packed.block_xyz)."""
    tid = cuda.threadIdx.x
    x, bh, b, hk, q0, nq, k0, nk, klen = query_coords(H, G, Nq, Nk, key_lengths, PAD, VARLEN,
                                                      ORDER)
    return (tid, tid // 32, tid % 32, bh, klen, b * msb + (bh - b * H) * msh,
            head_base(b, bh, H, qsb, qsh, qsn, q0, VARLEN),
            head_base(b, hk, H // G, ksb, ksh, ksn, k0, VARLEN), nq, nk,
            lse_base(b, bh, H, Nq, q0, VARLEN), x)


def kv_coords(Nq, Nk, key_lengths, PAD, VARLEN, ORDER):
    """(tid, warp, lane, b, hk, klen, q0, Nq_b, k0, Nk_b, x) of a thread of a dK/dV block,
    whose grid (x, h_kv, b) is over key/value heads: hk = b*H_kv + h_kv (its query heads are
    hk·G .. hk·G + G - 1, as b*H + h); q0, k0: the first rows of sequence b (packed batches;
    else 0); x: its key tile and column split (ORDER: packed.block_xyz)."""
    tid = cuda.threadIdx.x
    x, b, hk, q0, nq, k0, nk, klen = key_coords(Nq, Nk, key_lengths, PAD, VARLEN, ORDER)
    return tid, tid // 32, tid % 32, b, hk, klen, q0, nq, k0, nk, x


thread_coords = cuda.jit(device=True, inline=True)(thread_coords)
kv_coords = cuda.jit(device=True, inline=True)(kv_coords)


def make_fragment_mask(NT, TRANSPOSED, CAUSAL, SPARSE, WINDOW):
    """Device function: a 64-bit word whose bit x says whether entry x of a warp's score
    fragments (rows r0 + g + 8h, columns c0 + 8·slice + 2t + e) is visible: inside the
    sequences, not hidden by the causal mask or the window (its bounds `left`, `right`), and
    (unless `all_on`) in a mask block that is on.
    TRANSPOSED: rows are keys and columns queries (the dK/dV pass). Computed once per tile that
    needs it, so that the score loops only test bits."""
    assert 4 * NT <= 64

    def mask(r0, c0, lane, Nq, Nk, klen, all_on, bmask, mbase, nbk, bq, bk, left, right):
        g, t = lane // 4, lane % 4
        bits = uint64(0)
        for s in range(NT):
            for h in range(2):
                for e in range(2):
                    a = r0 + g + 8 * h
                    c = c0 + 8 * s + 2 * t + e
                    row, col = (c, a) if TRANSPOSED else (a, c)
                    on = visible(row, col, Nq, Nk, klen, CAUSAL, WINDOW, left, right)
                    if on and SPARSE and not all_on:
                        on = block_on(bmask, mbase, nbk, bq, bk, row, col)
                    if on:
                        bits |= uint64(1) << uint64(4 * s + 2 * h + e)
        return bits

    return cuda.jit(device=True, inline=True)(mask)


def fragment_bit(bits, x):
    return (bits >> uint64(x)) & uint64(1) != uint64(0)


fragment_bit = cuda.jit(device=True, inline=True)(fragment_bit)
