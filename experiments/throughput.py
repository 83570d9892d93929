"""Throughput (FlashAttention-2 Figs. 4-6 style): TFLOP/s bars from the benchmark's data.

The data is nbflash.bench's FlashAttention-2 grid on this GPU (figures/data/bench_<gpu>.json:
16k tokens, hidden 2048, N = 512 ... 16k, d = 64 and 128, causal and not; forward, backward and
forward+backward). On a GPU, `measure` runs the benchmark into that file, resuming: only the
points not there yet are measured (--fresh measures them all again). The figure has one row per
pass and one column per (d, causal), bars per N for each impl and dtype measured;
figures/data/throughput.json holds the bars drawn and the benchmark file's meta. tc's bars come
from the tc benchmark (figures/data/bench_tc_h200.json, TC_SOURCE) when the main file has none;
that file's own torch rows, measured in the same process as tc, give the README's ratios.
"""

from pathlib import Path

from nbflash import MODE, bench, impls as registry

from . import common

NAME = "throughput"
#: the order of the series drawn, (impl, dtype); a series the data has and this list does not
#: (a newly registered impl) follows them
ORDER = (("torch-flash", "float16"), ("torch", "float16"), ("tc", "float16"),
         ("fa2", "float16"), ("fa2", "float32"), ("torch", "float32"), ("naive", "float16"),
         ("naive", "float32"))
PASS_TITLE = {"fwd": "forward", "bwd": "backward", "fwdbwd": "forward + backward"}


#: tc's benchmark (float16 only, run with torch and torch-flash in one process)
TC_SOURCE = common.FIGURES / "data" / "bench_tc_h200.json"


def source():
    """The benchmark file: bench_<gpu>.json of this GPU, else the one committed (H200)."""
    if MODE == "gpu":
        return Path(bench.default_out())
    return common.FIGURES / "data" / "bench_h200.json"


def drawn(impl):
    """Is `impl` drawn? torch's series, and every registered impl fast enough for the grid
    (nbflash.impls: fa1 is not)."""
    return impl in bench.TORCH_IMPLS or (impl in registry.REGISTRY
                                         and registry.get(impl).at_scale)


def measure(fresh=False):
    impls = [i for i in bench.default_impls() if drawn(i)]
    bench.run(impls=impls, out=common.ROOT / source(), resume=not fresh, host_overhead=fresh,
              command=common.command())


def series(data):
    """The (impl, dtype) series of the bars, in ORDER, then any others."""
    present = {(b["impl"], b["dtype"]) for b in data}
    rank = list(common.STYLE)
    return [s for s in ORDER if s in present] + sorted(
        present - set(ORDER), key=lambda s: (rank.index(s[0]) if s[0] in rank else len(rank),
                                              s[1]))


def bars(doc):
    out = []
    for r in doc.get("records", []):
        if r.get("status") == "ok" and r.get("density") is None and not r.get("padding") \
                and not r.get("dropout_p") and drawn(r["impl"]):
            out.append({k: r[k] for k in ("impl", "dtype", "pass", "d", "causal", "N", "B", "H",
                                          "tflops", "median_ms")})
    return out


def plot():
    src = common.ROOT / source()
    doc = common.load(src)
    if not doc:
        return None
    data = bars(doc)
    meta = {**doc["meta"], "source": f"figures/data/{src.name}"}
    tc_doc = common.load(TC_SOURCE) if not any(b["impl"] == "tc" for b in data) else None
    if tc_doc:
        data += [b for b in bars(tc_doc) if b["impl"] == "tc"]
        meta["tc_source"] = {"file": f"figures/data/{TC_SOURCE.name}",
                             "date": tc_doc["meta"]["date"]}
    summary = {"meta": meta, "bars": data}
    bench.write_json(common.data_path(NAME), summary)
    plt = common.pyplot()
    configs = sorted({(b["d"], b["causal"]) for b in data})
    lines = series(data)
    Ns = sorted({b["N"] for b in data})
    fig, axes = plt.subplots(3, len(configs), figsize=(3.6 * len(configs), 8.4), squeeze=False)
    width = 0.8 / max(1, len(lines))
    for row, pass_ in zip(axes, ("fwd", "bwd", "fwdbwd")):
        for ax, (d, causal) in zip(row, configs):
            for i, (impl, dtype) in enumerate(lines):
                st = common.STYLE[impl]
                val = {b["N"]: b["tflops"] for b in data if (b["impl"], b["dtype"], b["pass"],
                                                             b["d"], b["causal"]) ==
                       (impl, dtype, pass_, d, causal)}
                ax.bar([j + (i - (len(lines) - 1) / 2) * width for j in range(len(Ns))],
                       [val.get(n, 0) for n in Ns], width, color=st["color"],
                       hatch="" if dtype == "float16" else "//", edgecolor="k", linewidth=0.3,
                       label=f"{st['label']} {dtype}")
            ax.set_xticks(range(len(Ns)), [f"{n // 1024}k" if n >= 1024 else str(n)
                                           for n in Ns])
            ax.set_yscale("log")
            ax.set_title(f"{PASS_TITLE[pass_]}, d={d}, {'causal' if causal else 'not causal'}",
                         fontsize=8)
            ax.set_xlabel("sequence length N")
            ax.set_ylabel("TFLOP/s")
    axes[0][0].legend(fontsize=6, ncol=2, loc="lower left")
    note = f"nbflash tc: {meta['tc_source']['date'][:10]}" if "tc_source" in meta else None
    return common.save(fig, NAME, "Attention throughput, 16k tokens per batch, hidden 2048 "
                                  "(hatched: float32)", doc, note)
