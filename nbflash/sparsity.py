"""Block masks for block-sparse FlashAttention (the paper's Algorithm 5).

A block mask is a boolean array over (query block, key block) pairs: with block size
(bq, bk), entry [i, j] says whether queries i·bq .. (i+1)·bq-1 may attend to keys
j·bk .. (j+1)·bk-1 at all; it has shape (ceil(Nq/bq), ceil(Nk/bk)) (or more leading axes for
batch and heads, see nbflash.attention_forward). The kernels skip the tiles whose mask blocks
are all False, loading and computing nothing for them; that is where the paper's IO saving,
Θ(Nd + N²d²M⁻¹s) for a fraction s of non-zero blocks, comes from.

The helpers build the paper's patterns (NumPy arrays; pass them to any impl):

- :func:`butterfly`: the flat block butterfly of Pixelated Butterfly (Chen, Dao et al. 2021),
  which the FlashAttention paper uses for its block-sparse runs: block (i, j) is on when i XOR j
  is 0 or a power of two (its density is (1 + log2 n)/n for n x n blocks);
- :func:`local_global`: a band of `window` blocks either side of the diagonal plus `n_global`
  global blocks (rows and columns that see and are seen by everything), as in Longformer and
  BigBird;
- :func:`random_blocks`: exactly round(density · n_blocks) blocks on, chosen uniformly;
- :func:`expand`: the equivalent element mask, as the naive baseline and the tests use it.
"""

import numpy as np


def n_blocks(N, block):
    """Blocks of `block` positions that cover N positions."""
    return -(-int(N) // int(block))


def butterfly(n_q_blocks, n_k_blocks=None):
    """Flat block butterfly: (i, j) on when i XOR j is 0 or a power of two."""
    n_k_blocks = n_q_blocks if n_k_blocks is None else n_k_blocks
    x = np.arange(n_q_blocks)[:, None] ^ np.arange(n_k_blocks)[None, :]
    return (x & (x - 1)) == 0


def local_global(n_q_blocks, n_k_blocks=None, window=1, n_global=1):
    """|i - j| <= window, or i < n_global, or j < n_global."""
    n_k_blocks = n_q_blocks if n_k_blocks is None else n_k_blocks
    i = np.arange(n_q_blocks)[:, None]
    j = np.arange(n_k_blocks)[None, :]
    return (np.abs(i - j) <= window) | (i < n_global) | (j < n_global)


def random_blocks(n_q_blocks, n_k_blocks, density, seed=0):
    """Exactly round(density · n_q_blocks · n_k_blocks) blocks on, uniformly at random."""
    if not 0 <= density <= 1:
        raise ValueError(f"density must be in [0, 1]; got {density}")
    total = n_q_blocks * n_k_blocks
    mask = np.zeros(total, dtype=bool)
    mask[np.random.default_rng(seed).permutation(total)[:round(density * total)]] = True
    return mask.reshape(n_q_blocks, n_k_blocks)


def density(mask):
    """Fraction of blocks that are on."""
    return float(np.count_nonzero(mask)) / max(1, np.size(mask))


def expand(mask, block_size, Nq, Nk, xp=np, rows=None):
    """The element mask (..., Nq, Nk) of a block mask (..., n_q_blocks, n_k_blocks) at
    block_size = bq = bk or (bq, bk). rows: a slice of the query rows (None: all), to expand
    only those: the result is expand(...)[..., rows, :], without the other rows."""
    bq, bk = (block_size, block_size) if np.ndim(block_size) == 0 else block_size
    mask = xp.asarray(mask, dtype=bool)
    if rows is None:
        return xp.repeat(xp.repeat(mask, bq, axis=-2), bk, axis=-1)[..., :Nq, :Nk]
    r = range(int(Nq))[rows]
    blocks = xp.arange(r.start, r.stop, r.step) // int(bq)    # each row's query block
    return xp.repeat(xp.take(mask, blocks, axis=-2), bk, axis=-1)[..., :Nk]
