"""What Algorithms 1 and 4 share: loading a block of rows into shared memory, and deciding
which (i, j) blocks to skip.

Both kernels (nbflash.kernels.fa1.forward, .backward) load K_j, V_j, and Q_i with O_i or dO_i,
with :func:`make_tile_loader`, and skip a block that causal masking, the key length or the block
mask hides entirely with :func:`skip_block` (Algorithm 5, line 8).
"""

from numba import float32

from ..._cuda import cuda
from ..common.masks import block_hidden, tile_status
from ..common.softmax import ZERO


def make_tile_loader(ROWS, D, T):
    """Device function loading rows start .. start+ROWS-1 of two (B, H, n, D) arrays of head
    (b, h) into two (ROWS, >=D) shared tiles as float32, with zeros past row n - 1; the T threads
    of the block share the work, entry e = r*D + x going to thread e mod T."""

    def load_tiles(src1, src2, tile1, tile2, b, h, start, n, tid):
        for e in range(tid, ROWS * D, T):
            r = e // D
            x = e % D
            if start + r < n:
                tile1[r, x] = float32(src1[b, h, start + r, x])
                tile2[r, x] = float32(src2[b, h, start + r, x])
            else:
                tile1[r, x] = ZERO
                tile2[r, x] = ZERO

    return cuda.jit(device=True, inline=True)(load_tiles)


def skip_block(i, j, BR, BC, Nq, Nk, klen, CAUSAL, PAD, SPARSE, bmask, mbase, nbk, bq, bk):
    """(skip, all_on) for block (i, j): skip when the causal mask, the key length or the block
    mask hides all of it (Algorithm 5, line 8); all_on: every mask block of it is on."""
    if CAUSAL and block_hidden(i, j, BR, BC, Nq, Nk):
        return True, True
    if PAD and j * BC >= klen:
        return True, True
    if SPARSE:
        any_on, all_on = tile_status(bmask, mbase, nbk, bq, bk, i * BR, BR, j * BC, BC, Nq,
                                     klen)
        return not any_on, all_on
    return False, True


skip_block = cuda.jit(device=True, inline=True)(skip_block)
