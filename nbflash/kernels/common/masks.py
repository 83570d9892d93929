"""Masking, written once for every kernel family: Algorithm 2's MASK, key padding, the block
mask of block-sparse attention (Algorithm 5), which tiles the kernels may skip, and the walk
over a block's tiles that skips them (:func:`make_tile_walk`).

A key column `col` is visible to query row `row` when both are inside their sequences (col below
the key length `klen` of the row's batch entry: Nk, or key_lengths[b] with a padding mask), if
causal col <= row + Nk - Nq (bottom-right alignment over the full lengths, as in
FlashAttention 2), with a sliding window row + Nk - Nq - left <= col <= row + Nk - Nq + right
(nbflash.kernels.common.options.window_bounds: the kernels' `window` flag, with the causal
mask folded into right), and, with a block mask, the mask block of (row, col) is on. Tiles that
the causal mask, the window or the key length hides entirely, or whose mask blocks are all
off, are skipped by the kernels: nothing is loaded or computed for them. The functions below
say which.
"""

import numpy as np
from numba import int64, uint32, uint64

from ..._cuda import cuda


def visible(row, col, Nq, Nk, klen, causal, window, left, right):
    """MASK of Algorithm 2, the padding mask and the window: is key `col` visible to query
    `row`? (Also false past the ends.)"""
    diag = row + Nk - Nq        # the key on the row's diagonal (bottom-right aligned)
    return row < Nq and col < klen and (not causal or col <= diag) and (
        not window or diag - left <= col <= diag + right)


def band_cuts(row0, rows, col0, cols, Nq, Nk, causal, window, left, right):
    """Does the causal mask or the window hide entries of the tile of rows row0 ..
    row0+rows-1 and keys col0 .. col0+cols-1 (so that its entries must be masked one by one)?
    Tiles they hide entirely are never computed (:func:`key_range`, :func:`query_range`)."""
    diag0 = row0 + Nk - Nq
    return (causal and col0 + cols - 1 > diag0) or (window and (
        col0 + cols - 1 > diag0 + right or col0 < diag0 + rows - 1 - left))


def block_on(bmask, base, nbk, bq, bk, row, col):
    """Is the mask block of (row, col) on? `bmask` is flat (..., n_q_blocks, nbk) uint8, `base`
    the offset of this head's mask, (bq, bk) the block size."""
    return bmask[base + (row // bq) * nbk + col // bk] != 0


def tile_status(bmask, base, nbk, bq, bk, row0, rows, col0, cols, Nq, klen):
    """(any, all) of the mask blocks that rows row0 .. row0+rows-1 and columns col0 ..
    col0+cols-1 (cut at Nq and klen) touch: the tile is skipped when none is on, and needs the
    element mask of :func:`block_on` unless all are on."""
    r1 = min(row0 + rows, Nq) - 1
    c1 = min(col0 + cols, klen) - 1
    if r1 < row0 or c1 < col0:
        return False, False
    any_on = False
    all_on = True
    for i in range(row0 // bq, r1 // bq + 1):
        for j in range(col0 // bk, c1 // bk + 1):
            if bmask[base + i * nbk + j] != 0:
                any_on = True
            else:
                all_on = False
    return any_on, all_on


#: a block_bits word with every bit set: no entry of the tile is hidden by the block mask
ALL = np.uint64(2**64 - 1)


def make_block_bits(TM, TN, RG, L, SPARSE, TRANSPOSED=False):
    """Device function for the block mask inside the fa2 kernels' register tiles: a 64-bit word
    whose bit i·TN + u says whether the mask block of the thread's entry (i, u) of the tile at
    (row0, col0) is on. Entry (i, u) is query row0 + rg + RG·i and key col0 + cg + L·u
    (TRANSPOSED, as in the dK/dV pass: key col0 + rg + RG·i and query row0 + cg + L·u). ALL
    without a block mask (SPARSE false) or where all the tile's blocks are on (`all_on`, from
    :func:`tile_status` or :func:`next_tile`). Computed once per tile, so that the register-tile
    loops only test a bit (divisions by the block size there would keep those loops from being
    unrolled)."""
    assert TM * TN <= 64, "a register tile of more than 64 entries"

    def block_bits(all_on, bmask, base, nbk, bq, bk, row0, col0, rg, cg, Nq, klen):
        if not SPARSE or all_on:
            return ALL
        bits = uint64(0)
        for i in range(TM):
            for u in range(TN):
                row = row0 + (cg + L * u if TRANSPOSED else rg + RG * i)
                col = col0 + (rg + RG * i if TRANSPOSED else cg + L * u)
                if row < Nq and col < klen and block_on(bmask, base, nbk, bq, bk, row, col):
                    bits |= uint64(1) << uint64(i * TN + u)
        return bits

    return cuda.jit(device=True, inline=True)(block_bits)


def bit_on(bits, e):
    """Is bit e of a block_bits word set?"""
    return (bits >> uint64(e)) & uint64(1) != uint64(0)


def next_tile(step, n, row0, rows, col0, cols, d_row, d_col, bmask, base, nbk, bq, bk, Nq,
              klen):
    """(s, all_on): the first step s >= `step` (below n) whose tile, rows row0 + s·d_row ..
    (`rows` of them) and columns col0 + s·d_col .. (`cols`), has a mask block on, and whether
    all of its blocks are; (n, True) if there is none."""
    while step < n:
        any_on, all_on = tile_status(bmask, base, nbk, bq, bk, row0 + step * d_row, rows,
                                     col0 + step * d_col, cols, Nq, klen)
        if any_on:
            return step, all_on
        step += 1
    return n, True


def block_hidden(i, j, Br, Bc, Nq, Nk):
    """True when causal masking hides every entry of block (i, j): its first key lies after the
    last key its last query row may see."""
    last_row = min(i * Br + Br - 1, Nq - 1)
    return j * Bc > last_row + Nk - Nq


def key_range(row0, rows, C, Nq, Nk, klen, causal, window, left, right):
    """(first, end): the key blocks of C keys that the query rows row0 .. row0+rows-1 walk,
    first .. end-1 (none when end <= first): those below the key length klen, with causal
    masking only those up to the last key the last row sees, and with a window only those from
    the first key the first row sees to the last key the last row sees."""
    end = (klen + C - 1) // C
    last_row = min(row0 + rows - 1, Nq - 1)
    if causal:
        last_key = last_row + Nk - Nq
        end = min(end, last_key // C + 1) if last_key >= 0 else 0
    first = 0
    if window:
        last_key = last_row + Nk - Nq + right
        end = min(end, last_key // C + 1) if last_key >= 0 else 0
        first = max(0, row0 + Nk - Nq - left) // C
    return first, end


def mask_base(b, bh, H, msb, msh):
    """The offset of the block mask of query head bh (b*H + h), for batch and head strides
    msb, msh (the dK/dV passes, whose blocks walk the query heads of a key/value head)."""
    return b * msb + (bh - b * H) * msh


def query_range(key0, cols, C, Nq, Nk, causal, window, left, right):
    """(first, end): the query blocks of C rows, first .. end-1, that see any of the keys
    key0 .. key0+cols-1 (none when end <= first): with causal masking the blocks before first
    see none of them, with a window neither do those before first nor those from end on."""
    first = max(0, (key0 - Nk + Nq) // C) if causal else 0
    end = (Nq + C - 1) // C
    if window:
        first = max(first, max(0, key0 - Nk + Nq - right) // C)
        last_row = key0 + cols - 1 - Nk + Nq + left      # the last row that sees key0+cols-1
        end = min(end, last_row // C + 1) if last_row >= 0 else 0
    return first, end


def sees_a_key(row, Nq, Nk, klen, causal, window, left, right, sparse, bmask, base, nbk, bq, bk):
    """Does query `row` see any key at all? Decided by the masks alone (the key length, the causal
    mask, the window, the block mask's row of blocks), never by the scores: a row that sees none
    gets o = 0 and lse = -inf, one whose visible scores are all -inf gets NaN (the non-finite
    rule of nbflash.kernels.common.softmax). The kernels ask only for rows that ended with
    ℓ = 0."""
    last = klen - 1                     # the last key the row may see
    first = 0                           # and the first
    if causal:
        last = min(last, row + Nk - Nq)
    if window:
        last = min(last, row + Nk - Nq + right)
        first = max(first, row + Nk - Nq - left)
    if row >= Nq or last < first:
        return False
    if not sparse:
        return True
    for j in range(first // bk, nbk):
        if j * bk > last:
            break
        if bmask[base + (row // bq) * nbk + j] != 0:
            return True
    return False


visible = cuda.jit(device=True, inline=True)(visible)
band_cuts = cuda.jit(device=True, inline=True)(band_cuts)
sees_a_key = cuda.jit(device=True, inline=True)(sees_a_key)
block_on = cuda.jit(device=True, inline=True)(block_on)
tile_status = cuda.jit(device=True, inline=True)(tile_status)
bit_on = cuda.jit(device=True, inline=True)(bit_on)
next_tile = cuda.jit(device=True, inline=True)(next_tile)
block_hidden = cuda.jit(device=True, inline=True)(block_hidden)
key_range = cuda.jit(device=True, inline=True)(key_range)
query_range = cuda.jit(device=True, inline=True)(query_range)
mask_base = cuda.jit(device=True, inline=True)(mask_base)


def cursor_tile(c, n_steps):
    """(g, i) of cursor c = g·n_steps + i of a dK/dV block's walk over its group's query heads
    (:func:`make_group_walk`): the group's g-th query head and its query tile i. (A 32-bit
    division: B·H and the tile counts are far below 2^32; int64's, with Python's floor and
    overflow checks, costs the kernels registers.)"""
    g = int64(uint32(c) // uint32(n_steps))
    return g, c - g * n_steps


cursor_tile = cuda.jit(device=True, inline=True)(cursor_tile)


def make_group_walk(walk):
    """Device function: the dK/dV passes' walk over the query tiles of every query head of a
    key/value head's group (grouped-query heads), one head after the other, as one walk over
    cursors c = g·n_steps + i (query head hk·G + g, as b*H + h; its query tile i:
    :func:`cursor_tile`), so that a block's pipeline runs on across the heads and its loop
    carries one cursor, as with one head. group_walk(c, first, last, n_steps, G, hk, b, H, msb,
    msh, key0, bmask, nbk, bq, bk, Nq, klen) -> (c', all_on): the first cursor c' >= c whose
    tile the block computes (tiles before `first` and from `last` on, :func:`query_range`, and
    with a block mask its empty ones skipped: `walk`, a :func:`make_tile_walk` over query
    tiles), and whether all its mask blocks are on; (G·n_steps, True) when none is left."""

    def group_walk(c, first, last, n_steps, G, hk, b, H, msb, msh, key0, bmask, nbk, bq, bk,
                   Nq, klen):
        end = G * n_steps
        while c < end:
            g, i = cursor_tile(c, n_steps)
            i, all_on = walk(max(i, first), last, key0, bmask,
                             mask_base(b, hk * G + g, H, msb, msh), nbk, bq, bk, Nq, klen)
            if i < last:
                return g * n_steps + i, all_on
            c = (g + 1) * n_steps
        return end, True

    return cuda.jit(device=True, inline=True)(group_walk)


def make_tile_walk(ROWS, COLS, OVER_KEYS, SPARSE):
    """Device function walking a block's tiles in order, the block mask's empty tiles skipped:
    walk(step, n, at, bmask, mbase, nbk, bq, bk, Nq, klen) -> (s, all_on), the first step
    s >= `step` (below n) to compute and whether all its mask blocks are on (:func:`next_tile`);
    (n, True) when none is left. OVER_KEYS: the block owns query rows at .. at+ROWS-1 and steps
    over key tiles of COLS keys (the forward, the dQ pass); else it owns keys at .. at+COLS-1 and
    steps over query tiles of ROWS rows (the dK/dV pass). Without a block mask (SPARSE false)
    every step is computed: (step, True)."""
    if not SPARSE:
        def walk(step, n, at, bmask, mbase, nbk, bq, bk, Nq, klen):
            return step, True
    elif OVER_KEYS:
        def walk(step, n, at, bmask, mbase, nbk, bq, bk, Nq, klen):
            return next_tile(step, n, at, ROWS, 0, COLS, 0, COLS, bmask, mbase, nbk, bq, bk, Nq,
                             klen)
    else:
        def walk(step, n, at, bmask, mbase, nbk, bq, bk, Nq, klen):
            return next_tile(step, n, 0, ROWS, at, COLS, ROWS, 0, bmask, mbase, nbk, bq, bk, Nq,
                             klen)
    return cuda.jit(device=True, inline=True)(walk)
