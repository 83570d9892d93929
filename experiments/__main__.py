"""Regenerate the FlashAttention paper's kernel figures: python -m experiments all | NAME ...

On a GPU each experiment measures what it needs (checking every impl against the float64
reference before timing it; resuming from its data file, so an interrupted run loses nothing it
finished) and then draws its figure. Without one, the experiments that the simulator can run
(the HBM traffic counted by an instrumented simulator run) run, and every other figure is drawn
again from its stored data; the summary at the end says which is which.
"""

import importlib
import sys
import time

from rich.console import Console
from rich.table import Table

from nbflash.cli_util import ArgumentParser, one_line, run_main, user_errors

from . import NAMES
from .common import (CorruptData, data_notes, data_path, figure_path, load, on_gpu,
                     set_aside_corrupt, source_line)


def run_one(name, fresh, replot, console, count=True):
    """(what ran, the figure or None, the data's source line) for one experiment."""
    mod = importlib.import_module(f"experiments.{name}")
    did = []
    if not replot and on_gpu() and hasattr(mod, "measure"):
        console.rule(f"{name}: measuring")
        mod.measure(fresh=fresh)
        did.append("measured here")
    if not replot and count and hasattr(mod, "count"):
        console.rule(f"{name}: counting in the simulator")
        mod.count(fresh=fresh)
        did.append("counted (simulator)")
    fig = _plot(mod, fresh, console)
    doc = load(data_path(name)) or load(data_path(f"{name}_counted"))
    did.append("plotted" if fig else "no data to plot")
    notes = data_notes(name)        # data of a run that did not finish, one to resume
    return ", ".join(did) + "".join(f"; {n}" for n in notes), fig, \
        source_line(doc) if doc else "-"


def _plot(mod, fresh, console):
    """mod.plot(). With --fresh, a data file it cannot read is set aside (kept next to it, as
    <name>.corrupt-<time>.json) and the figure drawn without it (the experiment's own data
    files were set aside already where it measured or counted: its store does that)."""
    tried = set()
    while True:
        try:
            return mod.plot()
        except CorruptData as exc:
            if not fresh or exc.path in tried or not exc.path.exists():
                raise
            tried.add(exc.path)
            console.print(f"{exc.path} cannot be read: {exc.why}; set aside as "
                          f"{set_aside_corrupt(exc.path).name}", markup=False, highlight=False)


PROG = "python -m experiments"


def main(argv=None):
    """The command line; returns its exit status (a user error: one line on stderr, 2)."""
    return run_main(PROG, _main, argv)


def _main(argv):
    ap = ArgumentParser(prog=PROG, description=__doc__)
    ap.add_argument("names", nargs="*", metavar="NAME", help=f"'all' or some of: {', '.join(NAMES)}")
    ap.add_argument("--list", action="store_true", help="list the experiments and exit")
    ap.add_argument("--fresh", action="store_true",
                    help="measure again instead of resuming from the stored data (GPU)")
    ap.add_argument("--replot", action="store_true",
                    help="only draw the figures from the stored data")
    ap.add_argument("--no-count", action="store_true",
                    help="skip the simulator's counting (io_complexity)")
    args = ap.parse_args(argv)
    console = Console() if sys.stdout.isatty() else Console(width=120)
    if args.list or not args.names:
        for name in NAMES:
            doc = importlib.import_module(f"experiments.{name}").__doc__.strip().splitlines()[0]
            console.print(f"{name:16s} {doc}", markup=False, highlight=False)
        if args.list:
            return 0
        ap.error("name the experiments to run (those above) or 'all'")
    names = NAMES if "all" in args.names else args.names
    unknown = [n for n in args.names if n not in NAMES and n != "all"]
    if unknown:
        ap.error(f"unknown experiments {unknown}; choose from {list(NAMES)} or 'all'")
    table = Table(title="experiments" + ("" if on_gpu() else " (no GPU: simulator and stored data)"))
    for col in ("experiment", "what ran", "data from", "figure", "s"):
        table.add_column(col)
    failed = bugs = 0
    for name in names:
        t0 = time.perf_counter()
        try:
            did, fig, source = run_one(name, args.fresh, args.replot, console,
                                          count=not args.no_count)
        except Exception as exc:  # noqa: BLE001  (one failing experiment does not stop the rest)
            failed += 1
            if isinstance(exc, user_errors()):    # e.g. stored data from another GPU: one line
                print(f"{PROG}: error: {name}: {one_line(exc)}", file=sys.stderr)
            else:                                 # a bug: its traceback
                bugs += 1
                console.print_exception(max_frames=5)
            did, fig, source = f"failed: {type(exc).__name__}: {exc}"[:200], None, "-"
        table.add_row(name, did, source, str(fig.relative_to(figure_path(name).parent.parent))
                      if fig else "-", f"{time.perf_counter() - t0:.0f}")
    console.print(table)
    return 0 if not failed else 1 if bugs else 2    # 2: every failure was a user's error


if __name__ == "__main__":
    sys.exit(main())
