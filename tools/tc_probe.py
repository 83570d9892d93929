"""H200 probe for the tc kernels: correctness at one point per config, then CUDA-event timings
of tc's forward and forward+backward against torch SDPA fp16 (default backend and the
FlashAttention-2 backend) on the FlashAttention-2 grid (16k tokens, hidden 2048), and a sweep of
tile configurations. Prints a table and writes JSON to $OUT (or the given path)."""

import json
import os
import sys
import time

import cupy as cp
import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import nbflash
from nbflash import tiling
from nbflash.kernels import launch
from nbflash.kernels.options import NONE


def timeit(fn, reps=20, warm=3):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return float(np.median(ts))


def flops(B, H, N, d, causal, p):
    f = 4 * B * H * N * N * d * (0.5 if causal else 1)
    return f * {"fwd": 1, "fwdbwd": 3.5}[p]


def run_tc(plan, q, k, v, do, p):
    qc, kc, vc, doc = (cp.from_dlpack(x) for x in (q, k, v, do))
    stream = torch.cuda.current_stream().cuda_stream

    def fwd():
        return plan.forward(cp, qc, kc, vc, stream)

    def fb():
        o, lse = plan.forward(cp, qc, kc, vc, stream)
        plan.backward(cp, doc, qc, kc, vc, o, lse, stream)
    return fwd if p == "fwd" else fb


def run_torch(q, k, v, do, causal, p, flash):
    ctx = sdpa_kernel(SDPBackend.FLASH_ATTENTION) if flash else None
    F = torch.nn.functional.scaled_dot_product_attention
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

    def fwd():
        with torch.no_grad():
            return F(q, k, v, is_causal=causal)

    def fb():
        o = F(qg, kg, vg, is_causal=causal)
        o.backward(do)

    fn = fwd if p == "fwd" else fb
    if flash:
        def wrapped():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                fn()
        return wrapped
    return fn


def check(plan, q, k, v, do, causal):
    """max errors of tc vs torch's math in float32 on a small slice (first batch, 2 heads)."""
    qc, kc, vc, doc = (cp.from_dlpack(x) for x in (q, k, v, do))
    stream = torch.cuda.current_stream().cuda_stream
    o, lse = plan.forward(cp, qc, kc, vc, stream)
    dq, dk, dv = plan.backward(cp, doc, qc, kc, vc, o, lse, stream)
    torch.cuda.synchronize()
    sl = (slice(0, 1), slice(0, 2))
    qs, ks, vs, dos = (x[sl].float().requires_grad_() for x in (q, k, v, do))
    with sdpa_kernel(SDPBackend.MATH):
        ro = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
    ro.backward(dos)
    out = {}
    for n, a, b in (("o", o, ro), ("dq", dq, qs.grad), ("dk", dk, ks.grad), ("dv", dv, vs.grad)):
        a = torch.from_dlpack(a)[sl].float()
        out[n] = float((a - b).abs().max() / b.abs().max())
    return out


def main():
    out_dir = os.environ.get("OUT", ".")
    mode = sys.argv[1] if len(sys.argv) > 1 else "grid"
    rows = []
    dev = torch.cuda.get_device_name()
    configs = [None]
    if mode == "sweep":
        fwd = [(4, 64, 2, 1, 2), (8, 64, 2, 2, 1), (4, 64, 3, 1, 2), (8, 64, 2, 1, 1),
               (8, 32, 2, 1, 2)]
        bwd = [(8, 64, 2, 1, 1)] * 5
        configs = list(zip(fwd, bwd))
    Ns = [2048, 4096, 8192, 16384] if mode == "grid" else [8192]
    for d in (64, 128):
        for causal in ((False, True) if mode == "grid" else (False,)):
            for N in Ns:
                B, H = 16384 // N, 2048 // d
                g = torch.Generator(device="cuda").manual_seed(0)
                q, k, v, do = (torch.randn(B, H, N, d, device="cuda", dtype=torch.float16,
                                           generator=g) for _ in range(4))
                for cfg in configs:
                    tiles = None
                    if cfg is not None:
                        (W, C, S, M, RM), (Wb, Cb, Sb, Mb, _) = cfg
                        if (Cb // 16) * (d // 16) % Wb:
                            continue
                        tiles = (("dkdv", tiling.TcTiles(d, Wb, Cb, Sb, Mb)),
                                 ("forward", tiling.TcTiles(d, W, C, S, M, RM)))
                        if tiles[1][1].smem_bytes("forward") > 227 * 1024 or \
                                tiles[0][1].smem_bytes("dkdv") > 227 * 1024:
                            continue
                    plan = launch.tc_plan(B, H, N, N, d, "float16", causal, 1 / d ** 0.5,
                                          tiles=tiles)
                    t0 = time.time()
                    err = check(plan, q, k, v, do, causal)
                    rec = dict(N=N, d=d, causal=causal, B=B, H=H, cfg=cfg, err=err)
                    for p in ("fwd", "fwdbwd"):
                        ms = timeit(run_tc(plan, q, k, v, do, p))
                        rec[f"tc_{p}_ms"] = ms
                        rec[f"tc_{p}_tflops"] = flops(B, H, N, d, causal, p) / ms / 1e9
                    if cfg is None or cfg == configs[0]:
                        for name, flash in (("torch", False), ("torch_flash", True)):
                            for p in ("fwd", "fwdbwd"):
                                ms = timeit(run_torch(q, k, v, do, causal, p, flash))
                                rec[f"{name}_{p}_ms"] = ms
                    rows.append(rec)
                    print(f"d={d} causal={causal:d} N={N:5d} cfg={cfg} err="
                          + ",".join(f"{x:.1e}" for x in err.values())
                          + f" tc fwd {rec['tc_fwd_ms']:.3f} ms {rec['tc_fwd_tflops']:.0f} TF/s"
                          f", fwdbwd {rec['tc_fwdbwd_ms']:.3f} ms "
                          f"{rec['tc_fwdbwd_tflops']:.0f} TF/s"
                          + (f" | vs torch {rec['torch_fwd_ms'] / rec['tc_fwd_ms']:.2f}x /"
                             f" {rec['torch_fwdbwd_ms'] / rec['tc_fwdbwd_ms']:.2f}x;"
                             f" vs flash {rec['torch_flash_fwd_ms'] / rec['tc_fwd_ms']:.2f}x /"
                             f" {rec['torch_flash_fwdbwd_ms'] / rec['tc_fwdbwd_ms']:.2f}x"
                             if 'torch_fwd_ms' in rec else "")
                          + f" ({time.time() - t0:.1f}s)", flush=True)
                    with open(os.path.join(out_dir, f"tc_probe_{mode}.json"), "w") as f:
                        json.dump(dict(gpu=dev, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
