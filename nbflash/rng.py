"""The dropout generator: Philox4x32-10, a counter-based random number generator.

Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3" (SC 2011); the same
generator torch and FlashAttention use for dropout on the GPU. Its output is a pure function of
a 128-bit counter and a 64-bit key, so every kernel can draw the random number of any entry of
P from the entry's coordinates alone, and the backward pass regenerates exactly the forward's
dropout mask instead of storing it (the FlashAttention paper keeps "the pseudo-random number
generator state R" for this, Algorithms 2 and 4).

How nbflash maps an entry of P to random bits:

- key = seed (64 bits: low word, high word);
- counter = (col // 8, row, b*H + h, offset), for query `row` and key `col` of head (b, h);
- one Philox call gives four 32-bit words, i.e. eight 16-bit numbers, for the eight keys
  8g .. 8g+7 of group g = col // 8: key 8g + e gets half e % 2 (low half first) of word e // 2;
- the entry is kept when its 16-bit number is >= threshold(p) = round(p · 2^16), so it is
  dropped with probability threshold / 2^16 (p to within 2^-17); kept entries are scaled by
  1 / (1 - p).

:func:`philox4x32` is written once: the kernels compile it as a device function
(nbflash.kernels.common.dropout), and :func:`keep_mask` runs it on whole NumPy or CuPy arrays for the
naive baseline, so both draw the same numbers.
"""

import numpy as np

U64 = np.uint64
PHILOX_M0 = U64(0xD2511F53)     # the round multipliers
PHILOX_M1 = U64(0xCD9E8D57)
PHILOX_W0 = U64(0x9E3779B9)     # the key schedule's Weyl increments
PHILOX_W1 = U64(0xBB67AE85)
MASK32 = U64(0xFFFFFFFF)
SHIFT32 = U64(32)
ROUNDS = 10
#: keys per Philox call (four 32-bit words, 16 bits per key)
GROUP = 8
MAX_SEED = 2**64
MAX_OFFSET = 2**32


def philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 of counter (c0, c1, c2, c3) under key (k0, k1): four 32-bit words.

    Every value is a uint64 holding 32 bits (scalars in a kernel, or arrays): the products of
    two 32-bit numbers then fit exactly, and their high and low halves are the rounds' mulhi and
    mullo.
    """
    for _ in range(ROUNDS):
        p0 = PHILOX_M0 * c0
        p1 = PHILOX_M1 * c2
        c0, c1, c2, c3 = ((p1 >> SHIFT32) ^ c1 ^ k0, p1 & MASK32,
                          (p0 >> SHIFT32) ^ c3 ^ k1, p0 & MASK32)
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def threshold(p):
    """The 16-bit threshold of dropout probability p: an entry is dropped when its number is
    below it."""
    return min(int(round(float(p) * 65536)), 65536)


def seed_words(seed):
    """(low, high) 32-bit words of a seed in [0, 2^64)."""
    seed = int(seed)
    return seed & 0xFFFFFFFF, seed >> 32


def _indices(xp, n, part):
    """uint64 indices of `part` (a slice, None: all) of range(n)."""
    r = range(n) if part is None else range(n)[part]
    return xp.arange(r.start, r.stop, r.step, dtype=xp.int64).astype(xp.uint64)


def keep_mask(xp, B, H, Nq, Nk, p, seed, offset=0, rows=None, batches=None, heads=None):
    """Boolean (B, H, Nq, Nk) array of the entries of P that dropout with probability p keeps,
    computed with `xp` (NumPy or CuPy) on whole arrays: what the kernels draw, entry by entry.

    rows, batches, heads: slices of the query rows, batch entries and heads (None: all) to draw
    only that part: the result is keep_mask(...)[batches, heads, rows] of the whole problem
    (B and H stay the whole problem's: the counter holds b·H + h and the absolute row), without
    drawing the rest; nbflash.naive's row chunks and the benchmark's check slice use them."""
    k0, k1 = (U64(w) for w in seed_words(seed))
    groups = -(-Nk // GROUP)
    g = xp.arange(groups, dtype=xp.uint64)[None, None, None, :]
    row = _indices(xp, Nq, rows)[None, None, :, None]
    b = _indices(xp, B, batches)[:, None, None, None]
    h = _indices(xp, H, heads)[None, :, None, None]
    bh = b * U64(H) + h
    shape = (b.shape[0], h.shape[1], row.shape[2], groups)
    words = philox4x32(xp.broadcast_to(g, shape), xp.broadcast_to(row, shape),
                       xp.broadcast_to(bh, shape), xp.full(shape, offset, dtype=xp.uint64),
                       k0, k1)
    halves = []
    for w in words:
        halves += [w & U64(0xFFFF), w >> U64(16)]
    numbers = xp.stack(halves, axis=-1).reshape(*shape[:3], groups * GROUP)[..., :Nk]
    return numbers >= U64(threshold(p))
