"""Block sparsity (paper Fig. 2 right): forward+backward runtime against the fraction of
non-zero blocks.

Block-sparse FlashAttention (the paper's Algorithm 5) skips every tile whose mask blocks are all
zero, so its IO and its time fall with the fraction of non-zero blocks s (Proposition 4:
Θ(Nd + N²d²M⁻¹s)). nbflash.bench runs fa1 and fa2 with nbflash.sparsity.random_blocks masks of
each density (blocks of 64 x 64, the same mask for every impl, batch and head) at N = 4096,
d = 64, B = 4, H = 32, float16, and the dense impls without a mask (the naive baseline and
torch) as reference lines. Every point is checked against the float64 reference with the same
mask first.
"""

from nbflash import bench, impls as registry

from . import common

NAME = "block_sparsity"

def densities():
    return common.sized((0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0), (0.5, 1.0))


def grid():
    return common.sized(
        {"dtypes": ("float16",), "Ns": (4096,), "ds": (64,), "tokens": 4 * 4096,
         "hidden": 32 * 64, "block_size": 64},
        {"dtypes": ("float32",), "Ns": (16,), "ds": (8,), "tokens": 16, "hidden": 8,
         "block_size": 4})


def impls():
    """The impls with kernels, which skip the masked blocks (nbflash.impls)."""
    return tuple(i.name for i in registry.kernels())


def measure(fresh=False):
    g = {**grid(), "causal": (False,), "passes": ("fwdbwd",)}
    dense = bench.default_impls()     # every impl and peer without a mask, for reference lines
    common.run_bench(NAME, fresh, [{"impls": dense},
                                   {"impls": impls(), "densities": densities()}], **g)


def plot():
    doc = common.load(common.data_path(NAME))
    recs = [r for r in (doc or {}).get("records", []) if r.get("status") == "ok"]
    if not recs:
        return None
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    sparse = [r for r in recs if r.get("density") is not None]
    for impl in sorted({r["impl"] for r in sparse}, key=list(common.STYLE).index):
        rs = sorted((r for r in sparse if r["impl"] == impl), key=lambda r: r["block_density"])
        st = common.STYLE[impl]
        ax.plot([r["block_density"] for r in rs], [r["median_ms"] for r in rs],
                marker=st["marker"], color=st["color"], label=f"{st['label']}, block-sparse")
    for r in (r for r in recs if r.get("density") is None):
        st = common.STYLE[r["impl"]]
        ax.axhline(r["median_ms"], color=st["color"], linestyle=":", linewidth=1)
        ax.annotate(f"{st['label']}, dense", (0.0, r["median_ms"]), xytext=(2, 2),
                    textcoords="offset points", fontsize=7, color=st["color"])
    ax.set_xlabel("fraction of non-zero blocks")
    ax.set_ylabel("forward + backward runtime (ms)")
    ax.set_yscale("log")
    ax.set_xlim(0, 1.02)
    ax.legend(loc="lower right")
    r0 = recs[0]
    return common.save(fig, NAME, f"Block-sparse attention, N={r0['N']} d={r0['d']} "
                                  f"B={r0['B']} H={r0['H']} {r0['dtype']}, blocks of "
                                  f"{next((r['block_size'] for r in sparse), '-')}", doc)
