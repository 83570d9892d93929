"""The argument layout of the kernels with FlashAttention-2's structure: fa2's on CUDA cores and
tc's on tensor cores take the same arguments, so that their plans pack them alike.

Arrays come first, flat (1-D, contiguous) views of the (B, H, N, d) inputs and outputs in the
storage dtype `elem` (tc: 16-bit data as its uint16 bits) and float32 statistics; then sizes
and scales; then the options' arguments (nbflash.kernels.common.options).

The sizes are Nq, Nk, H (query heads) and G, the query heads per key/value head (H / H_kv:
1, or more with grouped-query heads, where q, o, do, lse and D have H heads and k, v, dk, dv
H_kv; query head h reads key/value head h // G). G is a runtime argument, so grouped-query
heads add no compiled variants. After them come the layouts' strides
(nbflash.kernels.common.layouts.kernel_strides), three for the query-shaped arrays (q, o, dO,
dQ) and three for the key-shaped ones (k, v, dK, dV): element (b, h, n, c) of a query-shaped
array is at b·sb + (b·H + h)·sh + n·sn + c. The scales follow (τ log2 e in two parts, and τ
for the backward), then the softcap's two (nbflash.kernels.common.options.softcap_scalars).
"""

from numba import types

from .options import argument_types as _option_types


def kernel_types(name, elem):
    """Numba argument types of kernel `name` ("forward", "delta", "dkdv", "dq", "dq_delta")
    for storage element type `elem` (a Numba type)."""
    io = types.Array(elem, 1, "C")
    f32 = types.Array(types.float32, 1, "C")
    i64, f = types.int64, types.float32
    opt_arrays, opt_scalars = _option_types()
    sizes = (i64,) * 10      # Nq, Nk, H, G, the query side's sb, sh, sn, the key side's
    if name == "forward":    # q, k, v, o, lse, sizes, τ log2 e (hi, lo), softcap (2)
        return (io, io, io, io, f32, *opt_arrays, *sizes, f, f, f, f, *opt_scalars)
    if name == "delta":      # o, do, delta, dq_acc, n_rows, d, zero_dq, N, H, sb, sh, sn
        return (io, io, f32, f32, *(i64,) * 8)
    grads = (f,) * 5         # τ log2 e (hi, lo), τ, softcap (2)
    if name == "dkdv":   # q, k, v, do, lse, delta, dq_acc, dk, dv, sizes, grads
        return (io, io, io, io, f32, f32, f32, io, io, *opt_arrays, *sizes, *grads,
                *opt_scalars)
    if name == "dq":     # q, k, v, do, lse, delta, dq, sizes, grads
        return (io, io, io, io, f32, f32, io, *opt_arrays, *sizes, *grads, *opt_scalars)
    if name == "dq_delta":   # tc's dQ pass, which computes D itself: as "dq" with o after do
        return (io, io, io, io, io, f32, f32, io, *opt_arrays, *sizes, *grads, *opt_scalars)
    raise ValueError(name)
