"""Host time of each step of an fa2 forward call, at a tiny problem (GPU only): medians of
perf_counter over many calls, synchronising every 50 calls outside the timed region.

    python3 tools/launch_overhead.py
"""

import ctypes
import statistics
import struct
import time

import numpy as np

import nbflash
from nbflash import inputs
from nbflash.kernels import fa2, fastlaunch, launch

import cupy as cp  # noqa: E402  (GPU only)


def median_us(fn, n=2000):
    ts = []
    for i in range(n):
        if i % 50 == 0:
            cp.cuda.get_current_stream().synchronize()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    cp.cuda.get_current_stream().synchronize()
    return statistics.median(ts) * 1e6


q, k, v = (cp.asarray(np.random.standard_normal((1, 1, 128, 64)).astype(np.float32))
           for _ in range(3))
o, lse = nbflash.attention_forward(q, k, v)
t = launch.fa2_tiles("forward", 64)
kern = launch.build_fa2("forward", t, False, "float32")
lib = fastlaunch._driver()
grid = (2, 1, 1)
smem = t.smem_bytes("forward")
values = []
for a in (q, k, v, o, lse):
    values += (0, 0, a.size, a.itemsize, a.data.ptr, a.size, a.itemsize)
values += [128, 128, 1, *fa2.split_scale(0.125)]

plan = launch.fa2_plan(1, 1, 128, 128, 64, "float32", False, 0.125)
bound = plan.fwd          # its parameter buffer, packed once
plan.forward(cp, q, k, v, 0)
func = kern._function(0)
steps = {
    "perf_counter pair": lambda: None,
    "cupy.empty x2": lambda: (cp.empty(q.shape, q.dtype), cp.empty((1, 1, 128), cp.float32)),
    "check_forward": lambda: inputs.check_forward(q, k, v, causal=False, softmax_scale=None,
                                                  impl="fa2"),
    "struct.pack_into": lambda: struct.pack_into(kern._fmt, bound._buf, 0, *values),
    "ctypes cuLaunchKernel": lambda: lib.cuLaunchKernel(func, 2, 1, 1, t.threads, 1, 1, smem,
                                                         0, bound._params, None),
    "Kernel.__call__": lambda: kern(grid, t.threads, smem, 0, (q, k, v, o, lse),
                                    (128, 128, 1, *fa2.split_scale(0.125))),
    "Bound (plan's launch)": lambda: plan.fwd(0, (q, k, v, o, lse)),
    "Fa2Plan.forward": lambda: plan.forward(cp, q, k, v, 0),
    "launch.fa2_forward": lambda: launch.fa2_forward(cp, q, k, v, causal=False, scale=0.125),
    "nbflash.attention_forward": lambda: nbflash.attention_forward(q, k, v),
    "nbflash.attention_backward": lambda: nbflash.attention_backward(q, q, k, v, o, lse),
}
for name, fn in steps.items():
    fn()
    print(f"{name:28s} {median_us(fn):8.1f} us")
raw = cp.RawKernel(r'extern "C" __global__ void nop(float* x) {}', "nop")
print(f"{'cupy RawKernel (1 arg)':28s} {median_us(lambda: raw((1,), (32,), (q,))):8.1f} us")
