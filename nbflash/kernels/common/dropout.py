"""Dropout inside the kernels: nbflash.rng's Philox generator as device functions.

A kernel never stores the mask: the forward pass (FlashAttention Algorithm 2, line 13: P̃_ij
dropped with probability p and scaled by 1/(1-p)) and the backward pass (Algorithm 4, lines
14-20: the same mask Z_ij regenerated) both call :func:`keep_bits` for the entries they touch.
fa1 calls it entry by entry; fa2 fills a tile of keep bits in shared memory first
(:func:`make_keep_tile`), one Philox call per 8 keys, so that each call serves 8 entries whatever
thread owns them. :func:`dropout_mask` exports the mask itself, drawn by a kernel that calls the
same device function.
"""

from numba import float32, types, uint32, uint64

from ... import rng
from ..._cuda import cuda
from .factory import Spec, kernel

philox4x32 = cuda.jit(device=True, inline=True)(rng.philox4x32)


def _keep2(w, thr):
    """Keep bits of the two 16-bit numbers in word w (bit 0: the low half)."""
    return uint64((w & uint64(0xFFFF)) >= thr) | (uint64((w >> uint64(16)) >= thr) << uint64(1))


_keep2 = cuda.jit(device=True, inline=True)(_keep2)


def keep_bits(seed_lo, seed_hi, bh, offset, row, group, thr):
    """Keep bits of keys 8·group .. 8·group+7 of query `row` of head bh = b*H + h: bit e is 1 when
    key 8·group + e survives dropout (see nbflash.rng for the mapping). thr: rng.threshold(p)."""
    w0, w1, w2, w3 = philox4x32(uint64(group), uint64(row), uint64(bh), uint64(offset),
                                uint64(seed_lo), uint64(seed_hi))
    t = uint64(thr)
    return uint32(_keep2(w0, t) | (_keep2(w1, t) << uint64(2)) | (_keep2(w2, t) << uint64(4))
                  | (_keep2(w3, t) << uint64(6)))


keep_bits = cuda.jit(device=True, inline=True)(keep_bits)


def kept(bits, e):
    """Is bit e of `bits` set?"""
    return (bits >> uint32(e)) & uint32(1) != uint32(0)


kept = cuda.jit(device=True, inline=True)(kept)


def make_keep_tile(ROWS, KEYS, T):
    """Device function: the keep bits of query rows row0 .. row0+ROWS-1 and keys
    key0 .. key0+KEYS-1 (key0 and KEYS multiples of 8) into shared memory `bits` (uint32) at
    `off`, one word of 8 bits per row and group of 8 keys: the bit of (row0 + r, key0 + c) is
    bit c % 8 of word off + r·KEYS/8 + c // 8 (see :func:`tile_kept`). The T threads of the
    block share the Philox calls. (Built for any KEYS; kernels that use it check KEYS.)"""
    G = KEYS // rng.GROUP

    def fill(bits, off, row0, key0, bh, seed_lo, seed_hi, offset, thr, tid):
        g0 = key0 // rng.GROUP
        for e in range(tid, ROWS * G, T):
            bits[off + e] = keep_bits(seed_lo, seed_hi, bh, offset, row0 + e // G, g0 + e % G,
                                      thr)

    return cuda.jit(device=True, inline=True)(fill)


def check_keep_tile(drop, keys, tiles):
    """A ValueError (at build time) when a kernel with dropout would fill keep-bit tiles of a
    number of keys that is not a multiple of 8 (one Philox call serves 8 keys)."""
    if drop and keys % 8:
        raise ValueError(f"{tiles}: dropout needs tiles with a multiple of 8 keys (has {keys})")


def make_tile_kept(KEYS):
    """Device function: is entry (r, c) of a tile filled by make_keep_tile(_, KEYS, _) kept?"""
    G = KEYS // rng.GROUP

    def tile_kept(bits, off, r, c):
        return kept(bits[off + r * G + c // 8], c % 8)

    return cuda.jit(device=True, inline=True)(tile_kept)


def make_drop(TM, TN, RG, L, KEYS, TRANSPOSED=False):
    """Device functions applying dropout to a thread's register tile of scores: entries (rows
    rg + RG·i, columns cg + L·u) of a tile whose keep bits make_keep_tile(_, KEYS, _) drew, with
    query rows and key columns (TRANSPOSED: key rows and query columns, as in the dK/dV pass).
    Kept entries are multiplied by `scale` (1/(1-p)), the others set to 0:

    - drop_tile(smem, off, stride, ...): the thread's entries of a tile in shared memory;
    - drop_regs(regs, ...): a local array of TM x TN values (e.g. dP).

    Each is a loop of its own: inside the kernels' register-tile loops the extra work keeps
    them from being unrolled, and their local arrays would go to local memory."""
    tile_kept = make_tile_kept(KEYS)

    def factor(bits, keep_off, r, c, scale):
        if TRANSPOSED:
            return scale if tile_kept(bits, keep_off, c, r) else float32(0.0)
        return scale if tile_kept(bits, keep_off, r, c) else float32(0.0)

    factor = cuda.jit(device=True, inline=True)(factor)

    def drop_tile(smem, off, stride, bits, keep_off, rg, cg, scale):
        for i in range(TM):
            for u in range(TN):
                r = rg + RG * i
                c = cg + L * u
                smem[off + r * stride + c] *= factor(bits, keep_off, r, c, scale)

    def drop_regs(regs, bits, keep_off, rg, cg, scale):
        for i in range(TM):
            for u in range(TN):
                regs[i * TN + u] *= factor(bits, keep_off, rg + RG * i, cg + L * u, scale)

    return (cuda.jit(device=True, inline=True)(drop_tile),
            cuda.jit(device=True, inline=True)(drop_regs))


def make_mask_kernel():
    """The kernel behind nbflash.dropout_mask: keep (uint8, flat (B, H, Nq, Nk)) = 1 where the
    kernels keep an entry. One thread per row and group of 8 keys; grid over all of them."""

    def keep_mask(keep, n_groups, Nq, Nk, seed_lo, seed_hi, offset, thr):
        e = cuda.grid(1)
        if e < n_groups:
            groups = (Nk + 7) // 8
            g = e % groups
            row = (e // groups) % Nq
            bh = e // (groups * Nq)
            bits = keep_bits(seed_lo, seed_hi, bh, offset, row, g, thr)
            for c in range(8):
                col = g * 8 + c
                if col < Nk:
                    keep[(bh * Nq + row) * Nk + col] = 1 if kept(bits, c) else 0

    return keep_mask


#: threads per block of the mask export
MASK_THREADS = 128


def mask_spec():
    """The mask export's kernel (nbflash.kernels.common.factory.Spec)."""
    return Spec(make_mask_kernel(), (types.Array(types.uint8, 1, "C"),) + (types.int64,) * 7)


def dropout_mask(xp, B, H, Nq, Nk, dropout_p, seed, offset=0, stream=0):
    """The keep mask (bool, (B, H, Nq, Nk)) the kernels draw for these options, drawn by a
    kernel that calls the same device function (:func:`keep_bits`)."""
    keep = xp.empty(B * H * Nq * Nk, xp.uint8)
    n_groups = B * H * Nq * (-(-Nk // rng.GROUP))
    lo, hi = rng.seed_words(seed)
    kernel(mask_spec)((-(-n_groups // MASK_THREADS), 1, 1), MASK_THREADS, 0, stream, (keep,),
                      (n_groups, Nq, Nk, lo, hi, int(offset), rng.threshold(dropout_p)))
    return keep.reshape(B, H, Nq, Nk).astype(bool)
