"""Which register tiles make fa2 fastest on this GPU: a sweep over tile shapes per kernel.

For each kernel (forward, the dK/dV pass with atomic dQ, the deterministic dQ pass) and head dim,
every candidate RegTiles (R rows per block, C per step, tm x tn scores per thread) is first
checked against the naive float32 baseline on a small ragged causal problem, then timed at the
FlashAttention-2 grid's N = 2048 point (16k tokens, hidden 2048), float32, not causal: median of
CUDA-event timings. The compiler's registers and local memory are recorded with each time.
nbflash.tiling.GPU_FA2_TILES holds the winners. Writes figures/data/fa2_tiles_<gpu>.json point by
point (a rerun skips points already there).

    python experiments/fa2_tiles.py [--N 2048] [--out PATH]        (GPU only)
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from nbflash import MODE, info, naive, tiling  # noqa: E402
from nbflash.bench import write_json  # noqa: E402
from nbflash.kernels import launch  # noqa: E402
from nbflash.measure import time_ms  # noqa: E402

CANDIDATES = {
    "forward": {64: [(64, 64, 8, 4), (128, 64, 8, 4), (64, 32, 8, 2), (128, 32, 8, 2),
                     (64, 64, 4, 4), (64, 64, 8, 4, 2), (64, 32, 8, 2, 2), (128, 64, 8, 4, 2)],
                128: [(64, 32, 8, 2), (128, 32, 8, 2), (64, 64, 8, 4), (32, 32, 4, 2),
                      (64, 32, 4, 2), (64, 32, 8, 2, 2), (32, 32, 4, 2, 2), (64, 16, 8, 1, 2),
                      (128, 64, 8, 4)]},
    "dkdv": {64: [(64, 32, 8, 2), (32, 32, 4, 2), (64, 32, 4, 2), (128, 32, 8, 2),
                  (64, 32, 8, 2, 2), (128, 32, 8, 2, 2)],
             128: [(32, 32, 4, 2), (32, 32, 2, 2), (64, 32, 4, 2), (64, 16, 4, 1),
                   (64, 32, 4, 2, 2), (32, 32, 4, 2, 2)]},
    "dq": {64: [(64, 64, 8, 4), (64, 32, 8, 2), (128, 32, 8, 2), (64, 64, 4, 4)],
           128: [(64, 32, 8, 2), (32, 32, 4, 2), (64, 32, 4, 2), (128, 32, 8, 2)]},
}


def _run(cp, kernel, t, q, k, v, do, causal):
    scale = 1.0 / np.sqrt(q.shape[-1])
    if kernel == "forward":
        return launch.fa2_forward(cp, q, k, v, causal=causal, scale=scale, tiles=t)
    o, lse = launch.fa2_forward(cp, q, k, v, causal=causal, scale=scale)
    return launch.fa2_backward(cp, do, q, k, v, o, lse, causal=causal, scale=scale,
                               deterministic=kernel == "dq", tiles={kernel: t})


def _correct(cp, kernel, t, d):
    rng = np.random.default_rng(0)
    shape_q, shape_k = (2, 3, 333, d), (2, 3, 301, d)
    q, do = (cp.asarray(rng.standard_normal(shape_q, dtype=np.float32)) for _ in range(2))
    k, v = (cp.asarray(rng.standard_normal(shape_k, dtype=np.float32)) for _ in range(2))
    got = _run(cp, kernel, t, q, k, v, do, True)
    o, lse = naive.attention_forward(q, k, v, causal=True)
    want = (o, lse) if kernel == "forward" else naive.attention_backward(do, q, k, v, o, lse,
                                                                         causal=True)
    return max(float(cp.abs(a.astype(cp.float32) - b).max() / (cp.abs(b).max() + 1e-30))
               for a, b in zip(got, want) if b.ndim == 4)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--N", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=None)
    ap.add_argument("--kernels", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    args = ap.parse_args()
    if MODE != "gpu":
        sys.exit("fa2_tiles.py times kernels: it needs a GPU")
    import cupy as cp  # noqa: PLC0415
    meta = info()
    out = args.out or os.path.join(os.path.dirname(__file__), "..", "figures", "data",
                                   "fa2_tiles_h200.json")
    data = json.load(open(out)) if os.path.exists(out) else {"meta": meta, "points": []}
    done = {(p["kernel"], p["d"], tuple(p["tiles"])) for p in data["points"]}
    for kernel, by_d in CANDIDATES.items():
        if kernel not in args.kernels:
            continue
        for d, cands in by_d.items():
            B, H, N = 16384 // args.N, 2048 // d, args.N
            rng = np.random.default_rng(1)
            q, k, v, do = (cp.asarray(rng.standard_normal((B, H, N, d), dtype=np.float32))
                           for _ in range(4))
            fwd_flops = 4 * B * H * N * N * d
            for cand in cands:
                if (kernel, d, tuple(cand)) in done:
                    continue
                t = tiling.RegTiles(cand[0], cand[1], d, *cand[2:])
                point = {"kernel": kernel, "d": d, "tiles": list(cand),
                         "threads": t.threads, "smem_bytes": t.smem_bytes(kernel),
                         "B": B, "H": H, "N": N}
                try:
                    point["rel_err"] = _correct(cp, kernel, t, d)
                    ms = time_ms(lambda: _run(cp, kernel, t, q, k, v, do, False),
                                 repeats=args.repeats, warmup=2)
                    name = "forward" if kernel == "forward" else kernel
                    kern = launch.build_fa2(name, t, False, "float32", kernel == "dkdv")
                    point.update(kern.resources())
                    if kernel != "forward":   # the whole backward: minus its forward
                        ms -= time_ms(lambda: launch.fa2_forward(
                            cp, q, k, v, causal=False, scale=d ** -0.5), repeats=args.repeats)
                    flops = fwd_flops * (1 if kernel == "forward" else 2.5)
                    point.update(ms=ms, tflops=flops / ms / 1e9)
                except Exception as exc:  # noqa: BLE001  (recorded, the sweep goes on)
                    point["error"] = f"{type(exc).__name__}: {exc}"[:300]
                data["points"].append(point)
                write_json(out, data)
                print(json.dumps(point), flush=True)
            del q, k, v, do
            cp.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
