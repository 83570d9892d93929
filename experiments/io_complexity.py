"""IO complexity (paper Theorem 2): HBM accesses of the fa1 forward against M and against N,
modelled, counted and measured.

Theorem 2: standard attention makes Θ(Nd + N²) HBM accesses, FlashAttention Θ(N²d²M⁻¹) for
on-chip memory M (d <= M <= Nd). Three ways to get the accesses:

- modelled: nbflash.iomodel, the bytes each algorithm moves by its loop structure;
- counted: every global load and store the kernels make, counted in Numba's CUDA simulator
  (nbflash.iomodel.count) at small shapes, without a GPU: `count()`, written to
  figures/data/io_complexity_counted.json. It must equal the model (the tests assert it);
- measured: Nsight Compute on the GPU (experiments/ncu.py) at B = 4, H = 8, d = 64, float16:
  fa1's forward against M at N = 2048, and against N at its default M, with the naive forward
  against N beside it.

The figure draws the Θ forms over the measurements with one constant each, fitted (geometric
mean of measured / form) to the bytes the kernels' instructions move: Θ says nothing about the
constant, only about the shape.
"""

import math
import os
import subprocess
import sys

from nbflash import MODE, bench
from nbflash.kernels.fa1 import tiles as fa1_tiles
from nbflash.iomodel import theorem2_flash as flash_form
from nbflash.iomodel import theorem2_standard as standard_form

from . import common, ncu

NAME = "io_complexity"
COUNTED = "io_complexity_counted"
B, H, D = 4, 8, 64
DTYPE = "float16"
N_FOR_M = 2048
BLOCKS = (4, 8, 16, 24, 32, 40)                  # Bc for the sweep over M (M = 4·d·Bc)
NS = (256, 512, 1024, 2048, 4096)

#: the simulator's points: (impl, pass, B, H, Nq, Nk, d, dtype, causal, M or None)
SIM_POINTS = (
    [("fa1", "fwd", 1, 1, 48, 48, 8, "float32", False, 4 * 8 * bc) for bc in (2, 4, 8)]
    + [("fa1", "fwd", 1, 1, n, n, 8, "float32", False, 4 * 8 * 4) for n in (16, 32, 64)]
    + [("fa1", "bwd", 1, 2, 33, 20, 8, "float16", True, None),
       ("fa2", "fwd", 2, 1, 40, 40, 8, "float32", False, None),
       ("fa2", "fwd", 1, 2, 20, 33, 16, "float16", True, None),
       ("fa2", "bwd", 1, 1, 33, 33, 8, "float32", False, None)])


def gpu_points():
    limit = fa1_tiles.default_M(D, "forward")
    by_m = sorted({min(4 * D * bc, limit) for bc in BLOCKS})
    return ([("fa1", "M", N_FOR_M, M) for M in by_m] + [("fa1", "N", n, None) for n in NS]
            + [("naive", "N", n, None) for n in NS])


def measure(fresh=False):
    if ncu.find() is None:      # before the store: nothing measured, nothing written
        print("ncu not found: the measured HBM traffic needs Nsight Compute", flush=True)
        return
    params = {"B": B, "H": H, "d": D, "dtype": DTYPE, "pass": "fwd", "points": gpu_points()}
    store = common.Store(NAME, params, key=("impl", "sweep", "N", "M"), fresh=fresh,
                         planned=[{"impl": i, "sweep": s, "N": n, "M": m}
                                  for i, s, n, m in gpu_points()])
    for impl, sweep, N, M in gpu_points():
        if store.done(impl=impl, sweep=sweep, N=N, M=M):
            continue
        Mx = M or (fa1_tiles.default_M(D, "forward") if impl == "fa1" else None)
        print(f"{impl} forward N={N} M={Mx}: ncu", flush=True)
        point = {"impl": impl, "sweep": sweep, "N": N, "M": M, "M_used": Mx, "B": B, "H": H,
                 "d": D, "dtype": DTYPE,
                 "blocks": fa1_tiles.block_sizes(Mx, D) if Mx else None,
                 "model": common.model_bytes(impl, "fwd", B, H, N, D, DTYPE,
                                             **({"M": Mx} if impl == "fa1" else {}))}
        try:
            point["ncu"] = ncu.measure({"impl": impl, "pass": "fwd", "B": B, "H": H, "N": N,
                                        "d": D, "dtype": DTYPE, "causal": False, "M": M})
            point["status"] = "ok"
        except Exception as exc:  # noqa: BLE001
            point.update(bench.failure(exc))
        store.add(point)
    store.finish()


# -- counted in the simulator -------------------------------------------------------------------

def count(fresh=False):
    """The simulator's counts (in a child process in simulator mode when this one is not). They
    take under a minute, so every run counts them all again instead of resuming the committed
    file: it is always what the code counts now, and it is replaced only when the count
    finishes. An interrupted count is resumed from its side file
    (io_complexity_counted.partial.json) by the next run; fresh: count everything again
    (setting such a side file aside)."""
    if MODE != "sim":
        env = {**os.environ, "NBFLASH_DEVICE": "sim"}
        subprocess.run([sys.executable, "-m", "experiments.io_complexity",
                        *(["--fresh"] if fresh else [])], check=True, cwd=common.ROOT, env=env)
        return
    import numpy as np  # noqa: PLC0415

    import nbflash  # noqa: PLC0415
    from nbflash import iomodel  # noqa: PLC0415
    from rich.progress import track  # noqa: PLC0415
    # afresh, unless there is an interrupted count to resume (which started afresh itself)
    store = common.Store(COUNTED, {"points": SIM_POINTS}, key=("point",),
                         fresh=fresh or common.unfinished(COUNTED) is None,
                         planned=[{"point": list(pt)} for pt in SIM_POINTS])
    for pt in track(SIM_POINTS, description="counting global loads and stores"):
        if store.done(point=list(pt)):
            continue
        impl, pass_, b, h, nq, nk, d, dtype, causal, M = pt
        rng = np.random.default_rng(0)
        q, do = (rng.standard_normal((b, h, nq, d)).astype(dtype) for _ in range(2))
        k, v = (rng.standard_normal((b, h, nk, d)).astype(dtype) for _ in range(2))
        kw = {"causal": causal, "impl": impl, **({"M": M} if M else {})}
        o, lse = nbflash.attention_forward(q, k, v, **kw)
        with iomodel.count() as c:
            if pass_ == "fwd":
                nbflash.attention_forward(q, k, v, **kw)
            else:
                nbflash.attention_backward(do, q, k, v, o, lse, **kw)
        # the kernels' part of the model: array operations (fa2's float16 dQ conversion) are
        # not kernels, and the counter does not see them
        model = iomodel.hbm_bytes(impl, pass_, b, h, nq, nk, d, dtype, causal=causal,
                                  **({"M": M} if M else {})).kernels_only()
        counted = c.traffic
        store.add({"point": list(pt), "status": "ok", "counted": counted.io._asdict(),
                   "model": model.io._asdict(), "equal": counted == model})
    store.finish()


# -- the figure ---------------------------------------------------------------------------------

def _fit(xs, ys, form):
    """The constant c minimising the squared log error of c·form(x) against y."""
    pairs = [(x, y) for x, y in zip(xs, ys) if y]
    if not pairs:
        return None
    return math.exp(sum(math.log(y / form(x)) for x, y in pairs) / len(pairs))


def _measured(ax, pts, x_of, levels=(("global", "o"), ("l2", "s"), ("dram", "x")), color=None,
              prefix=""):
    for level, marker in levels:
        ys = [common.traffic_gb((p.get("ncu") or {}).get("totals"), level) for p in pts]
        if any(y is not None for y in ys):
            ax.plot([x_of(p) for p in pts], ys, marker=marker, linestyle="none", color=color,
                    label=f"{prefix}{ {'global': 'instructions', 'l2': 'SM↔L2', 'dram': 'DRAM'}[level]} (ncu)")


def plot():
    doc = common.load(common.data_path(NAME))
    counted = common.load(common.data_path(COUNTED))
    pts = [p for p in (doc or {}).get("points", []) if p.get("status") == "ok"]
    if not pts and not counted:
        return None
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.0))
    gb = common.traffic_gb
    fa1_c, naive_c = common.STYLE["fa1"]["color"], common.STYLE["naive"]["color"]
    # (a) against M
    ax = axes[0]
    by_m = sorted((p for p in pts if p["sweep"] == "M"), key=lambda p: p["M_used"])
    if by_m:
        ms = [p["M_used"] for p in by_m]
        ax.plot(ms, [gb(p["model"]) for p in by_m], "-", color=fa1_c, label="model")
        _measured(ax, by_m, lambda p: p["M_used"], color=fa1_c)
        ys = [gb((p.get("ncu") or {}).get("totals"), "global") for p in by_m]
        form = lambda M: B * H * flash_form(N_FOR_M, D, M) / 1e9  # noqa: E731
        c = _fit(ms, ys, form)
        if c:
            ax.plot(ms, [c * form(M) for M in ms], "k--", label=f"{c:.2g}·N²d²/M (fitted)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("on-chip memory M (elements)")
        ax.set_ylabel("HBM accesses (GB)")
        ax.set_title(f"fa1 forward against M, N={N_FOR_M}", fontsize=9)
        ax.legend(fontsize=6)
    # (b) against N
    ax = axes[1]
    for impl, color, form_of, text in (
            ("fa1", fa1_c, lambda n, p: B * H * flash_form(n, D, p["M_used"]) / 1e9, "N²d²/M"),
            ("naive", naive_c, lambda n, p: B * H * standard_form(n, D) / 1e9, "(Nd + N²)")):
        by_n = sorted((p for p in pts if p["sweep"] == "N" and p["impl"] == impl),
                      key=lambda p: p["N"])
        if not by_n:
            continue
        ns = [p["N"] for p in by_n]
        if all(p.get("model") for p in by_n):
            ax.plot(ns, [gb(p["model"]) for p in by_n], "-", color=color,
                    label=f"{impl} model")
        _measured(ax, by_n, lambda p: p["N"], color=color, prefix=f"{impl} ")
        ys = [gb((p.get("ncu") or {}).get("totals"), "global") for p in by_n]
        forms = {p["N"]: form_of(p["N"], p) for p in by_n}
        c = _fit(ns, ys, forms.get)
        if c:
            ax.plot(ns, [c * forms[n] for n in ns], "--", color=color,
                    label=f"{impl}: {c:.2g}·{text} (fitted)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("HBM accesses (GB)")
    ax.set_title("forward against N (fa1 at its default M)", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=5.5)
    # (c) counted against modelled
    ax = axes[2]
    cps = (counted or {}).get("points", [])
    for p in cps:
        impl, pass_ = p["point"][:2]
        st = common.STYLE[impl]
        tot = lambda t: sum(t.values())  # noqa: E731
        ax.plot(tot(p["model"]), tot(p["counted"]), marker=st["marker"] if pass_ == "fwd" else "*",
                color=st["color"], linestyle="none")
    if cps:
        lo = min(sum(p["model"].values()) for p in cps) / 2
        hi = max(sum(p["model"].values()) for p in cps) * 2
        ax.plot([lo, hi], [lo, hi], "k-", linewidth=0.8)
        n_eq = sum(p["equal"] for p in cps)
        ax.set_title(f"simulator: counted = model at {n_eq} of {len(cps)} points", fontsize=9)
    for impl in ("fa1", "fa2"):
        st = common.STYLE[impl]
        ax.plot([], [], marker=st["marker"], color=st["color"], linestyle="none",
                label=f"{impl} forward")
        ax.plot([], [], marker="*", color=st["color"], linestyle="none", label=f"{impl} backward")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("modelled bytes (small shapes)")
    ax.set_ylabel("counted bytes (simulator)")
    ax.legend(fontsize=6)
    note = f"B={B} H={H} d={D} {DTYPE}; (c) in the simulator"
    return common.save(fig, NAME, "HBM accesses: modelled, counted, measured (Theorem 2)",
                       doc or counted, note=note, sources={"(a, b)": doc, "(c)": counted})


if __name__ == "__main__":
    count(fresh="--fresh" in sys.argv)
