"""One tc forward and backward at N = 4096 (B = 4, H = 32, float16) for Nsight Compute:
    ncu --section SpeedOfLight --section WarpStateStats -k regex:tc_ python3 tools/tc_ncu.py D"""

import sys

import cupy as cp
import numpy as np

from nbflash.kernels import launch

d = int(sys.argv[1]) if len(sys.argv) > 1 else 64
B, H, N = 4, 2048 // d, 4096
rng = np.random.default_rng(0)
q, k, v, do = (cp.asarray(rng.standard_normal((B, H, N, d)).astype(np.float16)) for _ in range(4))
plan = launch.tc_plan(B, H, N, N, d, "float16", False, d ** -0.5)
o, lse = plan.forward(cp, q, k, v, 0)
plan.backward(cp, do, q, k, v, o, lse, 0)
cp.cuda.runtime.deviceSynchronize()
print("done")
