"""Masking, written once for every kernel: Algorithm 2's MASK and the block-level causal skips.

A key column `col` is visible to query row `row` when both are inside their sequences and, if
causal, col <= row + Nk - Nq (bottom-right alignment, as in FlashAttention 2). Blocks that the
causal mask hides entirely are skipped by the kernels; the functions below say which.
"""

from .._cuda import cuda


def visible(row, col, Nq, Nk, causal):
    """MASK of Algorithm 2: is key `col` visible to query `row`? (Also false past the ends.)"""
    return row < Nq and col < Nk and (not causal or col <= row + Nk - Nq)


def block_hidden(i, j, Br, Bc, Nq, Nk):
    """True when causal masking hides every entry of block (i, j): its first key lies after the
    last key its last query row may see."""
    last_row = min(i * Br + Br - 1, Nq - 1)
    return j * Bc > last_row + Nk - Nq


def key_blocks(row0, rows, C, Nq, Nk, causal):
    """How many key blocks of C keys, from the first, the query rows row0 .. row0+rows-1 walk:
    all of them, or with causal masking those up to the last key the last row sees."""
    n = (Nk + C - 1) // C
    if causal:
        last_key = min(row0 + rows - 1, Nq - 1) + Nk - Nq
        n = min(n, last_key // C + 1) if last_key >= 0 else 0
    return n


def first_query_block(key0, C, Nq, Nk, causal):
    """The first query block of C rows that sees any of the keys from key0 on (with causal
    masking the blocks before it see none of them)."""
    return max(0, (key0 - Nk + Nq) // C) if causal else 0


visible = cuda.jit(device=True, inline=True)(visible)
block_hidden = cuda.jit(device=True, inline=True)(block_hidden)
key_blocks = cuda.jit(device=True, inline=True)(key_blocks)
first_query_block = cuda.jit(device=True, inline=True)(first_query_block)
