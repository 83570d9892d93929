"""The memory layouts of (B, H, N, d) arrays that the fa2 and tc kernels read and write in place.

An attention call's arrays are indexed (batch, head, row, column) everywhere in nbflash, but
they may lie in memory in one of two orders, both without gaps:

- "bhnd": C-contiguous (B, H, N, d), nbflash's and torch SDPA's layout;
- "bnhd": a (B, H, N, d) view of a C-contiguous (B, N, H, d) array (``x.swapaxes(1, 2)``), the
  layout of a projection's output before the heads are split off, which FlashAttention's
  ``flash_attn_func`` and Hugging Face models hand over.

The kernels take each side's layout as three strides in elements (:func:`kernel_strides`): an
element (b, h, n, c) of an array with H heads is at b·sb + (b·H + h)·sh + n·sn + c. Written
with the flat head index b·H + h, which the kernels already have, only "bnhd" needs sb (it is
0 for "bhnd"). All the query-shaped arrays of a call (q, o, dO, dQ and fa2's float32 dQ
accumulator) share one layout, all the key-shaped ones (k, v, dK, dV) another; the plans
allocate outputs in their side's layout, and nbflash.inputs copies an input that is in neither
layout, or in another than its side's, before any kernel runs.
"""

BHND, BNHD = "bhnd", "bnhd"
LAYOUTS = (BHND, BNHD)


def _c_contiguous(x):
    flags = getattr(x, "flags", None)
    if flags is not None:                 # NumPy, CuPy
        return flags.c_contiguous
    return x.is_contiguous()              # torch


def layout_of(x):
    """"bhnd" or "bnhd" for a 4-D array lying in memory in that order, else None ("bhnd"
    where both hold, as with one head or one row)."""
    if x.ndim != 4:
        return None
    if _c_contiguous(x):
        return BHND
    if _c_contiguous(x.swapaxes(1, 2)):
        return BNHD
    return None


def in_place(x, itemsize, aligned):
    """x's layout where the fa2 and tc kernels read it as it lies, else None: "bhnd", or
    "bnhd" when its rows and heads start at 16-byte boundaries (d·itemsize a multiple of 16,
    and `aligned`: x's first element at one). nbflash.inputs decides with it, and the torch
    ops' fake implementations predict with it."""
    lay = layout_of(x)
    if lay == BNHD and ((x.shape[-1] * itemsize) % 16 or not aligned):
        return None
    return lay


def kernel_strides(layout, H, N, d):
    """(sb, sh, sn): where element (b, h, n, c) of an (B, H, N, d) array in `layout` is,
    b·sb + (b·H + h)·sh + n·sn + c (see the module docstring)."""
    if layout == BHND:
        return 0, N * d, d
    if layout == BNHD:
        return (N - 1) * H * d, d, H * d
    raise ValueError(f"layout {layout!r}: one of {LAYOUTS}")


def empty(xp, layout, shape, dtype):
    """An uninitialised (B, H, N, d) array of `xp` in `layout`."""
    if layout == BHND:
        return xp.empty(shape, dtype)
    B, H, N, d = shape
    return xp.empty((B, N, H, d), dtype).swapaxes(1, 2)


def into(xp, layout, x):
    """x itself when it lies in `layout`, else a copy that does."""
    if layout_of(x) == layout:
        return x
    out = empty(xp, layout, tuple(x.shape), x.dtype)
    out[...] = x
    return out


def storage(x):
    """The 1-D view of x's memory in storage order (the simulator's kernel arguments; x in one
    of the layouts, or any C-contiguous array)."""
    if x.ndim == 4 and not _c_contiguous(x):
        x = x.swapaxes(1, 2)
    return x.reshape(-1)


def padded(xp, x, d):
    """x (..., d0) with zero columns up to d (a new contiguous array), or x itself when it has
    d columns already (FlashAttention's Python layer pads head dims the same way)."""
    if x.shape[-1] == d:
        return x
    out = xp.zeros(tuple(x.shape[:-1]) + (d,), x.dtype)
    out[..., :x.shape[-1]] = x
    return out


def batch_view(x):
    """A packed (total, H, d) array (NumPy, CuPy or torch) as the (1, H, total, d) batch of one
    entry that the kernels read: a view, in layout "bnhd"."""
    return x[None].swapaxes(1, 2)


def unbatch_view(x):
    """The inverse of :func:`batch_view`: (1, H, total, d) -> (total, H, d), a view."""
    return x[0].swapaxes(0, 1)
