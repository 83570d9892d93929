"""What the experiments share: where their files go, their data files, the correctness check
before a timing, and the figure style.

Every experiment writes `figures/data/<name>.json` and `figures/<name>.png`. A data file is the
benchmark's resumable store (nbflash.bench.store): {"meta", "points"}, or, for the experiments
that run nbflash.bench, a bench document (its "records" instead of "points"). The file is
rewritten (atomically) after every point, and a rerun skips the points already there with a
final status, so an interrupted run loses nothing it finished. A file measured on one GPU is
never resumed on another: the run stops and says to pass --fresh.
"""

import shlex
import sys
from pathlib import Path

from nbflash import MODE, bench, impls

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "figures"

#: statuses a rerun keeps ("error" points are measured again), as for the benchmark
FINAL = bench.FINAL


def data_path(name):
    return FIGURES / "data" / f"{name}.json"


def figure_path(name):
    return FIGURES / f"{name}.png"


def sized(gpu, sim):
    """The GPU's sizes on a GPU, tiny ones in the simulator (where only the tests measure: it
    runs the same code at sizes a Python thread per CUDA thread can afford)."""
    return gpu if on_gpu() else sim


def on_gpu():
    return MODE == "gpu"


#: stored data from another GPU, which a run here must not mix with its own
StaleData = bench.StaleData


def load(path):
    """The JSON document at `path`, or None when there is none."""
    return bench.load_json(path)


def command():
    return shlex.join([Path(sys.executable).name, *sys.argv])


class Store(bench.Store):
    """One experiment's data file of points (nbflash.bench.Store), each identified by its `key`
    fields; it refuses data of another GPU unless `fresh`."""

    def __init__(self, name, params, key, fresh=False, path=None):
        super().__init__(path or data_path(name), bench.run_meta(params, command()), tuple(key),
                         items="points", fresh=fresh)


def run_bench(name, fresh, runs, **grid):
    """nbflash.bench.run into this experiment's data file, once per dict of `runs` (each with
    `grid`), all into the same file: only the first may start afresh."""
    path = data_path(name)
    for i, run in enumerate(runs):
        bench.run(out=path, resume=not (fresh and i == 0), host_overhead=False,
                  command=command(), **grid, **run)


def in_variant(record, dropout, padding):
    """True for a dense bench record with this dropout probability and padding."""
    return bench.record_options(record) == (float(dropout), bool(padding), None, None)


# -- a problem, checked before it is measured ---------------------------------------------------

def check_and_time(group, impl, passes, repeats=5, warmup=2, **api_options):
    """{pass: record fields} of one impl on one problem: its outputs checked against the float64
    reference on the check slice (bench.check, the tolerance rule), then each pass timed
    (bench.time_pass: CUDA events, median) if the check passed. api_options: more arguments of
    the nbflash API calls (fa1's M, for instance)."""
    if api_options:
        runner = bench.NbflashRunner(impl, group.causal, {**group.options, **api_options})
    else:
        runner = bench.make_runner(impl, group.causal, group.dtype.name, group)
    with runner.context():
        return dict(zip(passes, bench.measure_passes(runner, group, passes, repeats, warmup)))


# -- figures ------------------------------------------------------------------------------------

#: one colour and marker per impl (from the registry, nbflash.impls) or peer, the same in every
#: figure
STYLE = {
    **{i.name: {"color": i.color, "marker": i.marker, "label": i.label}
       for i in impls.REGISTRY.values()},
    "torch": {"color": "#2ca02c", "marker": "v", "label": "torch SDPA"},
    "torch-flash": {"color": "#ff7f0e", "marker": "P", "label": "torch SDPA (FA2 backend)"},
}


def pyplot():
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "figure.dpi": 150,
                         "axes.grid": True, "grid.alpha": 0.3, "legend.fontsize": 8})
    return plt


def source_line(doc):
    """'NVIDIA H200, 2026-11-25' (or 'simulator, ...') from a data file's meta."""
    meta = doc.get("meta", {})
    return f"{meta.get('gpu') or 'unknown device'}, {str(meta.get('date', '?'))[:10]}"


def mark_oom(ax, items):
    """An x at the top of the axes at each N where an impl ran out of memory (items: records
    or points with impl, N and status), in the impl's colour, with a legend entry."""
    top = ax.get_ylim()[1]
    for p in items:
        if p["status"] == "oom" and p["impl"] in STYLE:
            ax.plot(p["N"], top, marker="x", color=STYLE[p["impl"]]["color"], markersize=8,
                    clip_on=False)
    ax.plot([], [], marker="x", color="k", linestyle="none", label="out of memory (at the top)")


def save(fig, name, title, doc, note=None):
    """Title the figure with where and when its data was measured, and write it."""
    import textwrap  # noqa: PLC0415
    width = max(60, int(fig.get_figwidth() * 11))
    fig.suptitle("\n".join(textwrap.wrap(title, width)) + f"\n{source_line(doc)}"
                 + (f" — {note}" if note else ""), fontsize=10)
    fig.tight_layout()
    path = figure_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    import matplotlib.pyplot as plt  # noqa: PLC0415
    plt.close(fig)
    return path


# -- HBM traffic ------------------------------------------------------------------------------

def model_bytes(impl, pass_, B, H, N, d, dtype, **kw):
    """{"read", "write", "atomic"} bytes of one pass from nbflash.iomodel, or None for an impl
    the model does not cover."""
    from nbflash import iomodel  # noqa: PLC0415
    try:
        r = iomodel.hbm_bytes(impl, pass_, B, H, N, N, d, dtype, **kw)
    except (ValueError, NotImplementedError):
        return None
    return {"read": r.read, "write": r.write, "atomic": r.atomic}


def add_totals(a, b):
    return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in set(a) | set(b)}


def traffic_gb(t, level=None):
    """Reads + writes + atomics in GB of a model dict (level None) or of ncu totals at `level`
    ("dram", "l2" or "global"); None when there is nothing."""
    if not t:
        return None
    pre = f"{level}_" if level else ""
    vals = [t.get(pre + k) for k in ("read", "write", "atomic")]
    if all(v is None for v in vals):
        return None
    return sum(v or 0.0 for v in vals) / 1e9


def fmt(x, digits=3):
    """Three significant digits, '-' for None."""
    return "-" if x is None else f"{x:.{digits}g}"
