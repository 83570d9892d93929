"""Run tuning sweeps: python -m experiments.tuning NAME ... | all [--fresh]."""

import argparse
import importlib
import sys

from . import NAMES


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m experiments.tuning", description=__doc__)
    ap.add_argument("names", nargs="+", metavar="NAME", help=f"'all' or some of: "
                                                             f"{', '.join(NAMES)}")
    ap.add_argument("--fresh", action="store_true",
                    help="measure again instead of resuming from the stored data")
    args = ap.parse_args(argv)
    names = NAMES if args.names == ["all"] else args.names
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        ap.error(f"unknown sweeps {unknown}; choose from {list(NAMES)} or 'all'")
    for name in names:
        importlib.import_module(f"experiments.tuning.{name}").measure(fresh=args.fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
