"""Compile kernels for a real GPU target without a GPU, and read the compiler's resource report.

Numba's NVVM turns a kernel into PTX for a chosen compute capability; nvJitLink (from
numba-cuda[cu12] / [cu13]) assembles that PTX into a cubin and reports, per kernel, the registers,
stack frame, spill stores and loads, shared memory and local memory. This is how CI checks that
GPU-only code compiles and does not spill. Every registered impl with kernels (nbflash.impls) is
covered: a :class:`Variant` names an impl, one of its family's kernels, tiles and the
compile-time constants, and the family's ``spec`` gives the kernel to compile, exactly as its
launch plan builds it. Needs the real CUDA target: NBFLASH_DEVICE=compile (no GPU needed) or
gpu; ``python -m nbflash compile`` sets it.

:func:`ptx` gives a variant's PTX, and :func:`normalized_ptx` that text with the names that
depend on where the code lives (mangled symbols, shared-array counters) replaced, so that the
PTX of the same kernel before and after code is moved or renamed compares equal:
``python -m nbflash compile --ptx FILE`` writes it, ``--same-ptx-as FILE`` compares with it.
"""

import re
from dataclasses import asdict, dataclass

from .. import impls
from . import impls_argument
from ..bench.store import write_json
from ..cli_util import input_file, output_file, positive_int
from .._cuda import SIMULATOR, cuda
from ..kernels.common.options import Features

#: Largest dynamic shared memory a block may opt in to on sm_90 (H100, H200)
SM90_SMEM_OPTIN = 232448
#: every option on: dropout, key padding and a block mask
ALL_OPTIONS = Features(dropout=True, padding=True, sparse=True)


@dataclass(frozen=True)
class Variant:
    """A kernel to compile: `kernel` of registered impl `impl` (nbflash.impls), with the family's
    tiles, the causal flag, the storage dtype and the options' features."""

    impl: str
    kernel: str
    tiles: object
    causal: bool
    dtype: str
    #: nbflash.kernels.common.options.Features: (dropout, padding, sparse)
    features: Features = Features()

    @property
    def name(self):
        return f"{self.impl}_{self.kernel}"

    def spec(self):
        """The kernel as the impl's plan builds it (nbflash.kernels.common.factory.Spec)."""
        family = impls.get(self.impl).family
        return family.spec(self.kernel, self.tiles, self.causal, self.dtype, self.features)

    def label(self):
        mask = "causal" if self.causal else "full"
        mask += "".join(f" {n}" for n, on in self.features._asdict().items() if on)
        return f"{self.name} {self.tiles.label()} {mask} {self.dtype}"


@dataclass
class Report:
    variant: str
    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    shared_bytes: int
    local_bytes: int
    expected_shared_bytes: int      # static shared memory nbflash counts
    dynamic_shared_bytes: int = 0   # what a launch asks for

    def ok(self):
        # a stack frame means a local array went to local memory (e.g. a loop was not unrolled)
        return (self.spill_store_bytes == 0 and self.spill_load_bytes == 0
                and self.stack_bytes == 0 and self.local_bytes == 0
                and self.dynamic_shared_bytes <= SM90_SMEM_OPTIN)


def _link(ptx_text, arch):
    from cuda.bindings import nvjitlink  # noqa: PLC0415

    h = nvjitlink.create(2, [f"-arch={arch}", "-verbose"])
    try:
        data = ptx_text.encode()
        try:
            nvjitlink.add_data(h, nvjitlink.InputType.PTX, data, len(data), "kernel.ptx")
            nvjitlink.complete(h)
        except Exception as exc:  # the error log says why
            raise RuntimeError(f"nvJitLink failed: {exc}\n{_log(nvjitlink, h, 'error')}") from exc
        return _log(nvjitlink, h, "info")
    finally:
        nvjitlink.destroy(h)


def _log(nvjitlink, h, which):
    size = getattr(nvjitlink, f"get_{which}_log_size")(h)
    buf = bytearray(size)
    getattr(nvjitlink, f"get_{which}_log")(h, buf)
    return buf.decode(errors="replace")


def _field(pattern, text):
    m = re.search(pattern, text)
    return int(m.group(1)) if m else 0


def ptx(variant, cc=(9, 0)):
    """The PTX of `variant` for compute capability `cc`."""
    if SIMULATOR:
        raise RuntimeError("compiling for a GPU target needs NBFLASH_DEVICE=compile (or gpu); "
                           "this process runs the CUDA simulator")
    from numba import types  # noqa: PLC0415

    spec = variant.spec()
    opts = {"launch_bounds": spec.launch_bounds} if spec.launch_bounds else {}
    return cuda.compile_ptx(spec.fn, types.void(*spec.argtypes), cc=cc, **opts)[0]


def compile_report(variant, cc=(9, 0)):
    """Compile `variant` for compute capability `cc` and return its resource Report."""
    spec = variant.spec()
    log = _link(ptx(variant, cc), f"sm_{cc[0]}{cc[1]}")
    return Report(
        variant=variant.label(),
        registers=_field(r"used (\d+) registers", log),
        stack_bytes=_field(r"(\d+) bytes stack frame", log),
        spill_store_bytes=_field(r"(\d+) bytes spill stores", log),
        spill_load_bytes=_field(r"(\d+) bytes spill loads", log),
        shared_bytes=_field(r"(\d+) bytes smem", log),
        local_bytes=_field(r"(\d+) bytes lmem", log),
        expected_shared_bytes=spec.static_smem,
        dynamic_shared_bytes=spec.smem)


_MANGLED = re.compile(r"_Z\w+?(?=_param_\d+\b|[^\w]|$)")
_SMEM = re.compile(r"_cudapy_smem_\d+")


def normalized_ptx(text):
    """PTX with what depends on where the code lives replaced by placeholders in order of first
    appearance: the mangled names (they spell the module and function, and a hash of the
    closure) and the counters Numba numbers static shared arrays with; the compiler's header
    comments are dropped."""
    names = {}

    def stand_in(prefix):
        def sub(m):
            return names.setdefault(m.group(0), f"{prefix}{len(names)}")
        return sub

    body = "\n".join(line for line in text.splitlines() if not line.startswith("//"))
    return _SMEM.sub(stand_in("SMEM"), _MANGLED.sub(stand_in("SYM"), body))


def variants(impl_names=None, head_dims=(64, 128), dtypes=None, causal=(False, True),
             features=Features()):
    """The kernels a GPU run builds by default: for each impl with kernels (or those named),
    each of its family's kernels with its default tiles at each head dim it takes, in each of
    `dtypes` it takes (None: every dtype its kernels are compiled for)."""
    out = []
    for impl in impls.kernels():
        if impl_names is not None and impl.name not in impl_names:
            continue
        family = impl.family
        for d in head_dims:
            for kernel in family.kernels:
                if not any(impl.takes(dt, d) for dt in family.dtypes):
                    continue
                t = family.tiles(kernel, d)
                out += [Variant(impl.name, kernel, t, c, dt, features) for c in causal
                        for dt in (dtypes or family.dtypes)
                        if dt in family.dtypes and impl.takes(dt, d)]
    return out


def as_dict(report):
    return asdict(report)


__all__ = ["Variant", "Report", "compile_report", "ptx", "normalized_ptx", "variants",
           "as_dict", "ALL_OPTIONS", "SM90_SMEM_OPTIN"]


def cmd_compile(args):
    """Compile the kernels for a GPU target without a GPU and print the compiler's report."""
    import os  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    if SIMULATOR:  # the mode is fixed at import: rerun this command in compile mode
        env = {**os.environ, "NBFLASH_DEVICE": "compile"}
        return subprocess.call([sys.executable, "-m", "nbflash", *args.argv], env=env)
    cc = (args.cc // 10, args.cc % 10)
    old = _load_ptx_file(args.same_ptx_as) if args.same_ptx_as else None   # before compiling
    chosen = variants(args.impls, tuple(args.head_dims))
    if args.options:
        chosen += variants(args.impls, tuple(args.head_dims), causal=(True,),
                           features=ALL_OPTIONS)
    reports, texts = [], {}
    table = Table(title=f"kernels compiled for sm_{args.cc} (default tiles)")
    for col in ("kernel and tiles", "registers", "stack B", "spill st/ld B", "static smem B",
                "dynamic smem B", "ok"):
        table.add_column(col, justify="right")
    for variant in chosen:
        r = compile_report(variant, cc)
        reports.append(as_dict(r))
        if args.ptx or args.same_ptx_as:
            texts[variant.label()] = ptx(variant, cc)
        table.add_row(variant.label(), str(r.registers), str(r.stack_bytes),
                      f"{r.spill_store_bytes}/{r.spill_load_bytes}", str(r.shared_bytes),
                      str(r.dynamic_shared_bytes or ""), "yes" if r.ok() else "NO")
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    if args.json:
        write_json(args.json, reports)
    if args.ptx:
        write_json(args.ptx, texts)
    status = 0 if all(Report(**r).ok() for r in reports) else 1
    if args.same_ptx_as:
        missing = sorted(set(texts) - set(old))
        differ = sorted(k for k in texts if k in old
                        and normalized_ptx(texts[k]) != normalized_ptx(old[k]))
        print(f"PTX compared with {args.same_ptx_as}: {len(texts) - len(missing) - len(differ)}"
              f" identical, {len(differ)} differ, {len(missing)} not there")
        for k in differ:
            print(f"  differs: {k}")
        status = status or (1 if differ or missing else 0)
    return status


def _load_ptx_file(path):
    """The {kernel label: PTX} of a file --ptx wrote; a UsageError (one line) for anything else,
    found before minutes of compiling."""
    import json  # noqa: PLC0415

    from ..cli_util import UsageError  # noqa: PLC0415
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--same-ptx-as {path}: cannot be read as JSON ({exc})") from None
    if not isinstance(doc, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                            for k, v in doc.items()):
        raise UsageError(f"--same-ptx-as {path}: not a file that --ptx wrote "
                         f"(a JSON object of kernel names to PTX)")
    return doc


def compute_capability(text):
    """argparse type: a compute capability as its major and minor digits, 50 to 199 (90:
    sm_90)."""
    import argparse  # noqa: PLC0415

    value = positive_int(text)
    if not 50 <= value <= 199:
        raise argparse.ArgumentTypeError(f"must be a compute capability as two or three digits "
                                         f"(major, minor), 50 to 199, e.g. 90; got {text!r}")
    return value


def add_parser(sub):
    p = sub.add_parser("compile", help="compile every kernel family's kernels for a GPU (no GPU "
                                       "needed) and report registers, stack and spills")
    p.add_argument("--cc", type=compute_capability, default=90,
                   help="compute capability, e.g. 90 (sm_90)")
    p.add_argument("--head-dims", type=positive_int, nargs="+", default=[64, 128])
    impls_argument(p)
    p.add_argument("--options", action="store_true",
                   help="also the causal kernels with dropout, key padding and a block mask")
    p.add_argument("--json", type=output_file, help="also write the reports to this file")
    p.add_argument("--ptx", type=output_file, metavar="FILE",
                   help="also write each kernel's PTX to this JSON file")
    p.add_argument("--same-ptx-as", type=input_file, metavar="FILE",
                   help="compare each kernel's PTX, names normalized, with a file --ptx wrote "
                        "(exit status 1 if any differs)")
    p.set_defaults(func=cmd_compile)
