"""Small tc runs for compute-sanitizer (memcheck, racecheck): forward and backward, float16
plain, causal and ragged, with every option, at the GPU tiles; bfloat16 through torch when it
is importable. Prints the max |o - o_naive| so that the run shows it computed something."""

import numpy as np

import nbflash
from nbflash import sparsity

try:
    import cupy as xp
except ImportError:      # the simulator
    xp = np


def one(B, H, Nq, Nk, d, causal, **opts):
    rng = np.random.default_rng(0)
    q, k, v, do = (xp.asarray(rng.standard_normal(s).astype(np.float16)) for s in
                   ((B, H, Nq, d), (B, H, Nk, d), (B, H, Nk, d), (B, H, Nq, d)))
    o, lse = nbflash.attention_forward(q, k, v, causal=causal, impl="tc", **opts)
    nbflash.attention_backward(do, q, k, v, o, lse, causal=causal, impl="tc", **opts)
    ref = nbflash.attention(q, k, v, causal=causal, impl="naive", **opts)
    print(B, H, Nq, Nk, d, causal, sorted(opts), "max |o - naive|",
          float(abs(o.astype(np.float32) - ref.astype(np.float32)).max()), flush=True)


for d in (64, 128):
    one(2, 2, 200, 333, d, True)
    one(2, 2, 333, 200, d, False)
    one(2, 2, 300, 300, d, True, dropout_p=0.2, seed=1, key_lengths=np.array([250, 300]),
        block_mask=sparsity.random_blocks(5, 5, 0.6, seed=3), block_size=64)
try:
    import torch
    q = torch.randn(1, 2, 257, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    from nbflash.torch import attention
    attention(q, q, q, causal=True, impl="tc").sum().backward()
    print("bfloat16 torch ok", float(q.grad.abs().max()))
except ImportError:
    pass
