"""Runtime against sequence length (paper Fig. 3 left): forward+backward, every impl and peer.

nbflash.bench at N = 128 ... 65536: 16k tokens per batch (B = max(1, 16384/N)), H = 16, d = 64,
float16, not causal, each point checked against the float64 reference first (computed in
chunks of query rows where the N x N matrices would not fit). Twice: plain, and with dropout
0.1 and a key-padding mask (key lengths from U[N-20, N]), as the paper's Fig. 3 does; torch gets
its own dropout and the padding as an attn_mask (its FlashAttention backend takes none). The
naive baseline runs until it runs out of memory (marked); fa1 stops once one of its points takes
longer than GIVE_UP_MS (marked "skipped": it would take minutes per point).
"""

from nbflash import bench

from . import common

NAME = "runtime"
#: an impl's larger N are skipped once a point's median is above this (fa1)
GIVE_UP_MS = 2000.0
VARIANTS = ({"dropout": 0.0, "padding": False}, {"dropout": 0.1, "padding": True})


def grid():
    return common.sized(
        {"dtypes": ("float16",), "Ns": tuple(2 ** i for i in range(7, 17)), "ds": (64,),
         "tokens": 16384, "hidden": 1024},
        {"dtypes": ("float32",), "Ns": (16,), "ds": (8,), "tokens": 16, "hidden": 16})


def impls():
    """Every nbflash impl, and torch's when it runs here."""
    return bench.default_impls()


def measure(fresh=False):
    common.run_bench(NAME, fresh, VARIANTS, impls=impls(), causal=(False,), passes=("fwdbwd",),
                     give_up_ms=common.sized(GIVE_UP_MS, None), **grid())


def series(doc, impl, variant):
    """[(N, ms or None, status)] of an impl in one variant, by N."""
    out = []
    for r in doc.get("records", []):
        if r["impl"] == impl and common.in_variant(r, **variant):
            out.append((r["N"], r["median_ms"] if r["status"] == "ok" else None, r["status"]))
    return sorted(out)


def plot_sweep(doc, ax):
    """Median ms against N, a line per impl and variant (dashed: dropout + padding)."""
    for impl in common.STYLE:
        for variant in VARIANTS:
            pts = series(doc, impl, variant)
            if not pts:
                continue
            st = common.STYLE[impl]
            plain = not variant["padding"]
            ok = [(n, v) for n, v, s in pts if v is not None]
            label = st["label"] + ("" if plain else " + dropout + padding")
            if ok:
                ax.plot(*zip(*ok), marker=st["marker"], color=st["color"],
                        linestyle="-" if plain else "--", label=label,
                        markerfacecolor=st["color"] if plain else "white")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("forward + backward runtime (ms)")


def plot():
    doc = common.load(common.data_path(NAME))
    if not doc or not any(r["status"] == "ok" for r in doc.get("records", [])):
        return None
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(9.0, 4.6))
    plot_sweep(doc, ax)
    common.mark_oom(ax, doc.get("records", []))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    p = doc["meta"]["params"]
    return common.save(fig, NAME, f"Attention forward + backward runtime, {p['tokens']} tokens "
                                  f"per batch (B = max(1, {p['tokens']}/N)), H={p['hidden'] // p['ds'][0]}, "
                                  f"d={p['ds'][0]}, {'/'.join(p['dtypes'])}", doc)

