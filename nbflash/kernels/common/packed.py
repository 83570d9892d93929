"""Packed variable-length batches (FlashAttention's varlen), on the device side.

A packed batch holds B sequences of different lengths back to back: q is (total_q, H, d), k
and v (total_k, H_kv, d), sequence b's queries the rows cu_q[b] .. cu_q[b+1] - 1 and its keys
cu_k[b] .. cu_k[b+1] - 1 (cu_seqlens, starting at 0). The kernels see it as one (1, H, total,
d) array of either layout (nbflash.kernels.common.layouts) and lse as (1, H, total_q); with the
varlen feature (nbflash.kernels.common.options.Features.varlen) the key_lengths argument holds
the two cu_seqlens interleaved, cu[2b] = cu_q[b] and cu[2b + 1] = cu_k[b] (int32, 2B + 2
entries), and a block's batch index b is a sequence: everything after these functions works on
that sequence alone, as on a batch entry of Nq_b queries and Nk_b keys (its causal mask and
window bottom-right aligned to them, ALiBi's slopes and dropout's counter of b·H + h). The grids
cover the longest sequence (max_seqlen); the blocks past a shorter one's end return at once, so
no work is spent on padding.

Without the feature the same functions give the padded batch's offsets: batch entry b starts at
b·sb + (b·H + h)·sh, its lse at (b·H + h)·Nq.
"""

import os

from numba import int64, uint32

from ..._cuda import cuda

#: 1: tc's causal kernels start their longest blocks first (block_xyz, :func:`ordered`); 0:
#: the hardware's order (NBFLASH_BLOCK_ORDER=0, for A/B measurements)
ORDERED = int(os.environ.get("NBFLASH_BLOCK_ORDER", "1"))


def ordered(causal, d):
    """1 where a tc kernel at head dim d starts its longest blocks first (block_xyz: causal,
    64 < d <= 128, measured at 128), else 0. At d = 64 it gained nothing on the H200 and cost
    the forward, at its 128-register cap, 72 bytes of stack at sm_90; above 128 it has not been
    measured; fa2's kernels keep the hardware's order (their dropout/padding/block-mask
    variants spilled with it)."""
    return ORDERED if causal and 64 < d <= 128 else 0


def seq_rows(cu, b, VARLEN, Nq, Nk):
    """(first query row, queries, first key row, keys) of batch entry or sequence b: with
    VARLEN sequence b's of the packed arrays (cu: the interleaved cu_seqlens), else 0, Nq, 0,
    Nk."""
    if VARLEN:
        q0 = int64(cu[2 * b])
        k0 = int64(cu[2 * b + 1])
        return q0, int64(cu[2 * b + 2]) - q0, k0, int64(cu[2 * b + 3]) - k0
    return int64(0), Nq, int64(0), Nk


def head_base(b, bh, H, sb, sh, sn, row0, VARLEN):
    """Where row 0 of head bh = b·H + h of batch entry (sequence) b is in an array of H heads
    with the layout's strides sb, sh, sn: b·sb + bh·sh, or in a packed array, whose one batch
    entry holds every sequence, h·sh + row0·sn (row0: the sequence's first row)."""
    if VARLEN:
        return (bh - b * H) * sh + row0 * sn
    return b * sb + bh * sh


def lse_base(b, bh, H, Nq, row0, VARLEN):
    """Where head bh's lse (and D) of row 0 of batch entry (sequence) b is: bh·Nq in (B, H, Nq),
    or h·total_q + row0 in a packed (H, total_q) (Nq: the array's rows)."""
    if VARLEN:
        return (bh - b * H) * Nq + row0
    return bh * Nq


def block_xyz(ORDER):
    """This block's grid coordinates (x, y, z): the hardware's (ORDER 0), or the tile index x
    slowest, so that the GPU, which starts blocks in the order of their linear index (x
    fastest), starts every head's tile t before any head's tile t + 1: ORDER = 1 in that order,
    ORDER = -1 from the last tile down. Under the causal mask the blocks' work grows with the
    query tile (the forward, the dQ pass: ORDER -1) or falls with the key tile (the dK/dV pass:
    ORDER 1), so the longest blocks start first and the short ones fill the last wave (LPT
    scheduling, as FlashAttention-3's). ORDER may be a runtime value.

    Measured on the H200 (tc, fp16, B = 4, H = 32, N = 4096, d = 128, causal; 2026-12-02,
    .ab-style A/B in one session): the forward 2.58 -> 2.47 ms, at N = 16384 (B = 1, H = 16)
    4.75-4.90 -> 4.17; the backward with H_kv = 4 10.56-10.89 -> 9.52 (with H_kv = 8 9.84-10.10
    -> 9.64), but with H_kv = H 9.61-9.80 -> 10.10: there the dK/dV pass's consecutive blocks
    share their head's Q and dO in L2 in the hardware's order, so that pass keeps it for
    G = 1."""
    if ORDER == 0:
        return int64(cuda.blockIdx.x), int64(cuda.blockIdx.y), int64(cuda.blockIdx.z)
    # (32-bit arithmetic: a grid has fewer than 2^32 blocks, and a 64-bit division is a call
    # that costs the kernels registers and stack)
    X, Y = uint32(cuda.gridDim.x), uint32(cuda.gridDim.y)
    lin = uint32(cuda.blockIdx.x) + X * (uint32(cuda.blockIdx.y) + Y * uint32(cuda.blockIdx.z))
    heads = Y * uint32(cuda.gridDim.z)
    t = lin // heads
    r = lin - t * heads
    y = r // Y
    return (int64(X - uint32(1) - t) if ORDER < 0 else int64(t)), int64(r - y * Y), int64(y)


def query_coords(H, G, Nq, Nk, cu, PAD, VARLEN, ORDER):
    """(x, bh, b, hk, q0, Nq_b, k0, Nk_b, klen) of the block of a forward or dQ grid
    (x, G, B·H_kv) over query heads grouped by key/value head (its coordinates block_xyz's):
    query tile x, query head bh = b·H + h = hk·G + y, key/value head hk = b·H_kv + h // G (z),
    batch entry or sequence b = bh // H (one 32-bit division), its rows (seq_rows), and klen,
    the keys its rows may see (key_lengths[b] with PAD, else Nk_b)."""
    x, y, hk = block_xyz(ORDER)
    bh = hk * G + y
    b = int64(uint32(bh) // uint32(H))
    q0, nq, k0, nk = seq_rows(cu, b, VARLEN, Nq, Nk)
    klen = min(nk, cu[b]) if PAD else nk
    return x, bh, b, hk, q0, nq, k0, nk, klen


def key_coords(Nq, Nk, cu, PAD, VARLEN, ORDER):
    """(x, b, hk, q0, Nq_b, k0, Nk_b, klen) of the block of a dK/dV grid (x, H_kv, B) over
    key/value heads (block_xyz): key tile x (with its column split), hk = b·H_kv + y, its
    query heads hk·G .. hk·G + G - 1 (as b·H + h)."""
    x, y, b = block_xyz(ORDER)
    q0, nq, k0, nk = seq_rows(cu, b, VARLEN, Nq, Nk)
    klen = min(nk, cu[b]) if PAD else nk
    return x, b, b * cuda.gridDim.y + y, q0, nq, k0, nk, klen


block_xyz = cuda.jit(device=True, inline=True)(block_xyz)
seq_rows = cuda.jit(device=True, inline=True)(seq_rows)
head_base = cuda.jit(device=True, inline=True)(head_base)
lse_base = cuda.jit(device=True, inline=True)(lse_base)
query_coords = cuda.jit(device=True, inline=True)(query_coords)
key_coords = cuda.jit(device=True, inline=True)(key_coords)
