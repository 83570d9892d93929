"""The tolerance rule every accuracy check uses (the tests and the benchmark).

After FlashAttention's and PyTorch's test suites: an output's max error against
the float64 reference may be at most FACTORS[name] times the max error of the naive
implementation run in the same dtype on the same inputs, plus a floor of two roundings at the
reference's magnitude, 2·max|fl(fl(ref + 0.3) - 0.3) - ref| in the output dtype, so that a naive
error of exactly zero does not demand bit equality.
"""

import numpy as np

#: factor per output: 2x for o and lse, 3x for dk and dv, 4x for dq
FACTORS = {"o": 2.0, "lse": 2.0, "dq": 4.0, "dk": 3.0, "dv": 3.0}


def errors(out, ref):
    """(max, mean) of |out - ref| in float64 on the host; entries that are -inf in both count 0,
    NaN counts as an infinite error (in the max)."""
    out = out.astype(np.float64)
    same_inf = np.isinf(ref) & (out == ref)
    with np.errstate(invalid="ignore"):  # -inf - -inf where both are -inf: masked just below
        diff = np.where(same_inf, 0.0, np.abs(out - ref))
    return float(np.nan_to_num(diff, nan=np.inf).max()), float(np.nan_to_num(diff).mean())


def floor(ref, dtype):
    """2·max|fl(fl(ref + 0.3) - 0.3) - ref| in `dtype` (finite entries only; "bfloat16" too)."""
    r = ref[np.isfinite(ref)]
    if r.size == 0:
        return 0.0
    if str(dtype) == "bfloat16":
        from .bfloat16 import round_  # noqa: PLC0415
        rt = round_(round_(r + 0.3) - np.float32(0.3))
        return 2.0 * float(np.abs(rt.astype(np.float64) - r).max())
    t = np.dtype(dtype).type
    rt = ((r + 0.3).astype(t) - t(0.3)).astype(t)
    return 2.0 * float(np.abs(rt.astype(np.float64) - r).max())


def allowed(name, naive_err, ref, dtype):
    """The largest max error the rule allows output `name` (in `dtype`)."""
    return FACTORS[name] * naive_err + floor(ref, dtype)
