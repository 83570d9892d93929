"""Compile kernels for a real GPU target without a GPU, and read the compiler's resource report.

Numba's NVVM turns a kernel into PTX for a chosen compute capability; nvJitLink (from
numba-cuda[cu12] / [cu13]) assembles that PTX into a cubin and reports, per kernel, the registers,
stack frame, spill stores and loads, shared memory and local memory. This is how CI checks that
GPU-only code compiles and does not spill. Needs the real CUDA target: NBFLASH_DEVICE=compile
(no GPU needed) or gpu; ``python -m nbflash compile`` sets it.
"""

import re
from dataclasses import asdict, dataclass

from . import tiling
from ._cuda import SIMULATOR, cuda
from .kernels.options import Features
from .kernels.launch import (DEFAULT_THREADS, SIM_THREADS, build, fa2_function,  # noqa: F401
                             signature, tc_function, tc_launch_bounds)

#: Largest dynamic shared memory a block may opt in to on sm_90 (H100, H200)
SM90_SMEM_OPTIN = 232448


@dataclass(frozen=True)
class Variant:
    """A kernel to compile: fa1_forward / fa1_backward with tiling.Tiles, or fa2_forward /
    fa2_dkdv / fa2_dq with tiling.RegTiles (fa2_dkdv with atomic dQ)."""

    name: str
    tiles: object
    causal: bool
    dtype: str
    #: nbflash.kernels.options.Features: (dropout, padding, sparse)
    features: Features = Features()

    @property
    def cast(self):
        return self.dtype != "float32"

    def label(self):
        t = self.tiles
        mask = "causal" if self.causal else "full"
        mask += "".join(f" {n}" for n, on in self.features._asdict().items() if on)
        if self.name.startswith("tc"):
            return (f"{self.name} d={t.d} warps={t.warps} mtiles={t.mtiles} cols={t.cols} "
                    f"stages={t.stages} min_blocks={t.min_blocks} {mask} {self.dtype}")
        if self.name.startswith("fa2"):
            return (f"{self.name} d={t.d} R={t.R} C={t.C} {t.tm}x{t.tn} stages={t.stages} "
                    f"T={t.threads} {mask} {self.dtype}")
        return f"{self.name} d={t.d} Br={t.Br} Bc={t.Bc} T={t.threads} {mask} {self.dtype}"


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
    dynamic_shared_bytes: int = 0   # fa2: what a launch asks for

    def ok(self):
        # a stack frame means a local array went to local memory (e.g. a loop was not unrolled)
        return (self.spill_store_bytes == 0 and self.spill_load_bytes == 0
                and self.stack_bytes == 0 and self.local_bytes == 0
                and self.dynamic_shared_bytes <= SM90_SMEM_OPTIN)


def _link(ptx, arch):
    from cuda.bindings import nvjitlink  # noqa: PLC0415

    h = nvjitlink.create(2, [f"-arch={arch}", "-verbose"])
    try:
        data = ptx.encode()
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


def compile_report(variant, cc=(9, 0)):
    """Compile `variant` for compute capability `cc` and return its resource Report."""
    if SIMULATOR:
        raise RuntimeError("compiling for a GPU target needs NBFLASH_DEVICE=compile (or gpu); "
                           "this process runs the CUDA simulator")
    if variant.name.startswith("fa2"):
        return _fa2_report(variant, cc)
    if variant.name.startswith("tc"):
        return _tc_report(variant, cc)
    kernel = build(variant.name, variant.tiles, variant.causal, variant.cast, variant.features)
    sig = signature(variant.name, variant.dtype, variant.cast)
    ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=cc)
    log = _link(ptx, f"sm_{cc[0]}{cc[1]}")
    pass_ = "forward" if variant.name.endswith("forward") else "backward"
    return _report(variant, log, variant.tiles.smem_bytes(pass_))


def _fa2_report(variant, cc):
    from numba import types  # noqa: PLC0415

    kind = variant.name.removeprefix("fa2_")
    fn, argtypes = fa2_function(kind, variant.tiles, variant.causal, variant.dtype, atomic=True,
                                features=variant.features)
    ptx, _ = cuda.compile_ptx(fn, types.void(*argtypes), cc=cc)
    log = _link(ptx, f"sm_{cc[0]}{cc[1]}")
    return _report(variant, log, 0, variant.tiles.smem_bytes(kind, variant.features.dropout))


def _tc_report(variant, cc):
    from numba import types  # noqa: PLC0415

    kind = variant.name.removeprefix("tc_")
    fn, argtypes = tc_function(kind, variant.tiles, variant.causal, variant.dtype,
                               variant.features)
    ptx, _ = cuda.compile_ptx(fn, types.void(*argtypes), cc=cc,
                              launch_bounds=tc_launch_bounds(variant.tiles, variant.features))
    log = _link(ptx, f"sm_{cc[0]}{cc[1]}")
    return _report(variant, log, 0, variant.tiles.smem_bytes(kind, variant.features.dropout))


def _report(variant, log, expected_shared, dynamic_shared=0):
    return Report(
        variant=variant.label(),
        registers=_field(r"used (\d+) registers", log),
        stack_bytes=_field(r"(\d+) bytes stack frame", log),
        spill_store_bytes=_field(r"(\d+) bytes spill stores", log),
        spill_load_bytes=_field(r"(\d+) bytes spill loads", log),
        shared_bytes=_field(r"(\d+) bytes smem", log),
        local_bytes=_field(r"(\d+) bytes lmem", log),
        expected_shared_bytes=expected_shared,
        dynamic_shared_bytes=dynamic_shared)


def default_variants(head_dims=(32, 64, 96, 128)):
    """The kernels a GPU run builds by default (largest M that fits), for each head dim."""
    out = []
    for d in head_dims:
        for name, pass_ in (("fa1_forward", "forward"), ("fa1_backward", "backward")):
            M = tiling.default_M(d, pass_, "paper")
            tiles = tiling.tiles_for(M, d, "paper", DEFAULT_THREADS)
            for causal in (False, True):
                for dtype in ("float32", "float16"):
                    out.append(Variant(name, tiles, causal, dtype))
    return out


def _table_variants(prefix, kernels, tiles_of, head_dims, dtypes, causal, features):
    out = []
    for d in head_dims:
        for kind in kernels:
            t = tiles_of(kind, d)
            out += [Variant(f"{prefix}_{kind}", t, c, dt, features) for c in causal
                    for dt in dtypes]
    return out


def fa2_default_variants(head_dims=(64, 128), dtypes=("float32", "float16"),
                         causal=(False, True), features=Features()):
    """fa2's GPU kernels (nbflash.tiling.GPU_FA2_TILES), as the benchmark runs them."""
    return _table_variants("fa2", tiling.FA2_KERNELS,
                           lambda k, d: tiling.fa2_tiles(k, d, tiling.GPU_FA2_TILES),
                           head_dims, dtypes, causal, features)


def tc_default_variants(head_dims=(64, 128), dtypes=("float16", "bfloat16"),
                        causal=(False, True), features=Features()):
    """tc's GPU kernels (nbflash.tiling.GPU_TC_TILES), as the benchmark runs them."""
    return _table_variants("tc", tiling.TC_KERNELS,
                           lambda k, d: tiling.tc_tiles(k, d, tiling.GPU_TC_TILES),
                           head_dims, dtypes, causal, features)


def as_dict(report):
    return asdict(report)


__all__ = ["Variant", "Report", "compile_report", "default_variants", "fa2_default_variants",
           "tc_default_variants", "as_dict"]
