"""Memory against sequence length (paper Fig. 3 right): peak device memory of forward+backward.

B = 1, H = 16, d = 64, float16, N = 256 ... 65536. For each impl and peer, the peak of the
device memory allocated during one forward and one backward (their outputs o, lse, dq, dk, dv
included; the inputs q, k, v, dO allocated before, not): for nbflash, what CuPy's memory pool
hands out (nbflash.bench.peak_memory); for torch, torch.cuda.max_memory_allocated above what
was allocated before. The naive baseline materialises S, P, dP and dS (N x N per head) and runs
until it runs out of memory, which is recorded ("oom") and marked; FlashAttention needs O(N).
fa1 stops after a call that took longer than GIVE_UP_S ("skipped"). The outputs are not checked
here: the runtime experiment checks the same impls at the same N against the float64 reference.
"""

import time
from contextlib import nullcontext

import numpy as np

from nbflash import bench

from . import common

NAME = "memory"
GIVE_UP_S = 20.0


def config():
    return common.sized({"B": 1, "H": 16, "d": 64, "dtype": "float16",
                         "Ns": tuple(2 ** i for i in range(8, 17))},
                        {"B": 1, "H": 2, "d": 8, "dtype": "float32", "Ns": (16,)})


def impls():
    """Every nbflash impl, and torch's when it runs here."""
    return bench.default_impls()


def _nbflash_peak(impl, q, k, v, do):
    import nbflash  # noqa: PLC0415
    with bench.peak_memory() as peak:
        o, lse = nbflash.attention_forward(q, k, v, impl=impl)
        grads = nbflash.attention_backward(do, q, k, v, o, lse, impl=impl)
        bench.sync()
        del o, lse, grads
    return peak["bytes"]


def _torch_peak(impl, q, k, v, do):
    import torch  # noqa: PLC0415
    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415
    q, k, v = (torch.from_dlpack(x).detach().requires_grad_() for x in (q, k, v))
    do = torch.from_dlpack(do)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    # torch-flash: forced onto the FlashAttention backend; torch: torch's own choice
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION) if impl == "torch-flash" else nullcontext():
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        o.backward(do)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del o
    return peak


def measure(fresh=False):
    c = config()
    store = common.Store(NAME, {**c, "impls": impls(), "give_up_s": GIVE_UP_S},
                         key=("impl", "N"), fresh=fresh,
                         planned=[{"impl": i, "N": N} for N in c["Ns"] for i in impls()])
    xp = bench.xp()
    slow = {}
    for N in c["Ns"]:
        shape = (c["B"], c["H"], N, c["d"])
        q = k = v = do = None
        for impl in impls():
            if store.done(impl=impl, N=N):
                continue
            point = {"impl": impl, "N": N, **{x: c[x] for x in ("B", "H", "d", "dtype")}}
            if impl in slow:
                store.add({**point, "status": "skipped", "error": slow[impl]})
                continue
            print(f"{impl} N={N}", flush=True)
            try:
                if q is None:
                    rng = xp.random.default_rng(N)
                    q, k, v, do = (rng.standard_normal(shape, dtype=np.float32)
                                   .astype(c["dtype"]) for _ in range(4))
                t0 = time.perf_counter()
                fn = _torch_peak if impl.startswith("torch") else _nbflash_peak
                peak = fn(impl, q, k, v, do)
                seconds = time.perf_counter() - t0
                point.update(status="ok", peak_bytes=int(peak), seconds=seconds,
                             input_bytes=4 * int(np.prod(shape)) * np.dtype(c["dtype"]).itemsize)
                if seconds > GIVE_UP_S:
                    slow[impl] = f"one call at N={N} took {seconds:.0f} s"
            except Exception as exc:  # noqa: BLE001
                point.update(bench.failure(exc))
            store.add(point)
            bench.free_memory()
        del q, k, v, do
        bench.free_memory(collect=True)
    store.finish()


def plot():
    doc = common.load(common.data_path(NAME))
    pts = [p for p in (doc or {}).get("points", [])]
    if not any(p["status"] == "ok" for p in pts):
        return None
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    for impl, st in common.STYLE.items():
        ok = sorted((p["N"], p["peak_bytes"] / 2 ** 30) for p in pts
                    if p["impl"] == impl and p["status"] == "ok")
        if ok:
            ax.plot(*zip(*ok), marker=st["marker"], color=st["color"], label=st["label"])
    common.mark_oom(ax, pts)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("peak memory of forward + backward (GiB)")
    ax.legend(fontsize=7)
    m = doc["meta"]["params"]
    return common.save(fig, NAME, f"Attention memory, B={m['B']} H={m['H']} d={m['d']} "
                                  f"{m['dtype']} (inputs not counted)", doc)
