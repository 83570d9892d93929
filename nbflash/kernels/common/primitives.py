"""Device building blocks that the GPU and Numba's CUDA simulator provide differently.

- ``load4(a, i)``: ``a[i:i+4]`` of a 1-D float32 or float16 array (shared or global) as four
  float32, in one 16-byte (8-byte for float16) read (``ld.shared.v4.f32``, ``ld.global.v4.f32``;
  ``i`` must be a multiple of 4 and the array 16-byte aligned). Numba has no vector load, and
  NVVM does not merge four scalar loads into one, so on the GPU this is a small intrinsic; in
  the simulator it is four reads.
- ``store4(a, i, x0, x1, x2, x3)``: the float32 counterpart of load4 for writing.
- ``copy16_async(dst, i, src, j, nbytes)``, ``commit_async()``, ``wait_async_all_but_1()``,
  ``wait_async_all()``, ``make_wait_async(n)``: ``cp.async`` copies of 16 bytes (four float32,
  or eight 16-bit elements of uint16 arrays) from global ``src[j:]`` to shared ``dst[i:]`` that
  complete in the background (``nbytes`` = 0 writes zeros instead), grouped by commit and
  waited for by group (``cp.async.wait_group n``: until at most the n newest groups are
  pending; sm_80 and later; inline PTX, as Numba has no API for it). In the simulator the copy
  happens at once and the waits do nothing.
- ``make_row_reduce(lanes, threads)``: max and sum of a value over the ``lanes`` consecutive
  threads (within one warp) that share a row of a register tile. On the GPU a butterfly of warp
  shuffles (``shfl.bfly``); the simulator has no shuffles, so there each thread writes its value
  to shared memory and reads back its row's (every thread of the block must call it).

Only these differ between the two; the kernels that use them are the same code on both, which is
how the simulator tests check the GPU kernels' logic.
"""

from numba import float32

from ..._cuda import SIMULATOR, cuda, intrinsic

FULL_MASK = 0xFFFFFFFF


def _simulated_load4(a, i):
    return float32(a[i]), float32(a[i + 1]), float32(a[i + 2]), float32(a[i + 3])


def _simulated_store4(a, i, x0, x1, x2, x3):
    a[i] = x0
    a[i + 1] = x1
    a[i + 2] = x2
    a[i + 3] = x3


def _simulated_copy16_async(dst, i, src, j, nbytes):
    for e in range(16 // dst.dtype.itemsize):
        dst[i + e] = src[j + e] if nbytes else dst.dtype.type(0)


def _nothing():
    pass


if SIMULATOR:
    load4 = cuda.jit(device=True)(_simulated_load4)
    store4 = cuda.jit(device=True)(_simulated_store4)
    copy16_async = cuda.jit(device=True)(_simulated_copy16_async)
    commit_async = wait_async_all_but_1 = wait_async_all = cuda.jit(device=True)(_nothing)
else:
    from llvmlite import ir
    from numba.core import types

    def _vector_pointer(context, builder, arrty, arr, i):
        data = context.make_array(arrty)(context, builder, arr).data
        elem = ir.HalfType() if arrty.dtype == types.float16 else ir.FloatType()
        vec = ir.VectorType(elem, 4)
        return builder.bitcast(builder.gep(data, [i]), vec.as_pointer()), 4 * arrty.dtype.bitwidth // 8

    def is_1d(a, dtypes):
        return isinstance(a, types.Array) and a.ndim == 1 and a.dtype in dtypes

    @intrinsic
    def load4(typingctx, a, i):
        """(a[i], a[i+1], a[i+2], a[i+3]) as float32, in one aligned vector load."""
        if not (is_1d(a, (types.float32, types.float16)) and isinstance(i, types.Integer)):
            return None
        sig = types.UniTuple(types.float32, 4)(a, i)

        def codegen(context, builder, sig, args):
            ptr, align = _vector_pointer(context, builder, sig.args[0], args[0], args[1])
            loaded = builder.load(ptr, align=align)
            parts = [builder.extract_element(loaded, ir.Constant(ir.IntType(32), e))
                     for e in range(4)]
            if sig.args[0].dtype == types.float16:
                parts = [builder.fpext(x, ir.FloatType()) for x in parts]
            return context.make_tuple(builder, sig.return_type, parts)

        return sig, codegen

    @intrinsic
    def store4(typingctx, a, i, x0, x1, x2, x3):
        """a[i:i+4] = (x0, x1, x2, x3) for a float32 array, in one aligned vector store."""
        if not (is_1d(a, (types.float32,)) and isinstance(i, types.Integer)
                and all(x == types.float32 for x in (x0, x1, x2, x3))):
            return None
        sig = types.void(a, i, x0, x1, x2, x3)

        def codegen(context, builder, sig, args):
            ptr, align = _vector_pointer(context, builder, sig.args[0], args[0], args[1])
            vec = ir.Constant(ir.VectorType(ir.FloatType(), 4), None)
            for e, x in enumerate(args[2:]):
                vec = builder.insert_element(vec, x, ir.Constant(ir.IntType(32), e))
            builder.store(vec, ptr, align=align)
            return context.get_dummy_value()

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


if not SIMULATOR:
    def asm(builder, ret, text, constraints, args):
        """Emit one inline-PTX statement returning `ret` (an llvmlite type; a struct for several
        outputs) from the LLVM values `args` (also used by nbflash.kernels.common.warp, .wgmma,
        .tma and .groups)."""
        fnty = ir.FunctionType(ret, [a.type for a in args])
        return builder.call(ir.InlineAsm(fnty, text, constraints, side_effect=True), args)

    def i32(builder, x):
        """An LLVM integer as i32 (truncated or zero-extended), as PTX's .u32 operands take it."""
        t = ir.IntType(32)
        return builder.trunc(x, t) if x.type.width > 32 else builder.zext(x, t) \
            if x.type.width < 32 else x

    def shared_address(context, builder, arrty, arr, i):
        """The 32-bit shared-memory byte address of arr[i] (a shared array; Numba holds it as a
        generic pointer, which the cast back to address space 3 undoes). The index is narrowed
        to 32 bits first (shared memory is far smaller than 4 GB), so that the kernels' 64-bit
        index arithmetic can be narrowed by the compiler too."""
        t = ir.IntType(32)
        data = context.make_array(arrty)(context, builder, arr).data
        shared = builder.addrspacecast(data, ir.PointerType(data.type.pointee, 3))
        base = builder.ptrtoint(shared, t)
        idx = i32(builder, i)
        shift = context.get_abi_sizeof(context.get_data_type(arrty.dtype)).bit_length() - 1
        return builder.add(base, builder.shl(idx, ir.Constant(t, shift)))

    def void_statement(text):
        """An intrinsic of no arguments that emits the PTX statement `text` (a fence, a barrier,
        a register-count change), ordered with memory."""
        @intrinsic
        def statement(typingctx):
            sig = types.void()

            def codegen(context, builder, sig, args):
                asm(builder, ir.VoidType(), text, "~{memory}", [])
                return context.get_dummy_value()

            return sig, codegen

        return statement

    @intrinsic
    def copy16_async(typingctx, dst, i, src, j, nbytes):
        """cp.async.cg.shared.global of 16 bytes src[j:] -> dst[i:] (float32 or uint16 arrays of
        one dtype, both 16-byte aligned there); nbytes (0 or 16) bytes are read, the rest filled
        with zeros."""
        if not (is_1d(dst, (types.float32, types.uint16)) and is_1d(src, (dst.dtype,))
                and all(isinstance(x, types.Integer) for x in (i, j, nbytes))):
            return None
        sig = types.void(dst, i, src, j, nbytes)

        def codegen(context, builder, sig, args):
            i64 = ir.IntType(64)
            d = builder.gep(context.make_array(sig.args[0])(context, builder, args[0]).data,
                            [args[1]])
            s_ = builder.gep(context.make_array(sig.args[2])(context, builder, args[2]).data,
                             [args[3]])
            n = builder.trunc(args[4], ir.IntType(32)) if args[4].type.width > 32 \
                else builder.zext(args[4], ir.IntType(32))
            asm(builder, ir.VoidType(),
                "{ .reg .u64 sa, ga; cvta.to.shared.u64 sa, $0; cvta.to.global.u64 ga, $1; "
                "cp.async.cg.shared.global [sa], [ga], 16, $2; }",
                "l,l,r,~{memory}", [builder.ptrtoint(d, i64), builder.ptrtoint(s_, i64), n])
            return context.get_dummy_value()

        return sig, codegen

    commit_async = void_statement("cp.async.commit_group;")
    _WAITS = {n: void_statement(f"cp.async.wait_group {n};") for n in range(4)}
    wait_async_all_but_1, wait_async_all = _WAITS[1], _WAITS[0]


def make_wait_async(n):
    """wait(): cp.async.wait_group n, for a compile-time n in 0..3 (nothing in the simulator)."""
    if SIMULATOR:
        return wait_async_all
    return _WAITS[n]
