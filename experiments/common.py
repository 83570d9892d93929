"""What the experiments share: where their files go, their data files, the correctness check
before a timing, and the figure style.

Every experiment writes `figures/data/<name>.json` and `figures/<name>.png`. A data file is the
benchmark's resumable store (nbflash.bench.store, whose docstring has the rules): {"meta",
"points"}, or, for the experiments that run nbflash.bench, a bench document (its "records"
instead of "points"). A run writes its progress after every point to the side file
`figures/data/<name>.partial.json` and replaces the data file only when it finishes (`measure`
and `count` finish their store at the end), so an interrupted run leaves the last complete
file in place, and a rerun resumes the side file (--fresh starts again from nothing, setting
an unfinished side file aside). A file that cannot be read stops the run with its name and
what to do; --fresh sets it aside (kept next to it, as <name>.corrupt-<time>.json) and starts
again. A file measured on one GPU is never resumed on another: the run stops and says to pass
--fresh. Figures and the summary table drawn from an unfinished run's data (a side file, where
no run has finished yet) say so: "incomplete: 4 of 10 points" (incomplete_note).
"""

import shlex
import sys
from pathlib import Path

from nbflash import MODE, bench, impls
# CorruptData: a data file that cannot be read (its message names it and says what to do)
from nbflash.bench.store import CorruptData, partial_path, progress, set_aside, stored  # noqa: F401

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
    """The data at `path`: the file (the last finished run), or, where no run into it has
    finished yet, the unfinished run's side file (its meta says "complete": false); None when
    there is neither. CorruptData when it cannot be read."""
    return stored(path)


def unfinished(name_or_path):
    """The side file of an unfinished run into this experiment's data file (a name, or the
    file's path), or None."""
    path = Path(name_or_path) if isinstance(name_or_path, Path) else data_path(name_or_path)
    side = partial_path(path)
    return side if side.exists() else None


def incomplete_note(doc, what=None):
    """'incomplete: 4 of 10 points' for the data of a run that did not finish (None for complete
    data, and for files from before the store marked completeness); `what` names the data
    ('(c) incomplete: ...')."""
    got = progress(doc) if doc else None
    if got is None:
        return None
    have, planned = got
    count = ("the run did not finish" if have is None else
             f"{have} of {planned} points" if planned is not None else
             f"{have} points, the run did not finish")
    return f"{what + ' ' if what else ''}incomplete: {count}"


def data_notes(name):
    """What the summary table says about an experiment's data files (<name>.json,
    <name>_counted.json): '<file>: incomplete: 4 of 10 points' for an unfinished run's data,
    and where a finished file has an unfinished run beside it, that it is there to resume."""
    notes = []
    for path in (data_path(name), data_path(f"{name}_counted")):
        try:
            doc = load(path)
        except CorruptData as exc:
            notes.append(f"{path.name}: cannot be read ({exc.why})")
            continue
        note = incomplete_note(doc)
        if note:
            notes.append(f"{path.name}: {note}")
        elif path.exists() and unfinished(path):
            notes.append(f"an unfinished run in {unfinished(path).name} (a rerun resumes it)")
    return notes


def set_aside_corrupt(path):
    """Rename a data file that cannot be read to <name>.corrupt-<time>.json next to it (what
    --fresh does with one); returns the new path."""
    return set_aside(path, "corrupt")


def command():
    return shlex.join([Path(sys.executable).name, *sys.argv])


class Store(bench.Store):
    """One experiment's data file of points (nbflash.bench.Store), each identified by its `key`
    fields; it refuses data of another GPU unless `fresh`. planned: the points (dictionaries
    of their key fields) the run means to measure. The file is replaced when the run calls
    finish() (or leaves a `with` block without an exception), not before."""

    def __init__(self, name, params, key, fresh=False, path=None, planned=None):
        super().__init__(path or data_path(name), bench.run_meta(params, command()), tuple(key),
                         items="points", fresh=fresh, planned=planned)
        report_set_aside(self, print)


def report_set_aside(store, say):
    """say() a line for each file a fresh start set aside (store.aside)."""
    for old, new in store.aside:
        why = "an unfinished run" if ".unfinished-" in new.name else "cannot be read"
        say(f"{old} ({why}): set aside as {new.name}, starting afresh")


def run_bench(name, fresh, runs, **grid):
    """nbflash.bench.run into this experiment's data file, once per dict of `runs` (each with
    `grid`), all into the same file: only the first may start afresh, and only the last
    finishes (replaces the file): until then they build on one side file, so an interrupted
    experiment leaves its last complete file in place."""
    path = data_path(name)
    for i, run in enumerate(runs):
        bench.run(out=path, resume=not (fresh and i == 0), finish=i == len(runs) - 1,
                  host_overhead=False, command=command(), **grid, **run)


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


def title_lines(title, doc, note=None, sources=None, width=60):
    """The figure's title: `title` wrapped to `width`, then where and when its data was
    measured, `note`, and for data of a run that did not finish, say so (incomplete_note).
    sources: {label: document} whose completeness to report (default: doc, unlabelled)."""
    import textwrap  # noqa: PLC0415
    sources = {None: doc} if sources is None else sources
    notes = [note] + [incomplete_note(d, label) for label, d in sources.items()]
    notes = [n for n in notes if n]
    return ("\n".join(textwrap.wrap(title, width)) + f"\n{source_line(doc)}"
            + (f" — {'; '.join(notes)}" if notes else ""))


def save(fig, name, title, doc, note=None, sources=None):
    """Title the figure with where and when its data was measured (and, for data of a run that
    did not finish, that it is incomplete: title_lines), and write it."""
    width = max(60, int(fig.get_figwidth() * 11))
    fig.suptitle(title_lines(title, doc, note, sources, width), fontsize=10)
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
