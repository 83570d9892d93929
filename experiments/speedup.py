"""Speed-up over the naive baseline against N (paper Figs. 5-8 style), with dropout and masking.

nbflash.bench at N = 128 ... 16384: 16k tokens per batch (B = 16384/N), H = 16, d = 64, float16,
not causal, forward+backward, in the paper's four variants: no dropout or masking, dropout 0.1
only, key-padding mask only (key lengths from U[N-20, N]), and both. Every point is checked
against the float64 reference with the same options first. The speed-up of an impl is the naive
baseline's median time divided by its own, at the same point; where the naive baseline ran out
of memory there is none (marked). fa1 stops once a point takes longer than GIVE_UP_MS.
"""

from nbflash import bench

from . import common

NAME = "speedup"
GIVE_UP_MS = 1000.0
VARIANTS = ({"dropout": 0.0, "padding": False}, {"dropout": 0.1, "padding": False},
            {"dropout": 0.0, "padding": True}, {"dropout": 0.1, "padding": True})
TITLES = ("no dropout or masking", "dropout 0.1", "key-padding mask", "dropout 0.1 + masking")


def grid():
    return common.sized(
        {"dtypes": ("float16",), "Ns": tuple(2 ** i for i in range(7, 15)), "ds": (64,),
         "tokens": 16384, "hidden": 1024},
        {"dtypes": ("float32",), "Ns": (16,), "ds": (8,), "tokens": 16, "hidden": 16})


def impls():
    """The naive baseline and every nbflash impl (nbflash.impls)."""
    return bench.nbflash_impls()


def measure(fresh=False):
    common.run_bench(NAME, fresh, VARIANTS, impls=impls(), causal=(False,), passes=("fwdbwd",),
                     give_up_ms=common.sized(GIVE_UP_MS, None), **grid())


def speedups(doc, variant):
    """{impl: [(N, naive ms / impl ms)]} in one variant; also {"oom": [N where naive ran out]}."""
    recs = [r for r in doc.get("records", []) if common.in_variant(r, **variant)]
    naive = {r["N"]: r["median_ms"] for r in recs if r["impl"] == "naive" and r["status"] == "ok"}
    out = {"oom": sorted(r["N"] for r in recs if r["impl"] == "naive" and r["status"] == "oom")}
    for r in recs:
        if r["impl"] != "naive" and r["status"] == "ok" and r["N"] in naive:
            out.setdefault(r["impl"], []).append((r["N"], naive[r["N"]] / r["median_ms"]))
    return {k: sorted(v) for k, v in out.items()}


def plot():
    doc = common.load(common.data_path(NAME))
    if not doc or not any(r["status"] == "ok" for r in doc.get("records", [])):
        return None
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(VARIANTS), figsize=(12, 3.6), sharey=True)
    for ax, variant, title in zip(axes, VARIANTS, TITLES):
        sp = speedups(doc, variant)
        for impl, pts in sp.items():
            if impl == "oom" or not pts:
                continue
            st = common.STYLE[impl]
            ax.plot(*zip(*pts), marker=st["marker"], color=st["color"], label=st["label"])
        for n in sp["oom"]:
            ax.axvline(n, color=common.STYLE["naive"]["color"], linestyle=":", linewidth=1)
        if sp["oom"]:
            ax.text(sp["oom"][0], ax.get_ylim()[0], " naive OOM", fontsize=7, rotation=90,
                    va="bottom")
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("sequence length N")
    axes[0].set_ylabel("speed-up over naive (forward + backward)")
    axes[0].legend(fontsize=7)
    p = doc["meta"]["params"]
    return common.save(fig, NAME, f"Speed-up over the naive baseline, {p['tokens']} tokens per "
                                  f"batch, H={p['hidden'] // p['ds'][0]}, d={p['ds'][0]}, "
                                  f"{'/'.join(p['dtypes'])}", doc)
