"""Block size (paper Fig. 2 middle): fa1 forward HBM accesses and runtime against block size.

fa1's forward (Algorithm 1) at the paper's setting (B = 64, H = 16, N = 1024, d = 64, float16)
for a range of on-chip sizes M, each giving blocks Bc = ceil(M/4d), Br = min(Bc, d) (the paper's
rule, nbflash.kernels.fa1.tiles.block_sizes), up to the largest M whose tiles fit the 48 KB of static
shared memory fa1 uses (Bc = 40 at d = 64). Larger blocks mean fewer passes over Q and O
(Algorithm 1 reads Q_i and reads and writes O_i once per key block): the HBM accesses fall
as 1/Bc, and the runtime with them, until something else limits it. Per point: the outputs are
checked against the float64 reference, the forward is timed (median of CUDA events), its HBM
traffic modelled (nbflash.iomodel) and measured with Nsight Compute when present.
"""

from nbflash import bench
from nbflash.kernels.fa1 import tiles as fa1_tiles

from . import common, ncu

NAME = "block_size"

def config():
    """(B, H, N, d, dtype, the block sizes Bc: M = 4·d·Bc)."""
    return common.sized((64, 16, 1024, 64, "float16", (4, 8, 16, 24, 32, 40)),
                        (1, 1, 24, 8, "float32", (2, 4, 8)))


def points():
    """(M, Br, Bc) of the sweep, those whose tiles fit."""
    D, blocks = config()[3], config()[5]
    limit = fa1_tiles.default_M(D, "forward")
    out = []
    for bc in blocks:
        M = min(4 * D * bc, limit)
        out.append((M, *fa1_tiles.block_sizes(M, D)))
    return sorted(set(out))


def measure(fresh=False):
    B, H, N, d, dtype, _ = config()
    params = {"B": B, "H": H, "N": N, "d": d, "dtype": dtype, "impl": "fa1", "pass": "fwd",
              "rule": "paper", "points (M, Br, Bc)": points()}
    store = common.Store(NAME, params, key=("M",), fresh=fresh,
                         planned=[{"M": M} for M, _, _ in points()])
    group = None
    for M, Br, Bc in points():
        if store.done(M=M):
            continue
        print(f"fa1 forward M={M} (Br={Br}, Bc={Bc})", flush=True)
        point = {"M": M, "Br": Br, "Bc": Bc, "B": B, "H": H, "N": N, "d": d, "dtype": dtype,
                 "model": common.model_bytes("fa1", "fwd", B, H, N, d, dtype, M=M)}
        try:
            group = group or bench.Group(dtype, B, H, N, d, False)
            point.update(common.check_and_time(group, "fa1", ("fwd",), M=M)["fwd"])
        except Exception as exc:  # noqa: BLE001
            point.update(bench.failure(exc))
        if point["status"] == "ok" and common.on_gpu():
            point.update(ncu.fields({"impl": "fa1", "pass": "fwd", "B": B, "H": H, "N": N,
                                     "d": d, "dtype": dtype, "causal": False, "M": M}))
        store.add(point)
    del group
    bench.free_memory()
    store.finish()


def plot():
    doc = common.load(common.data_path(NAME))
    pts = sorted((p for p in (doc or {}).get("points", []) if p.get("status") == "ok"),
                 key=lambda p: p["Bc"])
    if not pts:
        return None
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    bc = [p["Bc"] for p in pts]
    gb = common.traffic_gb
    ax.plot(bc, [gb(p["model"]) for p in pts], "k-", label="HBM R+W, model")
    for level, marker, label in (("global", "o", "global-memory instructions (ncu)"),
                                 ("l2", "s", "SM↔L2 (ncu)"), ("dram", "x", "DRAM (ncu)")):
        ys = [gb((p.get("ncu") or {}).get("totals"), level) for p in pts]
        if any(y is not None for y in ys):
            ax.plot(bc, ys, marker=marker, linestyle="--", label=label)
    ax.set_xlabel("block size Bc (key rows per block; Br = min(Bc, d))")
    ax.set_ylabel("HBM accesses (GB)")
    ax.set_yscale("log")
    ax2 = ax.twinx()
    ax2.plot(bc, [p["median_ms"] for p in pts], color=common.STYLE["fa1"]["color"],
             marker="D", label="runtime")
    ax2.set_ylabel("runtime (ms)", color=common.STYLE["fa1"]["color"])
    ax2.set_ylim(bottom=0)
    ax2.grid(False)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right")
    m = doc["meta"]["params"]
    return common.save(fig, NAME, f"fa1 forward (Alg. 1), B={m['B']} H={m['H']} N={m['N']} "
                                  f"d={m['d']} {m['dtype']}: HBM accesses and runtime against "
                                  f"block size", doc)
