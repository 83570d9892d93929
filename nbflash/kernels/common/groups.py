"""Synchronisation and registers below the block, for warp-specialised kernels (fa3, issue 15):
a producer warpgroup and consumer warpgroups run different code, so nothing they share may wait
for the whole block.

- :func:`named_barrier(id, count)`: ``bar.sync id, count`` (count threads, a multiple of 32,
  meet at hardware barrier id 1-15; 0 is the block's syncthreads).
- :func:`make_quad_reduce()`: (quad_max, quad_sum)(x, tid) of a float32 over the 4 consecutive
  lanes that hold one row of an mma / wgmma accumulator (on the GPU
  nbflash.kernels.common.primitives.make_row_reduce's shuffles; only the simulator's differ,
  waiting for the warp rather than the block).
- :func:`make_setmaxnreg(n, increase)`: ``setmaxnreg.{inc,dec}.sync.aligned.u32 n``: a
  warpgroup gives registers back (the producer) or takes them (the consumers); sm_90a.
- :func:`elect_one()`: 1 in one lane of the warp (``elect.sync``), 0 in the others.

In Numba's CUDA simulator, whose only barrier is the block's, these meet on Python barriers
of their own (threading.Barrier, one per barrier id and per warp; the simulator runs one block
at a time), so code that only some of the block's threads run can still synchronise there;
setmaxnreg does nothing and the elected lane is lane 0.
"""

import threading

import numpy as np
from numba import float32

from ..._cuda import SIMULATOR, cuda, intrinsic


def _check_count(n):
    if n % 8 or not 24 <= n <= 256:
        raise ValueError(f"setmaxnreg takes 24 to 256 registers, a multiple of 8; got {n}")


if not SIMULATOR:
    from llvmlite import ir
    from numba.core import types

    from .primitives import (asm as _asm, i32 as _i32, make_row_reduce, void_statement)

    @intrinsic
    def named_barrier(typingctx, bar_id, count):
        if not (isinstance(bar_id, types.Integer) and isinstance(count, types.Integer)):
            return None
        sig = types.void(bar_id, count)

        def codegen(context, builder, sig, args):
            _asm(builder, ir.VoidType(), "bar.sync $0, $1;", "r,r,~{memory}",
                 [_i32(builder, x) for x in args])
            return context.get_dummy_value()

        return sig, codegen

    def make_setmaxnreg(n, increase):
        """setmaxnreg.inc (increase) or .dec to n registers per thread (24 to 256, a multiple
        of 8), for the calling warpgroup."""
        _check_count(n)
        return void_statement(f"setmaxnreg.{'inc' if increase else 'dec'}.sync.aligned.u32 {n};")

    @intrinsic
    def elect_one(typingctx):
        sig = types.uint32()

        def codegen(context, builder, sig, args):
            return _asm(builder, ir.IntType(32), "{ .reg .pred p; elect.sync _|p, 0xffffffff; "
                        "selp.u32 $0, 1, 0, p; }", "=r", [])

        return sig, codegen

    def make_quad_reduce():
        """(quad_max, quad_sum)(x, tid): the shuffles of primitives.make_row_reduce over 4
        lanes (the block size does not matter on the GPU)."""
        return make_row_reduce(4, 32)
else:
    _BARRIERS = {}
    _SCRATCH = {}
    _GUARD = threading.Lock()
    #: seconds a simulated barrier waits before it breaks: when a thread of the block raised,
    #: its partners would otherwise wait forever (the simulator only releases syncthreads)
    SIM_BARRIER_TIMEOUT = 60.0

    class _TimedBarrier(threading.Barrier):
        def wait(self, timeout=None):
            return super().wait(SIM_BARRIER_TIMEOUT if timeout is None else timeout)

    def _barrier(key, parties):
        with _GUARD:
            bar = _BARRIERS.get(key)
            if bar is None or bar.parties != parties or bar.broken:
                bar = _BARRIERS[key] = _TimedBarrier(parties)
            return bar

    def _sim_named_barrier(bar_id, count):
        _barrier(("named", int(bar_id)), int(count)).wait()

    def _warp_exchange(x):
        """Every lane's x, once all 32 lanes of the calling warp have given theirs."""
        tid = cuda.threadIdx.x
        warp, lane = tid // 32, tid % 32
        with _GUARD:
            buf = _SCRATCH.setdefault(warp, np.zeros(32, np.float64))
        bar = _barrier(("warp", warp), 32)
        bar.wait()           # the previous exchange's reads are done
        buf[lane] = x
        bar.wait()
        return buf, lane - lane % 4

    def _sim_quad_max(x, tid):
        buf, first = _warp_exchange(x)
        return float32(max(buf[first:first + 4]))

    def _sim_quad_sum(x, tid):
        buf, first = _warp_exchange(x)
        f = np.float32   # (the GPU's butterfly order, xor 2 then xor 1: (a + c) + (b + d))
        return float32(f(f(buf[first]) + f(buf[first + 2])) + f(f(buf[first + 1]) +
                                                                 f(buf[first + 3])))

    def warp_exchange_words(words):
        """The calling warp's lanes' tuples of uint32 words once all 32 gave theirs, and the
        warp's first thread id (the simulated wgmma with A from registers)."""
        tid = cuda.threadIdx.x
        warp, lane = tid // 32, tid % 32
        with _GUARD:
            buf = _SCRATCH.setdefault(("words", warp), np.zeros((32, len(words)), np.uint32))
        bar = _barrier(("warp", warp), 32)
        bar.wait()
        buf[lane] = words
        bar.wait()
        return buf

    def make_setmaxnreg(n, increase):
        _check_count(n)

        def setmaxnreg():
            pass

        return cuda.jit(device=True)(setmaxnreg)

    def _sim_elect_one():
        return 1 if cuda.threadIdx.x % 32 == 0 else 0

    # (jitted, so that the simulator gives them its cuda module, threadIdx and all, when
    # another module's device function calls them)
    warp_exchange_words = cuda.jit(device=True)(warp_exchange_words)
    named_barrier = cuda.jit(device=True)(_sim_named_barrier)
    elect_one = cuda.jit(device=True)(_sim_elect_one)

    def make_quad_reduce():
        jit = cuda.jit(device=True)
        return jit(_sim_quad_max), jit(_sim_quad_sum)

