"""``python -m nbflash bench`` (the grid, checked then timed, into a resumable JSON file) and
``python -m nbflash report`` (the tables of a stored file)."""

import shlex

from .._cuda import MODE
from ..cli_util import (UsageError, check_output_file, density, input_file, nonnegative_int,
                        output_file, positive_int, probability)


def read_data_file(path):
    """The JSON document a benchmark run wrote at `path`, or a user error that names the file
    when it cannot be read as one (the store's CorruptData, or a UsageError)."""
    from .store import load_json  # noqa: PLC0415

    try:
        doc = load_json(path)       # CorruptData when it is not JSON (nbflash.bench.store)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if doc is None:
        raise UsageError(f"{path}: no such file")
    if not (isinstance(doc, dict) and isinstance(doc.get("records"), list)):
        raise UsageError(f"{path} holds no 'records' list: it is not a file python -m nbflash "
                         f"bench wrote")
    return doc


def cmd_bench(args):
    """The benchmark grid (nbflash.bench): a table on screen and a JSON file, resumable."""
    from . import print_host_overhead, print_table, run  # noqa: PLC0415
    from .report import make_console  # noqa: PLC0415
    from .run import default_out  # noqa: PLC0415

    if MODE == "compile":
        raise UsageError("bench runs kernels: use NBFLASH_DEVICE=gpu or sim")
    out = default_out() if args.out is None else args.out
    check_output_file(out, "--out")     # before anything is measured, the default path too
    # a file to resume that cannot be (another GPU's, not JSON) is refused by the store before
    # anything is measured (StaleData, CorruptData: one line, nbflash.cli_util)
    console = make_console()
    result = run(impls=args.impls, dtypes=args.dtypes, Ns=args.N, ds=args.d,
                 causal=[c == "on" for c in args.causal], passes=args.passes,
                 tokens=args.tokens, hidden=args.hidden, repeats=args.repeats,
                 warmup=args.warmup, dropout=args.dropout, padding=args.padding,
                 densities=args.density, block_size=args.block_size,
                 out=out, resume=not args.no_resume, host_overhead=not args.no_host_overhead,
                 command=shlex.join(["python", "-m", "nbflash", *args.argv]), console=console)
    print_table(result, console)
    print_host_overhead(result, console)
    console.print(f"wrote {out}", highlight=False)
    return 0


def cmd_report(args):
    """A stored benchmark file's tables, or one impl against its peers in Markdown."""
    from .grid import record_options  # noqa: PLC0415
    from .report import markdown_table, print_host_overhead, print_table  # noqa: PLC0415

    doc = read_data_file(args.path)
    if args.markdown:
        ok = {r.get("impl") for r in doc["records"]     # the records markdown_table uses
              if r.get("dtype") == args.dtype and r.get("status") == "ok"
              and record_options(r) == (0.0, False, None, None)}
        missing = [i for i in (args.markdown, *args.peers) if i not in ok]
        if missing:
            raise UsageError(f"{args.path} has no ok {args.dtype} records (without options) of "
                             f"{', '.join(missing)}; it has them of "
                             f"{', '.join(sorted(ok)) or 'no impl'}")
        print(markdown_table(doc, args.markdown, args.dtype, tuple(args.peers)))
    else:
        print_table(doc)
        print_host_overhead(doc)
    return 0


def add_parsers(sub):
    """The bench and report verbs of ``python -m nbflash``."""
    from .grid import DTYPES, GPU_DEFAULTS, PADDING_SPREAD, PASSES, SIM_DEFAULTS, defaults
    from .grid import DROPOUT_SEED
    from .runners import known_impls

    grid = ", ".join(f"{k} {v}" for k, v in defaults().items())
    p = sub.add_parser("bench", help="the FlashAttention-2 benchmark grid: every impl checked, "
                                     "then timed; a table and a JSON file (resumable)",
                       epilog=f"Defaults in {MODE} mode: {grid}.")
    p.add_argument("--impls", nargs="+", choices=known_impls(), default=None,
                   help="default: every nbflash impl, and torch, torch-flash when torch runs")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    p.add_argument("--N", type=positive_int, nargs="+", default=None, help="sequence lengths")
    p.add_argument("--d", type=positive_int, nargs="+", default=None, help="head dims")
    p.add_argument("--causal", nargs="+", choices=("off", "on"), default=["off", "on"])
    p.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="timed calls per point (median)")
    p.add_argument("--warmup", type=nonnegative_int, default=None,
                   help="untimed calls before them")
    p.add_argument("--tokens", type=positive_int, default=None,
                   help="tokens per batch: B = tokens // N")
    p.add_argument("--hidden", type=positive_int, default=None,
                   help="hidden size: H = hidden // d")
    p.add_argument("--dropout", type=probability, default=0.0, metavar="P",
                   help=f"dropout probability of every point (seed {DROPOUT_SEED})")
    p.add_argument("--padding", action="store_true",
                   help=f"key padding: key lengths drawn from U[N-{PADDING_SPREAD}, N] per "
                        "batch entry (fixed seed), as in the FlashAttention paper's benchmarks")
    p.add_argument("--density", type=density, nargs="+", default=None, metavar="D",
                   help="block-sparse points with random block masks of these densities "
                        "(1.0: an all-True mask, the block-sparse code path at full density) "
                        "instead of dense ones")
    p.add_argument("--block-size", type=positive_int, default=None,
                   help=f"block size of the --density masks (default "
                        f"{GPU_DEFAULTS['block_size']} on a GPU, "
                        f"{SIM_DEFAULTS['block_size']} in the simulator)")
    p.add_argument("--out", type=output_file, default=None,
                   help="JSON file (default figures/data/bench_<gpu>.json, bench_sim.json in "
                        "the simulator); rewritten after every point")
    p.add_argument("--no-resume", action="store_true",
                   help="start afresh instead of skipping the points already in --out")
    p.add_argument("--no-host-overhead", action="store_true",
                   help="skip the host-time-per-call measurement")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("report", help="the tables of a stored benchmark file (or one impl "
                                      "against its peers, in Markdown)")
    p.add_argument("path", type=input_file, help="a JSON file python -m nbflash bench wrote")
    p.add_argument("--markdown", metavar="IMPL", default=None,
                   help="a Markdown table of IMPL's TFLOP/s and its ratios to --peers")
    p.add_argument("--dtype", choices=DTYPES, default="float16",
                   help="with --markdown: the dtype (float16)")
    p.add_argument("--peers", nargs="+", default=["torch"],
                   help="with --markdown: the impls to divide by (torch)")
    p.set_defaults(func=cmd_report)
