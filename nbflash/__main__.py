"""Command line: ``python -m nbflash info | check | compile | bench | report | sass |
sanitize``. Every verb that lists implementations reads the registry (nbflash.impls).

A user's error (a bad argument, inputs no impl asked for takes, an output path that cannot be
written) is one line on stderr and exit status 2, found before anything runs (nbflash.cli_util);
``check`` exits 1 when an impl's error is over the tolerance rule's bound."""

import json
import sys

import numpy as np
from rich.console import Console
from rich.table import Table

import nbflash
from nbflash import impls, naive, tolerance
from nbflash._cuda import MODE
from nbflash.cli_util import ArgumentParser, UsageError, output_file, positive_int, run_main

PROG = "python -m nbflash"


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
    table.add_row("implementations", ", ".join(impls.names())
                  + f" (auto: the first of {', '.join(impls.AUTO)} that takes the inputs)")
    _console().print(table)
    return 0


def _unsupported(xp, impl, q, k, v, do, causal):
    """Why `impl` does not take these inputs (forward or backward), or None: the API's own
    checks (nbflash.inputs), run before anything is computed."""
    from nbflash import inputs  # noqa: PLC0415

    lse = xp.zeros(q.shape[:3], np.float32)        # stand-ins for the forward's outputs
    try:
        inputs.check_forward(q, k, v, causal=causal, softmax_scale=None, impl=impl)
        inputs.check_backward(do, q, k, v, q, lse, causal=causal, softmax_scale=None,
                              impl=impl)
    except nbflash.InputError as exc:
        return str(exc)
    return None


def cmd_check(args):
    """Forward and backward of each impl at one size: max error against the float64
    reference, the tolerance rule's verdict (nbflash.tolerance, as the benchmark applies it),
    median time, and peak memory, as a table; an impl that does not take the inputs says why.
    Exit status 1 when an impl is over the tolerance; 2 (a user error) when no impl asked for
    takes the inputs."""
    from nbflash.bench import peak_memory, time_ms, to_host, xp as array_module  # noqa: PLC0415

    if MODE == "compile":
        raise UsageError("check runs kernels: use NBFLASH_DEVICE=gpu or sim")
    gpu = MODE == "gpu"
    B = (4 if gpu else 1) if args.B is None else args.B
    H = (8 if gpu else 2) if args.H is None else args.H
    N = (2048 if gpu else 32) if args.N is None else args.N
    d = (64 if gpu else 16) if args.d is None else args.d
    dtype = np.dtype(args.dtype)
    repeats = (10 if gpu else 1) if args.repeats is None else args.repeats
    xp = array_module()
    rng = np.random.default_rng(0)
    q, k, v, do = (xp.asarray(rng.standard_normal((B, H, N, d)).astype(dtype))
                   for _ in range(4))
    why_not = {impl: _unsupported(xp, impl, q, k, v, do, args.causal) for impl in args.impls}
    if all(why_not.values()):
        raise UsageError("no impl asked for takes these inputs: "
                         + "; ".join(f"{impl}: {why}" for impl, why in why_not.items()))
    q64, k64, v64, do64 = (x.astype(xp.float64) for x in (q, k, v, do))
    ro, rlse = naive.attention_forward(q64, k64, v64, causal=args.causal)
    refs = [ro, *naive.attention_backward(do64, q64, k64, v64, ro, rlse, causal=args.causal)]
    refs = [to_host(r) for r in refs]
    # the tolerance rule's baseline: the naive impl in the inputs' dtype, on the same inputs
    no, nlse = naive.attention_forward(q, k, v, causal=args.causal)
    naive_outs = [no, *naive.attention_backward(do, q, k, v, no, nlse, causal=args.causal)]
    names = ("o", "dq", "dk", "dv")
    allowed = {name: tolerance.allowed(name, tolerance.errors(to_host(x), r)[0], r, dtype)
               for name, x, r in zip(names, naive_outs, refs)}
    del no, nlse, naive_outs

    where = nbflash.info()["gpu"] if gpu else "Numba CUDA simulator (CPU)"
    title = (f"nbflash check on {where}: B={B} H={H} N={N} d={d} {dtype.name} "
             f"{'causal' if args.causal else 'full'}")
    table = Table(title=title)
    for col in ("impl", "fwd ms", "bwd ms", "peak MB fwd+bwd", "max err o", "dq", "dk", "dv",
                "tolerance"):
        table.add_column(col, justify="right")
    records, over = [], []
    for impl in args.impls:
        def fwd():
            return nbflash.attention_forward(q, k, v, causal=args.causal, impl=impl)
        try:
            if why_not[impl]:
                raise nbflash.InputError(why_not[impl])
            with peak_memory() as mem:
                o, lse = fwd()
                grads = nbflash.attention_backward(do, q, k, v, o, lse, causal=args.causal,
                                                   impl=impl)
        except nbflash.InputError as exc:
            table.add_row(impl, "-", "-", "-", f"does not run: {exc}", "", "", "", "-")
            records.append({"impl": impl, "status": "unsupported", "error": str(exc)})
            continue
        errs = [tolerance.errors(to_host(x), r)[0] for x, r in zip((o, *grads), refs)]
        failures = [f"{name} max err {e:.3g} > allowed {allowed[name]:.3g}"
                    for name, e in zip(names, errs) if not e <= allowed[name]]
        if failures:
            over.append(f"{impl} ({'; '.join(failures)})")
        t_fwd = time_ms(fwd, repeats=repeats, warmup=0)
        t_bwd = time_ms(lambda: nbflash.attention_backward(do, q, k, v, o, lse,
                                                           causal=args.causal, impl=impl),
                        repeats=repeats, warmup=0)
        table.add_row(impl, f"{t_fwd:.3f}", f"{t_bwd:.3f}", f"{mem['bytes'] / 2**20:.1f}",
                      *(f"{e:.2e}" for e in errs),
                      "over tolerance" if failures else "ok")
        records.append({"impl": impl, "B": B, "H": H, "N": N, "d": d, "dtype": dtype.name,
                        "causal": args.causal, "fwd_ms": t_fwd, "bwd_ms": t_bwd,
                        "fwdbwd_ms": t_fwd + t_bwd, "peak_bytes": mem["bytes"],
                        "status": "error" if failures else "ok",
                        **dict(zip(("err_o", "err_dq", "err_dk", "err_dv"), errs)),
                        "tolerance": dict(allowed)})
    _console().print(table)
    if args.json:
        import datetime  # noqa: PLC0415
        doc = {"info": nbflash.info(), "date": datetime.date.today().isoformat(),
               "repeats": repeats, "records": records}
        from nbflash.bench import write_json  # noqa: PLC0415  (atomic: temporary, rename)
        write_json(args.json, doc)
    if not gpu:
        print("Simulator times are of Python threads on the CPU, not of a GPU.")
    for line in over:
        print(f"{PROG} check: over tolerance: {line}", file=sys.stderr)
    return 1 if over else 0


def main(argv=None):
    """The command line; returns its exit status (a user error: one line on stderr, 2)."""
    return run_main(PROG, _main, argv)


def _main(argv):
    from nbflash.bench import cli as bench_cli  # noqa: PLC0415
    from nbflash.devtools import compilecheck, sanitize, sass  # noqa: PLC0415

    parser = ArgumentParser(prog=PROG, description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="device mode, GPU, package versions and implementations")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("check", help="error, time and memory of each impl at one size")
    p.add_argument("--impls", nargs="+", choices=impls.names(), default=list(impls.names()),
                   help="default: every registered implementation")
    for name in ("B", "H", "N", "d"):
        p.add_argument(f"--{name}", type=positive_int, default=None,
                       help="default: small in the simulator, realistic on a GPU")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--repeats", type=positive_int, default=None, help="timed runs (median)")
    p.add_argument("--json", type=output_file, help="also write the measurements to this file")
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
