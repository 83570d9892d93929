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

from numba import int64, uint32

from ..._cuda import cuda


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


def query_coords(H, G, Nq, Nk, cu, PAD, VARLEN):
    """(bh, b, hk, q0, Nq_b, k0, Nk_b, klen) of the block of a forward or dQ grid (x, G, B·H_kv)
    over query heads grouped by key/value head: query head bh = b·H + h = hk·G + y, key/value
    head hk = b·H_kv + h // G (z), batch entry or sequence b = bh // H (one 32-bit division), its
    rows (seq_rows), and klen, the keys its rows may see (key_lengths[b] with PAD, else Nk_b)."""
    hk = int64(cuda.blockIdx.z)
    bh = hk * G + cuda.blockIdx.y
    b = int64(uint32(bh) // uint32(H))
    q0, nq, k0, nk = seq_rows(cu, b, VARLEN, Nq, Nk)
    klen = min(nk, cu[b]) if PAD else nk
    return bh, b, hk, q0, nq, k0, nk, klen


def key_coords(Nq, Nk, cu, PAD, VARLEN):
    """(b, hk, q0, Nq_b, k0, Nk_b, klen) of the block of a dK/dV grid (x, H_kv, B) over
    key/value heads: hk = b·H_kv + y, its query heads hk·G .. hk·G + G - 1 (as b·H + h)."""
    b = int64(cuda.blockIdx.z)
    q0, nq, k0, nk = seq_rows(cu, b, VARLEN, Nq, Nk)
    klen = min(nk, cu[b]) if PAD else nk
    return b, b * cuda.gridDim.y + cuda.blockIdx.y, q0, nq, k0, nk, klen


seq_rows = cuda.jit(device=True, inline=True)(seq_rows)
head_base = cuda.jit(device=True, inline=True)(head_base)
lse_base = cuda.jit(device=True, inline=True)(lse_base)
query_coords = cuda.jit(device=True, inline=True)(query_coords)
key_coords = cuda.jit(device=True, inline=True)(key_coords)
