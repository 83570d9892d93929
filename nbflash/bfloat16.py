"""bfloat16 on the host, as bit patterns: NumPy has no bfloat16 type, and numba-cuda has no
bfloat16 arrays, so nbflash holds bfloat16 data as uint16 bits (the upper half of a float32).
torch bfloat16 tensors reach the kernels that way (nbflash.inputs)."""

import numpy as np


def bits(x):
    """Float array -> bfloat16 bits (uint16), rounded to nearest even; NaN stays NaN."""
    f = np.ascontiguousarray(x, dtype=np.float32)
    u = f.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(f), np.uint16(0x7FC0), r)


def values(b):
    """bfloat16 bits (uint16 array) -> float32."""
    return (np.asarray(b, np.uint16).astype(np.uint32) << 16).view(np.float32)


def round_(x):
    """x rounded to bfloat16, as float32."""
    return values(bits(x))
