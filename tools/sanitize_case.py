"""Small forward and backward launches of one impl for compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool racecheck python3 tools/sanitize_case.py [fa1|fa2]
Covers ragged lengths in both directions, causal and not, float16 and float32, and a head dim
that is not a power of two. Prints the max error against the float64 reference per case.
"""

import sys

import numpy as np

import nbflash
from nbflash import naive

if nbflash.MODE != "gpu":
    raise SystemExit("compute-sanitizer needs the GPU (NBFLASH_DEVICE=gpu)")
import cupy as cp  # noqa: E402

impl = sys.argv[1] if len(sys.argv) > 1 else "fa1"
rng = np.random.default_rng(0)
for Nq, Nk, d in ((77, 130, 64), (130, 77, 40), (33, 33, 128)):
    for causal in (False, True):
        for dtype in (np.float32, np.float16):
            q, k, v, do = (cp.asarray(rng.standard_normal((2, 3, n, d)).astype(dtype))
                           for n in (Nq, Nk, Nk, Nq))
            o, lse = nbflash.attention_forward(q, k, v, causal=causal, impl=impl)
            dq, dk, dv = nbflash.attention_backward(do, q, k, v, o, lse, causal=causal,
                                                    impl=impl)
            if impl == "fa2":   # the deterministic dQ pass too
                nbflash.attention_backward(do, q, k, v, o, lse, causal=causal, impl=impl,
                                           deterministic=True)
            ref = naive.attention_forward(q.astype(cp.float64), k.astype(cp.float64),
                                          v.astype(cp.float64), causal=causal)[0]
            err = float(cp.abs(o.astype(cp.float64) - ref).max())
            print(f"{impl} Nq={Nq} Nk={Nk} d={d} causal={causal} {np.dtype(dtype).name}: "
                  f"max err o {err:.2e}, finite grads "
                  f"{all(bool(cp.isfinite(g).all()) for g in (dq, dk, dv))}")
cp.cuda.runtime.deviceSynchronize()
