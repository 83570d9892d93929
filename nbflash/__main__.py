"""Command line: ``python -m nbflash info | check | compile | bench | report | sass |
sanitize``. Every verb that lists implementations reads the registry (nbflash.impls)."""

import argparse
import json
import sys

import numpy as np
from rich.console import Console
from rich.table import Table

import nbflash
from nbflash import impls, naive
from nbflash._cuda import MODE


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
    table.add_row("implementations", ", ".join(impls.names()) + f" (auto: {impls.AUTO[0]})")
    _console().print(table)
    return 0


def cmd_check(args):
    """Forward and backward of each impl at one size: max error against the float64
    reference, median time, and peak memory, as a table; an impl that does not take the
    inputs says why."""
    from nbflash.bench import peak_memory, time_ms, to_host, xp as array_module  # noqa: PLC0415

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
    xp = array_module()
    rng = np.random.default_rng(0)
    q, k, v, do = (xp.asarray(rng.standard_normal((B, H, N, d)).astype(dtype))
                   for _ in range(4))
    q64, k64, v64, do64 = (x.astype(xp.float64) for x in (q, k, v, do))
    ro, rlse = naive.attention_forward(q64, k64, v64, causal=args.causal)
    refs = [ro, *naive.attention_backward(do64, q64, k64, v64, ro, rlse, causal=args.causal)]
    refs = [to_host(r) for r in refs]

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
        try:
            with peak_memory() as mem:
                o, lse = fwd()
                grads = nbflash.attention_backward(do, q, k, v, o, lse, causal=args.causal,
                                                   impl=impl)
        except nbflash.InputError as exc:
            table.add_row(impl, "-", "-", "-", f"does not run: {exc}", "", "", "")
            records.append({"impl": impl, "status": "unsupported", "error": str(exc)})
            continue
        errs = [float(np.abs(to_host(x).astype(np.float64) - r).max())
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


def main(argv=None):
    from nbflash.bench import cli as bench_cli  # noqa: PLC0415
    from nbflash.devtools import compilecheck, sanitize, sass  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="python -m nbflash", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="device mode, GPU, package versions and implementations")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("check", help="error, time and memory of each impl at one size")
    p.add_argument("--impls", nargs="+", choices=impls.names(), default=list(impls.names()),
                   help="default: every registered implementation")
    for name in ("B", "H", "N", "d"):
        p.add_argument(f"--{name}", type=int, default=None,
                       help="default: small in the simulator, realistic on a GPU")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--repeats", type=int, default=None, help="timed runs (median)")
    p.add_argument("--json", help="also write the measurements to this file")
    p.set_defaults(func=cmd_check)
    compilecheck.add_parser(sub)
    bench_cli.add_parsers(sub)
    sass.add_parser(sub)
    sanitize.add_parser(sub)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
