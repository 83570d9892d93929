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
from .kernels.launch import DEFAULT_THREADS, SIM_THREADS, build, signature  # noqa: F401


@dataclass(frozen=True)
class Variant:
    name: str
    tiles: tiling.Tiles
    causal: bool
    dtype: str

    @property
    def cast(self):
        return self.dtype != "float32"

    def label(self):
        t = self.tiles
        return (f"{self.name} d={t.d} Br={t.Br} Bc={t.Bc} T={t.threads} "
                f"{'causal' if self.causal else 'full'} {self.dtype}")


@dataclass
class Report:
    variant: str
    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    shared_bytes: int
    local_bytes: int
    expected_shared_bytes: int

    def ok(self):
        # a stack frame means a local array went to local memory (e.g. a loop was not unrolled)
        return (self.spill_store_bytes == 0 and self.spill_load_bytes == 0
                and self.stack_bytes == 0 and self.local_bytes == 0)


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
    kernel = build(variant.name, variant.tiles, variant.causal, variant.cast)
    sig = signature(variant.name, variant.dtype, variant.cast)
    ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=cc)
    log = _link(ptx, f"sm_{cc[0]}{cc[1]}")
    pass_ = "forward" if variant.name.endswith("forward") else "backward"
    return Report(
        variant=variant.label(),
        registers=_field(r"used (\d+) registers", log),
        stack_bytes=_field(r"(\d+) bytes stack frame", log),
        spill_store_bytes=_field(r"(\d+) bytes spill stores", log),
        spill_load_bytes=_field(r"(\d+) bytes spill loads", log),
        shared_bytes=_field(r"(\d+) bytes smem", log),
        local_bytes=_field(r"(\d+) bytes lmem", log),
        expected_shared_bytes=variant.tiles.smem_bytes(pass_))


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


def as_dict(report):
    return asdict(report)


__all__ = ["Variant", "Report", "compile_report", "default_variants", "as_dict"]
