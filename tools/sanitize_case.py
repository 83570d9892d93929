"""Small forward and backward launches of one impl for compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool racecheck python3 tools/sanitize_case.py [fa1|fa2] [options]
Covers ragged lengths in both directions, causal and not, float16 and float32, and a head dim
that is not a power of two. Prints the max error against the float64 reference per case.
`options`: every case with dropout, key padding and a block mask whose 32 x 32 blocks do not
line up with the kernels' tiles (causal only, to keep the run short).
"""

import sys

import numpy as np

import nbflash
from nbflash import naive, sparsity

if nbflash.MODE != "gpu":
    raise SystemExit("compute-sanitizer needs the GPU (NBFLASH_DEVICE=gpu)")
import cupy as cp  # noqa: E402

impl = sys.argv[1] if len(sys.argv) > 1 else "fa1"
with_options = "options" in sys.argv[2:]
rng = np.random.default_rng(0)
for Nq, Nk, d in ((77, 130, 64), (130, 77, 40), (33, 33, 128)):
    for causal in ((True,) if with_options else (False, True)):
        for dtype in (np.float32, np.float16):
            q, k, v, do = (cp.asarray(rng.standard_normal((2, 3, n, d)).astype(dtype))
                           for n in (Nq, Nk, Nk, Nq))
            opts = {}
            if with_options:
                mask = sparsity.random_blocks(sparsity.n_blocks(Nq, 32), sparsity.n_blocks(Nk, 32),
                                              0.6, seed=Nq)
                opts = dict(dropout_p=0.2, seed=Nk, key_lengths=[Nk, max(1, Nk - 40)],
                            block_mask=mask, block_size=32)
            o, lse = nbflash.attention_forward(q, k, v, causal=causal, impl=impl, **opts)
            dq, dk, dv = nbflash.attention_backward(do, q, k, v, o, lse, causal=causal,
                                                    impl=impl, **opts)
            if impl == "fa2":   # the deterministic dQ pass too
                nbflash.attention_backward(do, q, k, v, o, lse, causal=causal, impl=impl,
                                           deterministic=True, **opts)
            if opts.get("dropout_p"):
                opts["keep"] = nbflash.dropout_mask(2, 3, Nq, Nk, 0.2, Nk)
                del opts["seed"]
            ref = naive.attention_forward(q.astype(cp.float64), k.astype(cp.float64),
                                          v.astype(cp.float64), causal=causal, **opts)[0]
            err = float(cp.abs(o.astype(cp.float64) - ref).max())
            print(f"{impl} Nq={Nq} Nk={Nk} d={d} causal={causal} {np.dtype(dtype).name}: "
                  f"max err o {err:.2e}, finite grads "
                  f"{all(bool(cp.isfinite(g).all()) for g in (dq, dk, dv))}")
cp.cuda.runtime.deviceSynchronize()
