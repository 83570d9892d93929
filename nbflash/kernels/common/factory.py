"""The one place kernels are built, and the host side every family's launch plan shares.

Tile sizes, head dim, causal flag, options and storage dtype are compile-time constants of a
kernel, so each combination is built once and cached. A family describes a kernel for a set of
constants by a :class:`Spec` (its plan module's ``spec``): the Python kernel its maker returns,
the Numba argument types, the dynamic shared memory a launch asks for and the launch bounds.
From that one description :func:`kernel` compiles it (fa2, tc: for that signature, launched
through nbflash.kernels.common.fastlaunch), :func:`dispatcher` makes a Numba dispatcher (fa1:
typed at its first launch, launched by :func:`launch`), and the compile check
(nbflash.devtools.compilecheck) compiles it to PTX without a GPU.
"""

import functools
from dataclasses import dataclass

from ..._cuda import SIMULATOR, cuda
from .fastlaunch import Kernel, switch_interval
from .layouts import storage


@dataclass(frozen=True)
class Spec:
    """A kernel for one set of compile-time constants: `fn` (the Python kernel), `argtypes`
    (its Numba argument types), `smem` (bytes of dynamic shared memory a launch may ask for),
    `launch_bounds` ((threads, min blocks per SM), or None) and `static_smem` (bytes of the
    static shared arrays it declares, as the compile check expects to find them)."""

    fn: object
    argtypes: tuple
    smem: int = 0
    launch_bounds: tuple = None
    static_smem: int = 0


@functools.lru_cache(maxsize=None)
def kernel(make_spec, *constants):
    """make_spec(*constants)'s kernel compiled for its signature (a fastlaunch.Kernel)."""
    spec = make_spec(*constants)
    return Kernel(spec.fn, spec.argtypes, max_smem=spec.smem, launch_bounds=spec.launch_bounds)


@functools.lru_cache(maxsize=None)
def dispatcher(make_spec, *constants):
    """make_spec(*constants)'s kernel as a Numba dispatcher (compiled at its first launch for
    the argument types it gets)."""
    return cuda.jit(make_spec(*constants).fn)


def launch(kernel, grid, threads, *args):
    """kernel[grid, threads](*args) through Numba; in the simulator with a short GIL switch
    interval (nbflash.kernels.common.fastlaunch)."""
    if not SIMULATOR:
        kernel[grid, threads](*args)
        return
    with switch_interval():
        kernel[grid, threads](*args)


def flat(arrays):
    """In the simulator: the 1-D views of the arrays' memory the fast-launched kernels are
    typed for (nbflash.kernels.common.layouts.storage; on the GPU the launch only takes the
    pointers)."""
    if SIMULATOR:
        return tuple(storage(x) for x in arrays)
    return arrays
