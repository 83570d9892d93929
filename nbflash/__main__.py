"""Command line: ``python -m nbflash info | check | compile | bench``."""

import argparse
import json
import os
import shlex
import subprocess
import sys

import numpy as np
from rich.console import Console
from rich.table import Table

import nbflash
from nbflash import naive
from nbflash._cuda import MODE

IMPLS = ("naive", "fa1", "fa2")


def _console():
    # piped output (CI logs, the GPU machine) gets 120 columns instead of rich's default 80
    return Console() if sys.stdout.isatty() else Console(width=120)


def cmd_info(args):
    info = nbflash.info()
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    table = Table(title="nbflash", show_header=False)
    for key, value in info.items():
        if key == "versions":
            value = ", ".join(f"{k} {v}" for k, v in value.items() if v)
        table.add_row(key, str(value))
    _console().print(table)
    return 0


def _xp():
    if MODE == "gpu":
        import cupy  # noqa: PLC0415
        return cupy
    return np


def _host(xp, x):
    return x if xp is np else xp.asnumpy(x)


def cmd_check(args):
    """Forward and backward of each impl at one size: max error against the float64
    reference, median time, and peak memory, as a table."""
    from nbflash.measure import peak_memory, time_ms  # noqa: PLC0415

    if MODE == "compile":
        print("check runs kernels: use NBFLASH_DEVICE=gpu or sim", file=sys.stderr)
        return 2
    gpu = MODE == "gpu"
    B = args.B or (4 if gpu else 1)
    H = args.H or (8 if gpu else 2)
    N = args.N or (2048 if gpu else 32)
    d = args.d or (64 if gpu else 16)
    dtype = np.dtype(args.dtype)
    repeats = args.repeats or (10 if gpu else 1)
    xp = _xp()
    rng = np.random.default_rng(0)
    q, k, v, do = (xp.asarray(rng.standard_normal((B, H, N, d)).astype(dtype))
                   for _ in range(4))
    q64, k64, v64, do64 = (x.astype(xp.float64) for x in (q, k, v, do))
    ro, rlse = naive.attention_forward(q64, k64, v64, causal=args.causal)
    refs = [ro, *naive.attention_backward(do64, q64, k64, v64, ro, rlse, causal=args.causal)]
    refs = [_host(xp, r) for r in refs]

    where = nbflash.info()["gpu"] if gpu else "Numba CUDA simulator (CPU)"
    title = (f"nbflash check on {where}: B={B} H={H} N={N} d={d} {dtype.name} "
             f"{'causal' if args.causal else 'full'}")
    table = Table(title=title)
    for col in ("impl", "fwd ms", "bwd ms", "peak MB fwd+bwd", "max err o", "dq", "dk", "dv"):
        table.add_column(col, justify="right")
    records = []
    for impl in args.impls:
        def fwd():
            return nbflash.attention_forward(q, k, v, causal=args.causal, impl=impl)
        with peak_memory() as mem:
            o, lse = fwd()
            grads = nbflash.attention_backward(do, q, k, v, o, lse, causal=args.causal,
                                               impl=impl)
        errs = [float(np.abs(_host(xp, x).astype(np.float64) - r).max())
                for x, r in zip((o, *grads), refs)]
        t_fwd = time_ms(fwd, repeats=repeats, warmup=0)
        t_bwd = time_ms(lambda: nbflash.attention_backward(do, q, k, v, o, lse,
                                                           causal=args.causal, impl=impl),
                        repeats=repeats, warmup=0)
        table.add_row(impl, f"{t_fwd:.3f}", f"{t_bwd:.3f}", f"{mem['bytes'] / 2**20:.1f}",
                      *(f"{e:.2e}" for e in errs))
        records.append({"impl": impl, "B": B, "H": H, "N": N, "d": d, "dtype": dtype.name,
                        "causal": args.causal, "fwd_ms": t_fwd, "bwd_ms": t_bwd,
                        "fwdbwd_ms": t_fwd + t_bwd, "peak_bytes": mem["bytes"],
                        **dict(zip(("err_o", "err_dq", "err_dk", "err_dv"), errs))})
    _console().print(table)
    if args.json:
        import datetime  # noqa: PLC0415
        doc = {"info": nbflash.info(), "date": datetime.date.today().isoformat(),
               "repeats": repeats, "records": records}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    if not gpu:
        print("Simulator times are of Python threads on the CPU, not of a GPU.")
    return 0


def cmd_compile(args):
    """Compile the kernels for a GPU target without a GPU and print the compiler's report."""
    if MODE == "sim":  # the mode is fixed at import: rerun this command in compile mode
        env = {**os.environ, "NBFLASH_DEVICE": "compile"}
        return subprocess.call([sys.executable, "-m", "nbflash", *sys.argv[1:]], env=env)
    from nbflash import compilecheck  # noqa: PLC0415
    from nbflash.kernels.options import Features  # noqa: PLC0415

    cc = (args.cc // 10, args.cc % 10)
    variants = compilecheck.default_variants(tuple(args.head_dims))
    variants += compilecheck.fa2_default_variants(tuple(d for d in args.head_dims if d <= 128))
    tc_dims = tuple(d for d in args.head_dims if d <= 128 and d % 16 == 0)
    variants += compilecheck.tc_default_variants(tc_dims, dtypes=("float16",))
    variants += compilecheck.tc_default_variants(tc_dims, dtypes=("float16",), causal=(True,),
                                                 features=Features(True, True, True))
    reports = []
    table = Table(title=f"kernels compiled for sm_{args.cc} (default tiles)")
    for col in ("kernel and tiles", "registers", "stack B", "spill st/ld B", "static smem B",
                "dynamic smem B", "ok"):
        table.add_column(col, justify="right")
    for variant in variants:
        r = compilecheck.compile_report(variant, cc)
        reports.append(compilecheck.as_dict(r))
        table.add_row(variant.label(), str(r.registers), str(r.stack_bytes),
                      f"{r.spill_store_bytes}/{r.spill_load_bytes}", str(r.shared_bytes),
                      str(r.dynamic_shared_bytes or ""), "yes" if r.ok() else "NO")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=1)
    _console().print(table)
    return 0 if all(compilecheck.Report(**r).ok() for r in reports) else 1


def cmd_bench(args):
    """The benchmark grid (nbflash.bench): a table on screen and a JSON file, resumable."""
    from nbflash import bench  # noqa: PLC0415

    if MODE == "compile":
        print("bench runs kernels: use NBFLASH_DEVICE=gpu or sim", file=sys.stderr)
        return 2
    console = _console()
    out = args.out or bench.default_out()
    result = bench.run(impls=args.impls, dtypes=args.dtypes, Ns=args.N, ds=args.d,
                       causal=[c == "on" for c in args.causal], passes=args.passes,
                       tokens=args.tokens, hidden=args.hidden, repeats=args.repeats,
                       warmup=args.warmup, dropout=args.dropout, padding=args.padding,
                       densities=args.density, block_size=args.block_size,
                       out=out, resume=not args.no_resume,
                       host_overhead=not args.no_host_overhead,
                       command=shlex.join(["python", "-m", "nbflash", *args.argv]),
                       console=console)
    bench.print_table(result, console)
    bench.print_host_overhead(result, console)
    console.print(f"wrote {out}", highlight=False)
    return 0


def _add_bench_parser(sub):
    from nbflash import bench  # noqa: PLC0415

    defaults = ", ".join(f"{k} {v}" for k, v in bench.defaults().items())
    p = sub.add_parser("bench", help="the FlashAttention-2 benchmark grid: every impl checked, "
                                     "then timed; a table and a JSON file (resumable)",
                       epilog=f"Defaults in {MODE} mode: {defaults}.")
    p.add_argument("--impls", nargs="+", choices=bench.known_impls(), default=None,
                   help="default: every nbflash impl, and torch, torch-flash when torch runs")
    p.add_argument("--dtypes", nargs="+", choices=bench.DTYPES, default=list(bench.DTYPES))
    p.add_argument("--N", type=int, nargs="+", default=None, help="sequence lengths")
    p.add_argument("--d", type=int, nargs="+", default=None, help="head dims")
    p.add_argument("--causal", nargs="+", choices=("off", "on"), default=["off", "on"])
    p.add_argument("--passes", nargs="+", choices=bench.PASSES, default=list(bench.PASSES))
    p.add_argument("--repeats", type=int, default=None, help="timed calls per point (median)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before them")
    p.add_argument("--tokens", type=int, default=None, help="tokens per batch: B = tokens // N")
    p.add_argument("--hidden", type=int, default=None, help="hidden size: H = hidden // d")
    p.add_argument("--dropout", type=float, default=0.0, metavar="P",
                   help=f"dropout probability of every point (seed {bench.DROPOUT_SEED})")
    p.add_argument("--padding", action="store_true",
                   help=f"key padding: key lengths drawn from U[N-{bench.PADDING_SPREAD}, N] per "
                        "batch entry (fixed seed), as in the FlashAttention paper's benchmarks")
    p.add_argument("--density", type=float, nargs="+", default=None, metavar="D",
                   help="block-sparse points with random block masks of these densities "
                        "(1.0: an all-True mask, the block-sparse code path at full density) "
                        "instead of dense ones")
    p.add_argument("--block-size", type=int, default=None,
                   help=f"block size of the --density masks (default "
                        f"{bench.GPU_DEFAULTS['block_size']} on a GPU, "
                        f"{bench.SIM_DEFAULTS['block_size']} in the simulator)")
    p.add_argument("--out", default=None,
                   help="JSON file (default figures/data/bench_<gpu>.json, bench_sim.json in "
                        "the simulator); rewritten after every point")
    p.add_argument("--no-resume", action="store_true",
                   help="start afresh instead of skipping the points already in --out")
    p.add_argument("--no-host-overhead", action="store_true",
                   help="skip the host-time-per-call measurement")
    p.set_defaults(func=cmd_bench)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m nbflash", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="device mode, GPU and package versions")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("check", help="error, time and memory of each impl at one size")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    for name in ("B", "H", "N", "d"):
        p.add_argument(f"--{name}", type=int, default=None,
                       help="default: small in the simulator, realistic on a GPU")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--repeats", type=int, default=None, help="timed runs (median)")
    p.add_argument("--json", help="also write the measurements to this file")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("compile", help="compile every fa1 kernel for a GPU (no GPU needed) and "
                                       "report registers, stack and spills")
    p.add_argument("--cc", type=int, default=90, help="compute capability, e.g. 90 (sm_90)")
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--json", help="also write the reports to this file")
    p.set_defaults(func=cmd_compile)
    _add_bench_parser(sub)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
