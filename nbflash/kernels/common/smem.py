"""A kernel's shared memory as a plan of named regions.

Each family's tiles describe their kernels' shared memory with a :class:`SmemPlan`: the regions
in the order they are laid out, each a number of elements of some size, or a sub-plan repeated
(the pipeline stages of streamed tiles). Both numbers a kernel depends on come from the one plan:
the byte count a launch asks for (:attr:`SmemPlan.nbytes`) and the offsets the kernel indexes
its one dynamic shared array with, as compile-time constants (:meth:`SmemPlan.offset`). fa1's
kernels declare static shared arrays instead; their plan's regions carry the arrays' shapes
(:meth:`SmemPlan.shape`).

    stage = SmemPlan(4, ("K", C * ds), ("V", C * ds))
    plan = SmemPlan(4, ("Q", R * ds), ("KV", stage, 2), ("P", R * ps))
    plan.offset("KV")            # R * ds: where stage 0 begins (stage s: + s * stage.elements)
    plan.sub("KV") is stage; stage.offset("V")    # C * ds, within a stage
    plan.nbytes                  # 4 * (R * ds + 2 * 2 * C * ds + R * ps)
"""

import math

from ..._cuda import shared_memory_per_block
from ...errors import InputError


class SmemPlan:
    """Regions laid out one after the other. `unit`: the bytes of the element that offsets and
    :attr:`elements` count (4 where the kernel indexes a float32 array, 2 for uint16).
    Each region is (name, count[, itemsize]) with itemsize defaulting to `unit`, count an int
    or a shape tuple, or (name, SmemPlan, repeats)."""

    def __init__(self, unit, *regions):
        self.unit = unit
        self._at = {}        # name -> (byte offset, bytes, the count or shape, or the sub-plan)
        offset = 0
        for name, count, *rest in regions:
            if isinstance(count, SmemPlan):
                nbytes, shape = count.nbytes * (rest[0] if rest else 1), count
            else:
                shape = count
                nbytes = math.prod(count if isinstance(count, tuple) else (count,)) \
                    * (rest[0] if rest else unit)
            if name in self._at:
                raise ValueError(f"region {name!r} twice")
            self._at[name] = (offset, nbytes, shape)
            offset += nbytes
        self.nbytes = offset

    @property
    def elements(self):
        """The whole plan in units."""
        return self._units(self.nbytes, self.unit)

    def offset(self, name, unit=None):
        """Where region `name` begins, in elements of `unit` bytes (default: the plan's)."""
        return self._units(self._at[name][0], unit or self.unit)

    def shape(self, name):
        """The count or shape region `name` was given (fa1: a static shared array's shape)."""
        return self._at[name][2]

    def sub(self, name):
        """The plan of each repeat of region `name` (a pipeline stage, say)."""
        sub = self._at[name][2]
        if not isinstance(sub, SmemPlan):
            raise ValueError(f"region {name!r} has no sub-plan")
        return sub

    def regions(self):
        """[(name, byte offset, bytes)] in order, for docstrings and reports."""
        return [(n, at, nb) for n, (at, nb, _) in self._at.items()]

    @staticmethod
    def _units(nbytes, unit):
        if nbytes % unit:
            raise ValueError(f"{nbytes} bytes are not whole elements of {unit} bytes")
        return nbytes // unit

    def __repr__(self):
        return "SmemPlan(" + ", ".join(f"{n}@{at}:{nb}B" for n, at, nb in self.regions()) + ")"


def check_fits(impl, kernels, tiles_of, d, dropout=False):
    """On the GPU: an InputError when the default tiles (tiles_of(kernel, d)) of one of `impl`'s
    `kernels` at head dim d (with dropout's keep bits) need more shared memory than a block may
    opt in to. Without a GPU nothing is known to check."""
    limits = shared_memory_per_block()
    if limits is None:
        return
    most = limits[1]
    for kernel in kernels:
        need = tiles_of(kernel, d).smem_bytes(kernel, dropout)
        if need > most:
            raise InputError(f"{impl}'s {kernel} kernel at head_dim {d} needs {need} bytes of "
                             f"shared memory; this GPU gives a block at most {most}")
