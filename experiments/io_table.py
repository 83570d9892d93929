"""IO table (paper Fig. 2 left): GFLOPs, HBM reads+writes and runtime of forward+backward.

The paper's setting: GPT-2 medium attention, B = 64, H = 16, N = 1024, d = 64, float16; and the
same at d = 128. For the naive baseline and each nbflash impl, per pass (forward, backward, both):

- GFLOPs: the matrix-product FLOPs the algorithm performs (2·N²·d per N x N x d product per
  head): the naive forward does S = QKᵀ and O = PV, its backward dV, dP, dQ, dK; FlashAttention's
  backward also recomputes S, so its forward+backward does 14 where the naive one does 12.
- HBM traffic: modelled (nbflash.iomodel, from the loop structure) and measured with Nsight
  Compute when it is present (experiments/ncu.py): the bytes the kernels' global-memory
  instructions move, the bytes the SMs move to and from L2, and DRAM bytes.
- runtime: median ms of CUDA-event timings (nbflash.bench), after the outputs were checked
  against the float64 reference.
"""

from nbflash import bench

from . import common, ncu

NAME = "io_table"
PASSES = ("fwd", "bwd", "fwdbwd")


def settings():
    """(B, H, N, d) of each table, and the dtype."""
    return common.sized((((64, 16, 1024, 64), (64, 16, 1024, 128)), "float16"),
                        (((1, 2, 16, 8),), "float32"))
#: N x N x d matrix products per pass (each 2·N²·d FLOPs per head)
PRODUCTS = {"naive": {"fwd": 2, "bwd": 4}, "flash": {"fwd": 2, "bwd": 5}}


def impls():
    """The naive baseline and every nbflash impl (nbflash.impls)."""
    return bench.nbflash_impls()


def gflops(impl, pass_, B, H, N, d):
    products = PRODUCTS["naive" if impl == "naive" else "flash"]
    n = sum(products[p] for p in ("fwd", "bwd") if p in pass_)
    return n * 2.0 * B * H * N * N * d / 1e9


def measure(fresh=False):
    shapes, dtype = settings()
    params = {"settings": shapes, "dtype": dtype, "impls": impls(), "causal": False}
    store = common.Store(NAME, params, key=("impl", "d", "pass"), fresh=fresh,
                         planned=[{"impl": i, "d": d, "pass": p} for _, _, _, d in shapes
                                  for i in impls() for p in PASSES])
    for B, H, N, d in shapes:
        group = None
        for impl in impls():
            if all(store.done(impl=impl, d=d, **{"pass": p}) for p in PASSES):
                continue
            print(f"{impl} d={d}: check and time", flush=True)
            try:
                group = group or bench.Group(dtype, B, H, N, d, False)
                timed = common.check_and_time(group, impl, PASSES)
            except Exception as exc:  # noqa: BLE001
                timed = {p: bench.failure(exc) for p in PASSES}
            counted = {}
            for p in ("fwd", "bwd"):
                if timed[p]["status"] == "ok" and common.on_gpu():
                    print(f"{impl} d={d} {p}: ncu", flush=True)
                    counted[p] = ncu.fields({"impl": impl, "pass": p, "B": B, "H": H, "N": N,
                                             "d": d, "dtype": dtype, "causal": False})
            if all(c.get("ncu") for c in counted.values()) and len(counted) == 2:
                counted["fwdbwd"] = {"ncu": {"totals": common.add_totals(
                    counted["fwd"]["ncu"]["totals"], counted["bwd"]["ncu"]["totals"])}}
            for p in PASSES:
                store.add({"impl": impl, "d": d, "pass": p, "B": B, "H": H, "N": N,
                           "dtype": dtype, "gflops": gflops(impl, p, B, H, N, d),
                           "model": common.model_bytes(impl, p, B, H, N, d, dtype),
                           **timed[p], **counted.get(p, {})})
            bench.free_memory()
        del group
        bench.free_memory()
    store.finish()


def rows(doc):
    """The table's rows: (d, impl, GFLOPs, model GB, DRAM GB, L2 GB, global GB, ms) of
    forward+backward."""
    out = []
    for p in doc["points"]:
        if p["pass"] != "fwdbwd" or p.get("status") != "ok":
            continue
        t = (p.get("ncu") or {}).get("totals", {})
        gb = common.traffic_gb
        out.append((p["d"], p["impl"], p["gflops"], gb(p["model"]), gb(t, "dram"), gb(t, "l2"),
                    gb(t, "global"), p.get("median_ms")))
    return sorted(out, key=lambda r: (r[0], impls().index(r[1]) if r[1] in impls() else 9))


def markdown(doc):
    """The forward+backward table in Markdown (the README's)."""
    lines = ["| d | impl | GFLOPs | HBM R+W model (GB) | DRAM, ncu (GB) | SM↔L2, ncu (GB) | "
             "global instructions, ncu (GB) | runtime (ms) |", "|" + " --- |" * 8]
    f = common.fmt
    for d, impl, gfl, model, dram, l2, glob, ms in rows(doc):
        lines.append(f"| {d} | {impl} | {gfl:.0f} | {f(model)} | {f(dram)} | {f(l2)} | "
                     f"{f(glob)} | {f(ms)} |")
    return "\n".join(lines)


def plot():
    doc = common.load(common.data_path(NAME))
    if not doc or not rows(doc):
        return None
    plt = common.pyplot()
    ds = sorted({r[0] for r in rows(doc)})
    fig, axes = plt.subplots(len(ds), 3, figsize=(10, 3.2 * len(ds)), squeeze=False)
    for row, d in zip(axes, ds):
        rs = [r for r in rows(doc) if r[0] == d]
        names = [r[1] for r in rs]
        colors = [common.STYLE[n]["color"] for n in names]
        row[0].bar(names, [r[2] for r in rs], color=colors)
        row[0].set_ylabel("GFLOPs (fwd + bwd)")
        width = 0.2
        x = range(len(rs))
        for i, (label, col, hatch) in enumerate((("model", 3, "//"), ("global instr.", 6, ""),
                                                 ("SM↔L2", 5, ".."), ("DRAM", 4, "xx"))):
            row[1].bar([j + (i - 1.5) * width for j in x], [r[col] or 0 for r in rs], width,
                       color=colors, hatch=hatch, edgecolor="k", linewidth=0.4, label=label)
        row[1].set_xticks(list(x), names)
        row[1].set_yscale("log")
        row[1].set_ylabel("reads + writes (GB)")
        row[1].legend(fontsize=6, ncol=2)
        row[2].bar(names, [r[7] or 0 for r in rs], color=colors)
        row[2].set_ylabel("runtime (ms)")
        for ax in row:
            ax.set_title(f"d = {d}", fontsize=9)
    B, H, N, _ = doc["meta"]["params"]["settings"][0]
    return common.save(fig, NAME, f"Attention forward + backward, B={B}, H={H}, N={N}, "
                                  f"{doc['meta']['params']['dtype']}: FLOPs, HBM traffic, "
                                  f"runtime", doc)
