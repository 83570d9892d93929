"""Where the host time of an fa2 call goes: cProfile over many small calls (GPU only).

    python3 tools/host_profile.py [forward|backward]
"""

import cProfile
import pstats
import sys

import numpy as np

import nbflash

import cupy as cp  # noqa: E402  (GPU only)

which = sys.argv[1] if len(sys.argv) > 1 else "forward"
q, k, v, do = (cp.asarray(np.random.standard_normal((1, 1, 128, 64)).astype(np.float32))
               for _ in range(4))
o, lse = nbflash.attention_forward(q, k, v, impl="fa2")
nbflash.attention_backward(do, q, k, v, o, lse, impl="fa2")
if which == "forward":
    def call():
        nbflash.attention_forward(q, k, v, impl="fa2")
else:
    def call():
        nbflash.attention_backward(do, q, k, v, o, lse, impl="fa2")
prof = cProfile.Profile()
for i in range(400):
    if i % 50 == 0:
        cp.cuda.get_current_stream().synchronize()
    prof.enable()
    call()
    prof.disable()
pstats.Stats(prof).sort_stats("tottime").print_stats(18)
