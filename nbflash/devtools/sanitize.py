"""``python -m nbflash sanitize``: every registered kernel family under compute-sanitizer.

The command runs itself again under ``compute-sanitizer --tool memcheck`` and ``--tool
racecheck`` (or the tools named), in ``--cases`` mode: small forward and backward launches of
each impl with kernels (nbflash.impls), through the public API, at ragged lengths in both
directions and at head dims 64, 48 (not a power of two), 128, 59 and 256 (CASES; each impl those it
takes), causal and not, in each
dtype the impl takes (bfloat16 through torch tensors when torch is importable); the
deterministic dQ pass where an impl has one; with ``--options`` every case also with dropout,
key padding and a block mask whose 32 x 32 blocks cut across the tiles (causal only, to keep the
run short). Each case prints its max error against the float64 reference, so that the run shows
it computed something. memcheck's reports of host API calls that fail are left out
(``--report-api-errors no``): cuda-bindings probes driver entry points with cuGetProcAddress,
some of which fail by design. The command prints each tool's summary and exits 0 only when
every tool found nothing.
Under the sanitizer a case takes 10-20 s on an H200 (every family's cases, both tools: well over
ten minutes): ``--impls`` picks families, ``--time-limit`` stops a tool that runs too long.
"""

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile

import numpy as np

from .. import impls
from . import impls_argument
from .._cuda import MODE
from ..cli_util import UsageError, output_dir, positive_float

TOOLS = ("memcheck", "racecheck")
#: (Nq, Nk, d) of the cases: ragged both ways, a head dim that is not a power of two, one that
#: is not a multiple of 8 (tc pads it) and one above 128 (tc's dK/dV split, Q from shared
#: memory); each impl runs those it takes
CASES = ((77, 130, 64), (130, 77, 48), (33, 33, 128), (50, 70, 59), (70, 50, 256))


def find():
    """The compute-sanitizer executable, or None."""
    default = "/usr/local/cuda/bin/compute-sanitizer"
    return shutil.which("compute-sanitizer") or (default if os.path.exists(default) else None)


def _inputs(rng, dtype, shapes):
    import cupy as cp  # noqa: PLC0415
    if dtype != "bfloat16":
        return [cp.asarray(rng.standard_normal(s).astype(dtype)) for s in shapes]
    import torch  # noqa: PLC0415
    return [torch.from_numpy(rng.standard_normal(s).astype(np.float32)).to("cuda",
                                                                          torch.bfloat16)
            for s in shapes]


def _as_cupy_float64(x):
    import cupy as cp  # noqa: PLC0415
    if type(x).__module__.split(".")[0] == "torch":
        return cp.from_dlpack(x.detach().float()).astype(cp.float64)
    return x.astype(cp.float64)


def _options(Nq, Nk):
    """Dropout, key padding and a block mask whose 32 x 32 blocks cut across the tiles."""
    from nbflash import sparsity  # noqa: PLC0415
    mask = sparsity.random_blocks(sparsity.n_blocks(Nq, 32), sparsity.n_blocks(Nk, 32), 0.6,
                                  seed=Nq)
    return dict(dropout_p=0.2, seed=Nk, key_lengths=[Nk, max(1, Nk - 40)], block_mask=mask,
                block_size=32)


def run_case(rng, impl, dtype, Nq, Nk, d, causal, opts):
    """One case: forward, backward (and the deterministic dQ pass), and o's max error against
    the float64 reference, printed."""
    import nbflash  # noqa: PLC0415
    from nbflash import naive  # noqa: PLC0415

    q, k, v, do = _inputs(rng, dtype, [(2, 3, n, d) for n in (Nq, Nk, Nk, Nq)])
    o, lse = nbflash.attention_forward(q, k, v, causal=causal, impl=impl.name, **opts)
    nbflash.attention_backward(do, q, k, v, o, lse, causal=causal, impl=impl.name, **opts)
    if impl.deterministic == "optional":
        nbflash.attention_backward(do, q, k, v, o, lse, causal=causal, impl=impl.name,
                                   deterministic=True, **opts)
    ref_opts = dict(opts)
    if opts.get("dropout_p"):
        ref_opts["keep"] = nbflash.dropout_mask(2, 3, Nq, Nk, opts["dropout_p"], opts["seed"])
        del ref_opts["seed"]
    ref = naive.attention_forward(*(_as_cupy_float64(x) for x in (q, k, v)), causal=causal,
                                  **ref_opts)[0]
    err = float(abs(_as_cupy_float64(o) - ref).max())
    print(f"{impl.name} {dtype} Nq={Nq} Nk={Nk} d={d} causal={causal}"
          f"{' options' if opts else ''}: max |o - ref| {err:.2e}", flush=True)


def run_cases(names, with_options):
    """The launches the sanitizer watches (see the module docstring)."""
    rng = np.random.default_rng(0)
    for name in names:
        impl = impls.get(name)
        for dtype in impl.dtypes:
            if dtype == "bfloat16" and importlib.util.find_spec("torch") is None:
                print(f"{name} bfloat16: skipped (bfloat16 needs torch tensors)")
                continue
            for Nq, Nk, d in CASES:
                if not impl.takes(dtype, d):
                    continue
                for causal in ((True,) if with_options else (False, True)):
                    run_case(rng, impl, dtype, Nq, Nk, d, causal,
                             _options(Nq, Nk) if with_options else {})


def summary(log):
    """The lines of a sanitizer log that say what it found."""
    return [line for line in log.splitlines()
            if re.search(r"(ERROR|RACECHECK|LEAK|INITCHECK|SYNCCHECK) SUMMARY", line)]


def cmd_sanitize(args):
    names = args.impls or [i.name for i in impls.kernels()]
    if args.cases:
        if MODE != "gpu":
            raise UsageError("sanitize runs kernels on the GPU (NBFLASH_DEVICE=gpu)")
        run_cases(names, args.options)
        return 0
    if MODE != "gpu":
        raise UsageError("compute-sanitizer needs the GPU (NBFLASH_DEVICE=gpu)")
    exe = find()
    if exe is None:
        raise UsageError("compute-sanitizer not found (PATH, /usr/local/cuda/bin)")
    clean = True
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="nbflash-sanitize-")
    os.makedirs(log_dir, exist_ok=True)
    for tool in args.tools:
        cmd = [exe, "--tool", tool, "--error-exitcode", "99"]
        if tool == "memcheck":
            cmd += ["--report-api-errors", "no"]
        cmd += [sys.executable, "-m", "nbflash", "sanitize", "--cases", "--impls", *names]
        cmd += ["--options"] if args.options else []
        path = os.path.join(log_dir, f"{tool}.log")
        with open(path, "w") as log:           # streamed: a run cut short keeps its log
            child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
            try:
                rc = child.wait(timeout=args.time_limit)
            except subprocess.TimeoutExpired:    # the sanitizer and the program it runs
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                rc = None
        with open(path) as f:
            text = f.read()
        cases = sum(1 for line in text.splitlines() if "max |o - ref|" in line)
        if rc is None:
            clean = False
            print(f"{tool}: did not finish within {args.time_limit} s ({cases} cases done); "
                  f"log {path}", flush=True)
            continue
        clean &= rc == 0
        print(f"{tool}: exit status {rc}, {cases} cases; "
              + ("; ".join(summary(text)) or text[-500:]) + f"; log {path}", flush=True)
    return 0 if clean else 1


def add_parser(sub):
    p = sub.add_parser("sanitize", help="every kernel family's small launches under "
                                        "compute-sanitizer memcheck and racecheck (GPU)")
    impls_argument(p)
    p.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    p.add_argument("--options", action="store_true",
                   help="with dropout, key padding and a block mask (causal only)")
    p.add_argument("--log-dir", type=output_dir, default=None, help="write each tool's log there (default: a "
                                                    "temporary folder, named in the output)")
    p.add_argument("--time-limit", type=positive_float, default=None, metavar="SECONDS",
                   help="stop a tool that runs longer than this")
    p.add_argument("--cases", action="store_true",
                   help="only run the launches (what the sanitizer runs)")
    p.set_defaults(func=cmd_sanitize)
