"""Device building blocks that the GPU and Numba's CUDA simulator provide differently.

- ``load4(a, i)``: the four float32 ``a[i:i+4]`` of a 1-D shared array in one 16-byte read
  (``ld.shared.v4.f32``; ``i`` must be a multiple of 4). Numba has no vector load, and NVVM does
  not merge four scalar loads into one, so on the GPU this is a small intrinsic; in the
  simulator it is four reads.
- ``make_row_reduce(lanes, threads)``: max and sum of a value over the ``lanes`` consecutive
  threads (within one warp) that share a row of a register tile. On the GPU a butterfly of warp
  shuffles (``shfl.bfly``); the simulator has no shuffles, so there each thread writes its value
  to shared memory and reads back its row's (every thread of the block must call it).

Only these differ between the two; the kernels that use them are the same code on both, which is
how the simulator tests check the GPU kernels' logic.
"""

from numba import float32

from .._cuda import SIMULATOR, cuda, intrinsic

FULL_MASK = 0xFFFFFFFF


def _simulated_load4(a, i):
    return a[i], a[i + 1], a[i + 2], a[i + 3]


if SIMULATOR:
    load4 = cuda.jit(device=True)(_simulated_load4)
else:
    from llvmlite import ir
    from numba.core import types

    @intrinsic
    def load4(typingctx, a, i):
        """(a[i], a[i+1], a[i+2], a[i+3]) for a float32 array, as one aligned vector load."""
        if not (isinstance(a, types.Array) and a.dtype == types.float32 and a.ndim == 1
                and isinstance(i, types.Integer)):
            return None
        sig = types.UniTuple(types.float32, 4)(a, i)

        def codegen(context, builder, sig, args):
            arr = context.make_array(sig.args[0])(context, builder, args[0])
            ptr = builder.gep(arr.data, [args[1]])
            vec = ir.VectorType(ir.FloatType(), 4)
            loaded = builder.load(builder.bitcast(ptr, vec.as_pointer()), align=16)
            parts = [builder.extract_element(loaded, ir.Constant(ir.IntType(32), e))
                     for e in range(4)]
            return context.make_tuple(builder, sig.return_type, parts)

        return sig, codegen


def make_row_reduce(lanes, threads):
    """(row_max, row_sum): reduce a float32 over the `lanes` threads tid, tid^1, ... that share a
    row (lanes is a power of two dividing 32, and those threads are consecutive)."""
    assert lanes & (lanes - 1) == 0 and 32 % lanes == 0, lanes
    LANES, T = lanes, threads

    if not SIMULATOR:
        def row_max(x, tid):
            off = LANES // 2
            while off > 0:
                x = max(x, cuda.shfl_xor_sync(FULL_MASK, x, off))
                off //= 2
            return x

        def row_sum(x, tid):
            off = LANES // 2
            while off > 0:
                x += cuda.shfl_xor_sync(FULL_MASK, x, off)
                off //= 2
            return x
    else:
        def _exchange(x, tid):
            buf = cuda.shared.array(T, float32)
            cuda.syncthreads()   # the previous exchange has been read
            buf[tid] = x
            cuda.syncthreads()
            return buf, tid - tid % LANES

        def row_max(x, tid):
            buf, first = _exchange(x, tid)
            for e in range(LANES):
                x = max(x, buf[first + e])
            return x

        def row_sum(x, tid):
            buf, first = _exchange(x, tid)
            total = float32(0.0)
            for e in range(LANES):   # the same order in every lane, as the butterfly is not
                total += buf[first + e]
            return total

        _exchange = cuda.jit(device=True)(_exchange)

    jit = cuda.jit(device=True, inline=True)
    return jit(row_max), jit(row_sum)
