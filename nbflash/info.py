"""What nbflash runs on: device mode, GPU, and the versions of the packages it uses."""

import platform
from importlib import metadata

from ._cuda import MODE, cuda
from ._version import __version__


def _version(dist):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions():
    cupy = next((v for v in (_version(d) for d in ("cupy-cuda13x", "cupy-cuda12x", "cupy"))
                 if v), None)
    torch = _version("torch")
    return {"nbflash": _version("nbflash") or __version__,
            "python": platform.python_version(), "numpy": _version("numpy"),
            "numba": _version("numba"), "numba-cuda": _version("numba-cuda"),
            "cupy": cupy, "torch": torch}


def info():
    """A dict: mode ("gpu", "sim" or "compile"), GPU name, compute capability, shared memory
    per block (default and opt-in maximum, bytes), SM count, and package versions."""
    out = {"mode": MODE, "gpu": None, "compute_capability": None,
           "shared_memory_per_block": None, "shared_memory_per_block_optin": None,
           "multiprocessors": None}
    if MODE == "gpu":
        dev = cuda.get_current_device()
        name = dev.name
        out.update(
            gpu=name.decode() if isinstance(name, bytes) else str(name),
            compute_capability=".".join(map(str, dev.compute_capability)),
            shared_memory_per_block=dev.MAX_SHARED_MEMORY_PER_BLOCK,
            shared_memory_per_block_optin=dev.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            multiprocessors=dev.MULTIPROCESSOR_COUNT)
    out["versions"] = versions()
    return out
