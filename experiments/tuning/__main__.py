"""Run tuning sweeps: python -m experiments.tuning NAME ... | all [--fresh]."""

import importlib
import sys

from nbflash.cli_util import ArgumentParser, run_main

from . import NAMES

PROG = "python -m experiments.tuning"


def main(argv=None):
    """The command line; returns its exit status (a user error: one line on stderr, 2)."""
    return run_main(PROG, _main, argv)


def _main(argv):
    ap = ArgumentParser(prog=PROG, description=__doc__)
    ap.add_argument("names", nargs="+", metavar="NAME", help=f"'all' or some of: "
                                                             f"{', '.join(NAMES)}")
    ap.add_argument("--fresh", action="store_true",
                    help="measure again instead of resuming from the stored data")
    args = ap.parse_args(argv)
    names = NAMES if "all" in args.names else args.names
    unknown = [n for n in args.names if n not in NAMES and n != "all"]
    if unknown:
        ap.error(f"unknown sweeps {unknown}; choose from {list(NAMES)} or 'all'")
    for name in names:
        importlib.import_module(f"experiments.tuning.{name}").measure(fresh=args.fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
