"""``python -m nbflash sass``: what the driver's compiler made of every kernel family's kernels.

On the GPU, each registered impl's kernels (nbflash.impls; the variants of the compile check,
nbflash.devtools.compilecheck) are compiled by the driver for this device as their plans build
them, and their SASS is read (``inspect_sass``, nvdisasm): registers per thread, local memory,
and a count of the instructions that say whether the kernel is what it should be: tensor-core
mma (HMMA), ldmatrix (LDSM), cp.async (LDGSTS), FMAs, shared and global loads and stores,
barriers, the special-function unit (MUFU), and local-memory loads and stores (LDL, STL: a
kernel that spills has them). The device's ptxas and the local nvJitLink can disagree at the
register margin, so this is the check that counts for speed.
"""

import re

from .._cuda import MODE, cuda
from ..cli_util import UsageError, make_parent, output_file, positive_int
from ..kernels.common.options import Features
from . import compilecheck, impls_argument

OPCODES = ("HMMA", "LDSM", "LDGSTS", "FFMA", "LDS", "STS", "LDG", "STG", "BAR", "MUFU", "LDL",
           "STL")


def sass_of(variant):
    """(SASS text, registers, local bytes) of `variant` compiled for this GPU."""
    from numba import types  # noqa: PLC0415

    spec = variant.spec()
    sig = types.void(*spec.argtypes)
    opts = {"launch_bounds": spec.launch_bounds} if spec.launch_bounds else {}
    disp = cuda.jit(sig, **opts)(spec.fn)
    kernel = disp.overloads[disp.signatures[0]]
    return kernel.inspect_sass(), kernel.regs_per_thread, kernel.local_mem_per_thread


def counts(sass):
    """{opcode: how often it appears} for OPCODES."""
    return {op: len(re.findall(rf"\b{op}(?:\.|\b)", sass)) for op in OPCODES}


def cmd_sass(args):
    if MODE != "gpu":
        raise UsageError("sass reads what the driver compiles for this GPU: it needs one "
                         "(NBFLASH_DEVICE=gpu)")
    features = Features(True, True, True) if args.options else Features()
    variants = compilecheck.variants(args.impls, tuple(args.head_dims), features=features,
                                     causal=(False, True))
    print(f"{'kernel and tiles':<96} {'regs':>4} {'local':>5} "
          + " ".join(f"{op:>6}" for op in OPCODES), flush=True)
    dump, bad = [], []
    for v in variants:     # a line as each kernel is compiled (a few seconds each)
        sass, regs, local = sass_of(v)
        c = counts(sass)
        print(f"{v.label():<96} {regs:>4} {local:>5} "
              + " ".join(f"{c[op]:>6}" for op in OPCODES), flush=True)
        dump.append(f"// ===== {v.label()}\n{sass}")
        if c["LDL"] or c["STL"] or local:
            bad.append(v.label())
    if args.out:
        make_parent(args.out)
        with open(args.out, "w") as f:
            f.write("\n".join(dump))
    for label in bad:
        print(f"local memory in {label}")
    return 1 if bad else 0


def add_parser(sub):
    p = sub.add_parser("sass", help="registers, local memory and instruction counts of every "
                                    "kernel family's kernels as the driver compiles them (GPU)")
    impls_argument(p)
    p.add_argument("--head-dims", type=positive_int, nargs="+", default=[64, 128])
    p.add_argument("--options", action="store_true",
                   help="the kernels with dropout, key padding and a block mask")
    p.add_argument("--out", type=output_file, default=None,
                   help="also write every kernel's SASS to this file")
    p.set_defaults(func=cmd_sass)
