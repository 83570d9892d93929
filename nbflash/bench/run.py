"""The benchmark run: every point of the grid checked, then timed, recorded as it finishes
(resumable), and the host time per call.

Every implementation runs each point in each dtype it is asked for: the nbflash impls through the
public API, and, when torch is importable on the GPU, torch's scaled_dot_product_attention
(nbflash.bench.runners). Every point is recorded, those a peer cannot run included: status
"ok", "oom" (CuPy's or torch's out-of-memory error, MemoryError), "unsupported"
(nbflash.InputError, or a dtype an impl does not take), "skipped" (give_up_ms) or "error"
(anything else, message kept). The JSON file is nbflash.bench.store's: the run's progress goes
to its side file (<stem>.partial.json) after every point, and the file is replaced only when
the run finishes, so an interrupted run leaves the last complete file as it was; a rerun with
the same file resumes (the side file first) and skips the points already recorded as ok, oom,
unsupported or skipped (with the same options: a record written before the options existed
counts as without them).

Host overhead. Separately, the host time of one call at a tiny problem (B=1, H=1, N=128, d=64,
float32, or float16 for an impl that takes 16-bit inputs only): median of time.perf_counter()
around single calls, never synchronizing inside the timed region (every 50 calls outside it),
forward and backward, per impl.

The JSON file:

    {"meta": {... (nbflash.bench.store.run_meta), "params" (the grid, repeats, rotation, check,
              factors, reference, reference_chunk_bytes, reference_row_chunk)},
     "records": [{"impl", "dtype", "B", "H", "N", "d", "causal", "pass", "dropout_p", "padding",
                  "density" (None: dense), "block_size" (None: dense), "block_density"
                  (block-sparse), "median_ms", "tflops", "status", "error" (not ok), "max_err"
                  and "tolerance" ({"o", "dq", "dk", "dv"} as far as checked), "check_skipped"
                  (why, where the outputs were not checked), "repeats", "warmup", "copies"
                  (timed)}, ...],
     "host_overhead_us": {impl: {"forward": us, "backward": us}, "fa1+torch": ..., ...}}
"""

import contextlib
import re
import shlex
import sys
from pathlib import Path

import numpy as np

import nbflash
from .. import impls as registry
from .._cuda import MODE
from .device import failure, free_memory, xp
from .grid import (BLOCK_MASK_SEED, DROPOUT_SEED, DTYPES, PADDING_SEED, PASSES, Point,
                   check_options, defaults, grid_points, options_label, problem_size,
                   record_key, record_options)
from . import reference
from .reference import (FACTORS, MAX_COPIES, MIN_COPIES, ROTATE_BYTES, Group, make_copies,
                        reference_note, reference_row_chunk)
from .report import make_console
from .runners import (exact_float32, known_impls, default_impls, make_runner, nbflash_impls,
                      torch_module)
from .store import Store, run_meta
from .timing import host_config, host_us, measure_passes

def gpu_short_name(name):
    """'NVIDIA H200' -> 'h200', 'NVIDIA GeForce RTX 4090' -> 'rtx-4090'."""
    words = [re.sub(r"[^a-z0-9]", "", w) for w in name.lower().split()]
    words = [w for w in words if w and w not in ("nvidia", "geforce", "tesla")]
    return "-".join(words) or "gpu"


def default_out():
    """figures/data/bench_<gpu>.json (bench_sim.json in the simulator)."""
    name = gpu_short_name(nbflash.info()["gpu"] or "gpu") if MODE == "gpu" else "sim"
    return Path("figures") / "data" / f"bench_{name}.json"


class _Recorder:
    """Puts each finished point into the store (replacing an earlier record of it), which
    writes the file, and advances the progress bar."""

    def __init__(self, store, progress, task):
        self.store, self.progress, self.task = store, progress, task

    def describe(self, text):
        self.progress.update(self.task, description=text)

    def add(self, point, fields):
        self.store.add(point.record(fields))
        self.progress.advance(self.task)


def _label(p, impl=True):
    opts = options_label(*p.options())
    return (f"{p.impl + ' ' if impl else ''}{p.dtype} d={p.d} N={p.N} "
            f"{'causal' if p.causal else 'full'} B={p.B} H={p.H}{', ' + opts if opts else ''}")


def _series(p):
    """A point's series: the same impl, dtype, head dim, causality, options and pass at other
    N (what give_up_ms stops)."""
    return (p.impl, p.dtype, p.d, p.causal, p.pass_, *p.options())


def _give_up(slow, p, fields, give_up_ms):
    """Note in `slow` when a timed point took longer than give_up_ms (None: never give up)."""
    ms = fields.get("median_ms")
    earlier = slow.get(_series(p))
    if (give_up_ms is not None and fields.get("status") == "ok" and ms and ms > give_up_ms
            and (earlier is None or earlier[0] > p.N)):
        slow[_series(p)] = (p.N, f"skipped: {p.impl} took {ms:.0f} ms at N={p.N}, over "
                                 f"give_up_ms={give_up_ms:g}")


def _run_impl(group, points, rec, repeats, warmup, slow=None, give_up_ms=None):
    """Check, then time each pass of one impl on one group."""
    impl, causal = points[0].impl, points[0].causal
    with contextlib.ExitStack() as stack:
        try:
            runner = make_runner(impl, causal, points[0].dtype, group)
            stack.enter_context(runner.context())
        except Exception as exc:  # noqa: BLE001
            for p in points:
                rec.add(p, failure(exc))
            return
        rec.describe(f"check {_label(points[0])}")
        passes = [p.pass_ for p in points]
        results = measure_passes(runner, group, passes, repeats, warmup, lambda i: rec.describe(
            f"time {points[i].pass_} {_label(points[i])}"))
        for p, fields in zip(points, results):
            if slow is not None:
                _give_up(slow, p, fields, give_up_ms)
            rec.add(p, fields)
            free_memory(collect=fields["status"] != "ok")


def _run_group(points, rec, repeats, warmup, slow=None, give_up_ms=None):
    """All pending points of one problem: inputs and reference once, then each impl. A point
    whose series gave up at a smaller N (slow: series -> (N, why)) is recorded as skipped."""
    if slow:
        skip = [p for p in points if _series(p) in slow and slow[_series(p)][0] < p.N]
        for p in skip:
            rec.add(p, {"status": "skipped", "error": slow[_series(p)][1]})
        points = [p for p in points if p not in skip]
        if not points:
            return
    rec.describe(f"inputs and reference: {_label(points[0], impl=False)}")
    try:
        group = Group(*points[0].group())
    except Exception as exc:  # noqa: BLE001
        fields = failure(exc, "inputs or float64 reference: ")
        for p in points:
            rec.add(p, fields)
        free_memory(collect=True)
        return
    by_impl = {}
    for p in points:
        by_impl.setdefault(p.impl, []).append(p)
    for impl_points in by_impl.values():
        _run_impl(group, impl_points, rec, repeats, warmup, slow, give_up_ms)
    del group
    free_memory(collect=True)


def _row_chunks_of_grid(tokens, hidden, Ns, ds):
    """{"N=<N> d=<d>": the reference's query rows per chunk (None: all at once)}."""
    return {f"N={N} d={d}": reference_row_chunk(*problem_size(tokens, hidden, N, d), N, N)
            for N in Ns for d in ds}


def _check_counts(**counts):
    """ValueError unless each count is an integer >= 1 (warmup: >= 0), or a non-empty list of
    them (Ns, ds)."""
    for name, value in counts.items():
        least = 0 if name == "warmup" else 1
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        bad = [x for x in values if isinstance(x, bool) or not isinstance(x, (int, np.integer))
               or x < least]
        if bad or not values:
            raise ValueError(f"{name} must be {'integers' if len(values) != 1 else 'an integer'} "
                             f">= {least}; got {value!r}")


def run(*, impls=None, dtypes=DTYPES, Ns=None, ds=None, causal=(False, True), passes=PASSES,
        tokens=None, hidden=None, repeats=None, warmup=None, dropout=0.0, padding=False,
        densities=None, block_size=None, out=None, resume=True, host_overhead=True,
        progress=True, command=None, console=None, give_up_ms=None, finish=True):
    """Benchmark the grid; returns {"meta", "records", "host_overhead_us"} (see the module doc).

    impls: default every nbflash impl, plus torch and torch-flash when torch runs here.
    Ns, ds, tokens, hidden, repeats, warmup, block_size: default per device mode (GPU_DEFAULTS,
    SIM_DEFAULTS). dropout: dropout probability of every point (seed DROPOUT_SEED). padding: key
    lengths from U[N-20, N] (key_lengths). densities: block-sparse points at these densities
    (block_mask) instead of dense ones; None: dense.
    out: JSON path (None: no file); the run's progress goes to its side file after every point
    and `out` is replaced when the run finishes (nbflash.bench.store). resume: keep the records
    stored (an unfinished run's side file, else `out`) and skip the points there with status
    ok, oom, unsupported or skipped; False: start afresh (an unreadable `out` is set aside as
    <stem>.corrupt-<time>.json). finish: put the finished run in place of `out` (False: leave
    it in the side file, for a later run into the same `out` to resume and finish: several
    grids into one file, as the experiments run them). host_overhead: also
    measure the host time per call (measure_host_overhead). progress: show a progress bar.
    give_up_ms: once a point's median time exceeds it, the larger N of the same series (impl,
    dtype, d, causal, pass, options) are recorded as "skipped" instead of measured (a slow impl
    at long sequences would take minutes per point); None: measure everything.
    """
    if MODE == "compile":
        raise RuntimeError("bench runs kernels: use NBFLASH_DEVICE=gpu or sim")
    d0 = defaults()
    impls = tuple(impls or default_impls())
    unknown = [i for i in impls if i not in known_impls()]
    if unknown:
        raise ValueError(f"unknown impls {unknown}; known: {known_impls()}")
    unknown = [p for p in passes if p not in PASSES]
    if unknown:
        raise ValueError(f"unknown passes {unknown}; use {PASSES}")
    # a default only where nothing was given: a 0 is refused, never replaced
    Ns, ds, tokens, hidden, repeats, warmup, block_size = (
        d0[key] if value is None else value for key, value in (
            ("Ns", Ns), ("ds", ds), ("tokens", tokens), ("hidden", hidden),
            ("repeats", repeats), ("warmup", warmup), ("block_size", block_size)))
    _check_counts(Ns=Ns, ds=ds, tokens=tokens, hidden=hidden, repeats=repeats, warmup=warmup)
    check_options(dropout, densities, block_size)
    params = {"impls": list(impls), "dtypes": [np.dtype(t).name for t in dtypes],
              "Ns": list(Ns), "ds": list(ds),
              "causal": [bool(c) for c in causal], "passes": list(passes),
              "tokens": tokens, "hidden": hidden, "repeats": repeats, "warmup": warmup,
              "dropout_p": float(dropout), "padding": bool(padding),
              "densities": [float(x) for x in densities] if densities else None,
              "block_size": int(block_size) if densities else None,
              "option_seeds": {"dropout": DROPOUT_SEED, "padding": PADDING_SEED,
                               "block_mask": BLOCK_MASK_SEED},
              "rotate_bytes": ROTATE_BYTES, "copies": [MIN_COPIES, MAX_COPIES],
              "check": "batch 0, heads 0-1 vs float64 naive", "factors": FACTORS,
              "reference": reference_note(),
              "reference_chunk_bytes": reference.REFERENCE_CHUNK_BYTES,
              "reference_row_chunk": _row_chunks_of_grid(tokens, hidden, Ns, ds),
              "host_overhead": host_config(), "give_up_ms": give_up_ms}
    command = command or shlex.join([sys.executable, *sys.argv])
    store = Store(out, run_meta(params, command), record_key, items="records",
                  fresh=not resume)
    for old, new in store.aside:      # what a fresh start could not use, kept next to it
        (console or make_console()).print(f"{old}: set aside as {new.name}, starting afresh",
                                          markup=False, highlight=False)
    doc = store.doc
    doc.setdefault("host_overhead_us", {})

    points = grid_points(impls=impls, dtypes=params["dtypes"], Ns=params["Ns"],
                         ds=params["ds"], causal=params["causal"], passes=passes,
                         tokens=params["tokens"], hidden=params["hidden"],
                         dropout_p=params["dropout_p"], padding=params["padding"],
                         densities=params["densities"] or (None,),
                         block_size=params["block_size"])
    store.plan(p.record({}) for p in points)
    todo = [p for p in points if store.done(record_key(p.record({}))) is None]
    groups = {}
    for p in todo:
        groups.setdefault(p.group(), []).append(p)

    from rich.progress import (BarColumn, MofNCompleteColumn, Progress,  # noqa: PLC0415
                               TextColumn, TimeElapsedColumn, TimeRemainingColumn)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with exact_float32(), Progress(*columns, console=console or make_console(),
                                   disable=not progress) as bar:
        task = bar.add_task("bench", total=len(todo))
        rec = _Recorder(store, bar, task)
        slow = {}
        for r in doc["records"]:      # series that gave up in the run this one resumes
            if r.get("status") in ("ok", "skipped"):
                p = Point(r["impl"], r["dtype"], r["B"], r["H"], r["N"], r["d"],
                          bool(r["causal"]), r["pass"], *record_options(r))
                _give_up(slow, p, r, give_up_ms)
        for group_points in groups.values():
            _run_group(group_points, rec, params["repeats"], params["warmup"], slow, give_up_ms)
        if host_overhead:
            rec.describe("host overhead")
            doc["host_overhead_us"].update(measure_host_overhead(impls))
            store.write()
    if finish:
        store.finish()
    elif store.changed:
        store.write()           # the side file, for the next run into `out` to resume
    return doc


def _host_overhead_of(runner, copies, cfg):
    """{"forward": us, "backward": us} of one runner on one input copy."""
    out = {}
    with runner.context():
        for name, pass_ in (("forward", "fwd"), ("backward", "bwd")):
            out[name] = host_us(lambda p=pass_: runner.timed(p, copies, 0), cfg["calls"],
                                 cfg["warmup"], cfg["sync_every"])
    return out


def host_dtype(impl):
    """The dtype an impl's host time is measured in: float32, or the first it takes (tc:
    float16; torch's series: float32)."""
    if impl not in registry.REGISTRY or "float32" in registry.get(impl).dtypes:
        return "float32"
    return registry.get(impl).dtypes[0]


def measure_host_overhead(impls, cfg=None):
    """{impl: {"forward": us, "backward": us, "dtype"}} at a tiny problem (GPU_HOST / SIM_HOST)
    in float32 (host_dtype: float16 for tc); with torch on the GPU also "<impl>+torch": the
    nbflash impl called with torch tensors. An impl that cannot run gets None times, its status
    and the message."""
    cfg = cfg or host_config()
    B, H, N, d = cfg["shape"]
    dtype_of = {impl: host_dtype(impl) for impl in impls}
    copies = {dt: make_copies(xp(), (B, H, N, d), np.dtype(dt), 1, seed=1)
              for dt in set(dtype_of.values())}
    torch = torch_module()
    # torch-flash takes no float32: torch's default choice stands for torch here
    cases = [(impl, impl, copies[dtype_of[impl]]) for impl in impls if impl != "torch-flash"]
    if torch is not None:
        cases += [(f"{impl}+torch", impl,
                   [tuple(torch.from_dlpack(x) for x in copies[dtype_of[impl]][0])])
                  for impl in impls if impl in nbflash_impls()]
    result = {}
    with exact_float32():
        for name, impl, inp in cases:
            dtype = dtype_of[impl]
            try:
                result[name] = {**_host_overhead_of(make_runner(impl, False, dtype), inp, cfg),
                                "dtype": dtype}
            except Exception as exc:  # noqa: BLE001
                result[name] = {"forward": None, "backward": None, "dtype": dtype,
                                **failure(exc)}
            free_memory()
    return result
