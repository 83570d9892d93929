"""bfloat16 on the host, as bit patterns: NumPy has no bfloat16 type of its own, and numba-cuda
has no bfloat16 arrays, so the kernels hold bfloat16 data as uint16 bits (the upper half of a
float32).

Callers pass bfloat16 in any of three forms (nbflash.inputs): torch.bfloat16 tensors,
ml_dtypes.bfloat16 arrays (NumPy; CuPy versions that take ml_dtypes), or uint16 arrays of the
bits (this module makes and reads them). Each reaches the kernels as its uint16 view, without a
copy, and the results come back in the form that went in. ml_dtypes is optional: nbflash tells a
bfloat16 dtype by its name and never imports ml_dtypes."""

import numpy as np


def is_bfloat16(dtype):
    """Is `dtype` a 2-byte NumPy dtype named bfloat16 (ml_dtypes.bfloat16's)?"""
    return getattr(dtype, "name", None) == "bfloat16" and getattr(dtype, "itemsize", 0) == 2


def bits(x):
    """Float array (ml_dtypes.bfloat16 too) -> bfloat16 bits (uint16), rounded to nearest even;
    NaN stays NaN."""
    f = np.ascontiguousarray(x, dtype=np.float32)
    u = f.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(f), np.uint16(0x7FC0), r)


def values(b):
    """bfloat16 bits (uint16 array) or an ml_dtypes.bfloat16 array -> float32."""
    b = np.asarray(b)
    b = b.view(np.uint16) if is_bfloat16(b.dtype) else b.astype(np.uint16, copy=False)
    return (b.astype(np.uint32) << 16).view(np.float32)


def round_(x):
    """x rounded to bfloat16, as float32."""
    return values(bits(x))
