"""Hopper's tensor memory accelerator (TMA) and shared-memory barriers (mbarrier) for Numba,
through inline PTX (sm_90): the loads of fa3 (issue 15).

A TMA load copies a box of a 2-D global tensor into shared memory, described by a 128-byte
*tensor map* that the host encodes (``cuTensorMapEncodeTiled``: the tensor's base, sizes and
row stride, the box, the swizzle): ``cp.async.bulk.tensor.2d.shared::cluster.global.tile
.mbarrier::complete_tx::bytes [dst], [map, {col, row}], [bar]``. One thread issues it; the copy
completes in the background, rows past the tensor's end come as zeros, and the arrival of its
bytes is counted on an mbarrier in shared memory: a thread announces the bytes to expect
(``mbarrier.arrive.expect_tx``), the consumers wait on the barrier's phase
(``mbarrier.try_wait.parity``), and the phase flips once every expected arrival and every byte
is in. That is FlashAttention-3's producer / consumer pipeline.

numba-cuda has no ``__grid_constant__`` parameters, so the map lives in global memory (a
uint64 array of 16 words, :func:`device_tensor_map` on the host), read through
``fence.proxy.tensormap::generic.acquire`` before its first use.

- :func:`mbar_init` (bar, at, count), :func:`mbar_arrive`, :func:`mbar_arrive_expect_tx`
  (bar, at, bytes), :func:`mbar_try_wait` (bar, at, parity) -> 1 once the phase of that parity
  has completed; `bar` a uint64 shared array, `at` the barrier's index there (a barrier is one
  8-byte word on the GPU; keep 4 words per barrier, which the simulator's takes),
  :func:`fence_barrier_init` (the inits visible to the async proxy).
- :func:`make_tma_load_2d(rows, cols, swizzle)`: ``load(smem, dst_at, tmap, src, n_rows,
  n_cols, row0, col0, bar, bar_at)`` copies rows row0 .. row0 + rows - 1 and columns col0 ..
  col0 + cols - 1 of a (n_rows, n_cols) row-major 16-bit tensor into the uint16 shared array
  at dst_at (1024-byte aligned), laid out as nbflash.kernels.common.wgmma.KMajor(rows, 64,
  128): cols = 64 and swizzle = 128, one 128-byte row per tensor row, exactly the layout
  wgmma's descriptors read (a head dim of 128 is two such boxes).
  `tmap` (GPU) is the tensor's map; `src`, n_rows, n_cols are what the simulator copies from.
- :func:`make_tma_load_3d(rows, cols, swizzle)`: the same for one head of a 3-D (heads, rows,
  cols) tensor (:func:`device_tensor_map_3d`): a box past a head's last row gets zeros.
- :func:`fence_tensormap` (tmap): the acquire fence of a map in global memory.

In the simulator a TMA load is a copy done at once, and an mbarrier is four uint64 counters
(pending arrivals, the count, the phase, bytes still expected / 16), kept with the
simulator's atomics; the waits return whether the phase completed, so a kernel spins as it
does on the GPU. What the hardware does with the map and the barrier bits is checked by
tests/test_tma.py on the GPU only.
"""

import functools

import numpy as np

from ..._cuda import SIMULATOR, cuda, intrinsic
from .wgmma import KMajor

#: CUtensorMapSwizzle by swizzle bytes
_SWIZZLE_ENUM = {0: "CU_TENSOR_MAP_SWIZZLE_NONE", 128: "CU_TENSOR_MAP_SWIZZLE_128B"}


def device_tensor_map(x, rows, cols, box_rows, box_cols=64, swizzle=128):
    """The TMA tensor map of a contiguous (rows, cols) float16 / bfloat16-bits CuPy array or
    torch tensor `x` for boxes of box_rows x box_cols, encoded by the driver and copied to the
    device: a CuPy uint64 array of 16 words (GPU only)."""
    _check_box(box_rows, box_cols, swizzle)
    return _encode(_pointer(x), (cols, rows), (box_cols, box_rows), swizzle)


def device_tensor_map_3d(x, heads, rows, cols, box_rows, box_cols=64, swizzle=128):
    """The TMA tensor map of a contiguous (heads, rows, cols) 16-bit CuPy array or torch tensor
    (the kernels' flat (B·H, N, d) view) for boxes of box_rows x box_cols of one head: a box
    that runs past a head's last row gets zeros there, not the next head's rows (GPU only)."""
    _check_box(box_rows, box_cols, swizzle)
    return _encode(_pointer(x), (cols, rows, heads), (box_cols, box_rows, 1), swizzle)


@functools.lru_cache(maxsize=256)
def _encode(ptr, dims, box, swizzle):
    """cuTensorMapEncodeTiled of a contiguous 16-bit tensor at `ptr` of sizes `dims` (innermost
    first), boxes `box`, on the device. Maps are kept per (address, sizes, box, swizzle): a map
    holds nothing but these, so a later array at the same address gets the same map."""
    from cuda.bindings import driver as drv  # noqa: PLC0415
    import cupy  # noqa: PLC0415

    strides, step = [], 2
    for n in dims[:-1]:
        step *= n
        strides.append(drv.cuuint64_t(step))
    err, tmap = drv.cuTensorMapEncodeTiled(
        drv.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_FLOAT16, len(dims), ptr,
        [drv.cuuint64_t(n) for n in dims], strides, [drv.cuuint32_t(b) for b in box],
        [drv.cuuint32_t(1)] * len(dims),
        drv.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
        getattr(drv.CUtensorMapSwizzle, _SWIZZLE_ENUM[swizzle]),
        drv.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
        drv.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE)
    if err != drv.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed: {err}")
    return cupy.asarray(np.array([int(w) for w in tmap.opaque], dtype=np.uint64))


def _pointer(x):
    """A device array's address (CuPy or torch)."""
    data = getattr(x, "data", None)
    if data is not None and hasattr(data, "ptr"):
        return data.ptr
    return x.data_ptr()


def _check_box(rows, cols, swizzle):
    """The layout a TMA box lands in: with the 128-byte swizzle, rows of 128 bytes (64 16-bit
    columns), chunk c of row r at chunk c ^ (r % 8), which is KMajor(rows, 64, 128). (Without a
    swizzle TMA writes the box row-major, which is not a wgmma layout: not offered.)"""
    if swizzle != 128 or cols != 64:
        raise ValueError(f"TMA boxes here are 64 16-bit columns wide with the 128-byte swizzle "
                         f"(the layout wgmma reads); got {cols} columns, swizzle {swizzle}")
    return KMajor(rows, cols, swizzle)


if not SIMULATOR:
    from llvmlite import ir
    from numba.core import types

    from .primitives import (asm as _asm, i32 as _i32, is_1d, shared_address as _shared,
                             void_statement)

    _I32, _I64 = ir.IntType(32), ir.IntType(64)

    def _global(context, builder, arrty, arr):
        data = context.make_array(arrty)(context, builder, arr).data
        return builder.ptrtoint(data, _I64)

    def _bar_op(text, extra_int=False, returns=False):
        """An mbarrier instruction on bar[at] (a uint64 shared array), with one integer more
        (extra_int), returning a uint32 (returns)."""
        ret_t = types.uint32 if returns else types.void
        cons = ("=r," if returns else "") + ("r,r" if extra_int else "r") + ",~{memory}"

        def lower(context, builder, sig, args):
            ins = [_shared(context, builder, sig.args[0], args[0], args[1])] + \
                [_i32(builder, x) for x in args[2:]]
            if returns:
                return _asm(builder, _I32, text, cons, ins)
            _asm(builder, ir.VoidType(), text, cons, ins)
            return context.get_dummy_value()

        if extra_int:
            @intrinsic
            def op(typingctx, bar, at, x):
                if not (is_1d(bar, (types.uint64,)) and isinstance(at, types.Integer)
                        and isinstance(x, types.Integer)):
                    return None
                return ret_t(bar, at, x), lower
        else:
            @intrinsic
            def op(typingctx, bar, at):
                if not (is_1d(bar, (types.uint64,)) and isinstance(at, types.Integer)):
                    return None
                return ret_t(bar, at), lower
        return op

    mbar_init = _bar_op("mbarrier.init.shared::cta.b64 [$0], $1;", True)
    mbar_arrive = _bar_op("mbarrier.arrive.shared::cta.b64 _, [$0];")
    mbar_arrive_expect_tx = _bar_op(
        "mbarrier.arrive.expect_tx.shared::cta.b64 _, [$0], $1;", True)
    mbar_try_wait = _bar_op(
        "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [$1], $2; "
        "selp.u32 $0, 1, 0, p; }", True, returns=True)

    fence_barrier_init = void_statement("fence.mbarrier_init.release.cluster;")

    @intrinsic
    def fence_tensormap(typingctx, tmap):
        if not is_1d(tmap, (types.uint64,)):
            return None
        sig = types.void(tmap)

        def codegen(context, builder, sig, args):
            _asm(builder, ir.VoidType(), "fence.proxy.tensormap::generic.acquire.gpu [$0], 128;",
                 "l,~{memory}", [_global(context, builder, sig.args[0], args[0])])
            return context.get_dummy_value()

        return sig, codegen

    def _tma_statement(rank):
        coords = ", ".join(f"${2 + i}" for i in range(rank))
        return (f"cp.async.bulk.tensor.{rank}d.shared::cluster.global.tile"
                f".mbarrier::complete_tx::bytes [$0], [$1, {{{coords}}}], [${2 + rank}];")

    def _tma_codegen(rank):
        """The lowering of a rank-`rank` TMA load whose arguments are (smem, dst_at, tmap, src,
        n_rows, n_cols, coordinates outermost first, bar, bar_at): the coordinates go to PTX
        innermost first."""
        text = _tma_statement(rank)
        constraints = "r,l," + "r," * rank + "r,~{memory}"

        def codegen(context, builder, sig, args):
            smem_, dst, tmap_ = args[:3]
            coords = args[6:6 + rank]
            bar_, bat = args[6 + rank:]
            ins = [_shared(context, builder, sig.args[0], smem_, dst),
                   _global(context, builder, sig.args[2], tmap_),
                   *(_i32(builder, c) for c in reversed(coords)),
                   _shared(context, builder, sig.args[6 + rank], bar_, bat)]
            _asm(builder, ir.VoidType(), text, constraints, ins)
            return context.get_dummy_value()

        return codegen

    def _tma_types_ok(smem, tmap, bar, ints):
        return (is_1d(smem, (types.uint16,)) and is_1d(tmap, (types.uint64,))
                and is_1d(bar, (types.uint64,)) and all(isinstance(x, types.Integer) for x in ints))

    def make_tma_load_2d(rows, cols, swizzle=128):
        """See the module docstring (the GPU's: src, n_rows and n_cols are not read)."""
        _check_box(rows, cols, swizzle)
        codegen = _tma_codegen(2)

        @intrinsic
        def load(typingctx, smem, dst_at, tmap, src, n_rows, n_cols, row0, col0, bar, bar_at):
            if not _tma_types_ok(smem, tmap, bar, (dst_at, n_rows, n_cols, row0, col0, bar_at)):
                return None
            return types.void(smem, dst_at, tmap, src, n_rows, n_cols, row0, col0, bar,
                              bar_at), codegen

        return load

    def make_tma_load_3d(rows, cols=64, swizzle=128):
        """load(smem, dst_at, tmap, src, n_rows, n_cols, head, row0, col0, bar, bar_at): as
        make_tma_load_2d's, a box of one head of a 3-D (heads, n_rows, n_cols) tensor."""
        _check_box(rows, cols, swizzle)
        codegen = _tma_codegen(3)

        @intrinsic
        def load(typingctx, smem, dst_at, tmap, src, n_rows, n_cols, head, row0, col0, bar,
                 bar_at):
            if not _tma_types_ok(smem, tmap, bar,
                                 (dst_at, n_rows, n_cols, head, row0, col0, bar_at)):
                return None
            return types.void(smem, dst_at, tmap, src, n_rows, n_cols, head, row0, col0, bar,
                              bar_at), codegen

        return load
else:
    # the simulator's barrier: bar[at] pending arrivals, bar[at + 1] the count, bar[at + 2] the
    # number of completed phases, bar[at + 3] bytes still expected / 16
    def _flip_if_done(bar, at):
        if bar[at] == 0 and bar[at + 3] == 0:
            bar[at] = bar[at + 1]
            bar[at + 2] += 1

    def _sim_init(bar, at, count):
        bar[at], bar[at + 1], bar[at + 2], bar[at + 3] = count, count, 0, 0

    def _sim_arrive(bar, at):
        with _LOCK:
            bar[at] -= 1
            _flip_if_done(bar, at)

    def _sim_arrive_expect_tx(bar, at, nbytes):
        with _LOCK:
            bar[at + 3] += nbytes // 16
            bar[at] -= 1
            _flip_if_done(bar, at)

    def _sim_try_wait(bar, at, parity):
        """1 once the phase of this parity has completed. Phases alternate in parity from 0;
        the one before the first counts as complete, so a wait on parity 1 passes at once (a
        producer's first wait on an empty buffer, as on the GPU)."""
        with _LOCK:
            done = int(bar[at + 2])
        return 1 if done % 2 != parity % 2 else 0

    def _sim_fence_barrier_init():
        pass

    def _sim_fence_tensormap(tmap):
        pass

    import threading

    _LOCK = threading.Lock()

    jit = cuda.jit(device=True)
    mbar_init, mbar_arrive = jit(_sim_init), jit(_sim_arrive)
    mbar_arrive_expect_tx, mbar_try_wait = jit(_sim_arrive_expect_tx), jit(_sim_try_wait)
    fence_barrier_init, fence_tensormap = jit(_sim_fence_barrier_init), jit(_sim_fence_tensormap)

    def _sim_copy(layout, smem, dst_at, src, n_rows, n_cols, head, row0, col0, bar, bar_at):
        """A box of head `head` copied at once (zeros past the tensor's rows and columns), its
        bytes counted on the barrier."""
        rows, cols = layout.rows, layout.cols
        for r in range(rows):
            for c in range(cols):
                inside = row0 + r < n_rows and col0 + c < n_cols
                smem[dst_at + layout.offset(r, c)] = \
                    src[(head * n_rows + row0 + r) * n_cols + col0 + c] if inside else 0
        with _LOCK:
            bar[bar_at + 3] -= rows * cols * 2 // 16
            _flip_if_done(bar, bar_at)

    def make_tma_load_2d(rows, cols, swizzle=128):
        layout = _check_box(rows, cols, swizzle)

        def load(smem, dst_at, tmap, src, n_rows, n_cols, row0, col0, bar, bar_at):
            _sim_copy(layout, smem, dst_at, src, n_rows, n_cols, 0, row0, col0, bar, bar_at)

        return jit(load)

    def make_tma_load_3d(rows, cols=64, swizzle=128):
        layout = _check_box(rows, cols, swizzle)

        def load(smem, dst_at, tmap, src, n_rows, n_cols, head, row0, col0, bar, bar_at):
            _sim_copy(layout, smem, dst_at, src, n_rows, n_cols, head, row0, col0, bar, bar_at)

        return jit(load)
