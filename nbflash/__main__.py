"""Command line: ``python -m nbflash info | check | compile``."""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
from rich.console import Console
from rich.table import Table

import nbflash
from nbflash import naive
from nbflash._cuda import MODE

IMPLS = ("naive", "fa1")


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

    cc = (args.cc // 10, args.cc % 10)
    variants = compilecheck.default_variants(tuple(args.head_dims))
    reports = []
    table = Table(title=f"fa1 kernels compiled for sm_{args.cc} (default tiles)")
    for col in ("kernel", "d", "Br", "Bc", "threads", "mask", "dtype", "registers", "stack B",
                "spill st/ld B", "smem B", "ok"):
        table.add_column(col, justify="right")
    for variant in variants:
        r = compilecheck.compile_report(variant, cc)
        reports.append(compilecheck.as_dict(r))
        t = variant.tiles
        table.add_row(variant.name, str(t.d), str(t.Br), str(t.Bc), str(t.threads),
                      "causal" if variant.causal else "full", variant.dtype,
                      str(r.registers), str(r.stack_bytes),
                      f"{r.spill_store_bytes}/{r.spill_load_bytes}", str(r.shared_bytes),
                      "yes" if r.ok() else "NO")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=1)
    _console().print(table)
    return 0 if all(compilecheck.Report(**r).ok() for r in reports) else 1


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
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
