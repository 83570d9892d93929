"""How fa1's speed depends on threads per block, and on B*H (the grid), on the GPU.

    python3 experiments/fa1_threads.py figures/data/fa1_threads_h200.json
Every configuration is checked against the float64 reference before it is timed (median of 5
CUDA-event timings). The naive CuPy baseline is timed at the same points for the ratio.
"""

import json
import sys

import numpy as np

import nbflash
from nbflash import naive
from nbflash.kernels import launch
from nbflash.measure import time_ms

import cupy as cp  # noqa: E402

rows = []
for B, H, N, d in ((4, 8, 2048, 64), (4, 8, 2048, 128), (16, 32, 1024, 64), (8, 16, 2048, 128)):
    rng = np.random.default_rng(0)
    q, k, v, do = (cp.asarray(rng.standard_normal((B, H, N, d)).astype(np.float32))
                   for _ in range(4))
    r64 = naive.attention_forward(*(x.astype(cp.float64) for x in (q, k, v)))[0]
    t_nf = time_ms(lambda: nbflash.attention_forward(q, k, v, impl="naive"))
    o, lse = nbflash.attention_forward(q, k, v, impl="naive")
    t_nb = time_ms(lambda: nbflash.attention_backward(do, q, k, v, o, lse, impl="naive"))
    del o, lse
    for T in (128, 256, 512):
        launch.DEFAULT_THREADS = T
        o, lse = nbflash.attention_forward(q, k, v, impl="fa1")
        err = float(cp.abs(o.astype(cp.float64) - r64).max())
        assert err < 1e-5, (B, H, N, d, T, err)
        t_f = time_ms(lambda: nbflash.attention_forward(q, k, v, impl="fa1"))
        t_b = time_ms(lambda: nbflash.attention_backward(do, q, k, v, o, lse, impl="fa1"))
        flops = 4 * B * H * N * N * d
        row = dict(B=B, H=H, N=N, d=d, threads=T, err_o=err, fa1_fwd_ms=t_f, fa1_bwd_ms=t_b,
                   naive_fwd_ms=t_nf, naive_bwd_ms=t_nb, fa1_fwd_tflops=flops / t_f / 1e9,
                   fa1_fwdbwd_tflops=3.5 * flops / (t_f + t_b) / 1e9,
                   fwdbwd_vs_naive=(t_f + t_b) / (t_nf + t_nb))
        rows.append(row)
        print(f"B={B} H={H} N={N} d={d} T={T}: err {err:.1e} fa1 fwd {t_f:.1f} ms "
              f"bwd {t_b:.1f} ms ({row['fa1_fwd_tflops']:.2f} / {row['fa1_fwdbwd_tflops']:.2f} "
              f"TFLOP/s), naive fwd {t_nf:.2f} bwd {t_nb:.2f} ms, fa1/naive fwd+bwd "
              f"{row['fwdbwd_vs_naive']:.1f}x", flush=True)
json.dump({"info": nbflash.info(), "rows": rows}, open(sys.argv[1], "w"), indent=1)
