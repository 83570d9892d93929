"""Warp-level tensor-core primitives for Numba, through inline PTX (sm_80 and later).

Numba has no tensor-core API (numba/numba#5899, NVIDIA/numba-cuda#309), so each primitive is a
``numba.cuda.extending.intrinsic`` whose code generation emits one PTX instruction as LLVM
inline assembly. Values cross the boundary as 32-bit registers: a ``uint32`` holds two 16-bit
floats (float16 or bfloat16 bits, the lower-indexed element in the low half), as the PTX
fragments do.

- ``ldsm_x4(smem, i)`` / ``ldsm_x4_t(smem, i)``: ``ldmatrix.sync.aligned.m8n8.x4[.trans]
  .shared.b16``. Four 8x8 matrices of 16-bit elements from shared memory (`smem`: a 1-D uint16
  shared array). Lane l gives the start of one matrix row, element index `i`: lanes 0-7 the
  rows of matrix 0, 8-15 of matrix 1, 16-23 of matrix 2, 24-31 of matrix 3. Lane l receives
  (r0, r1, r2, r3): in r_m, elements (row l // 4, columns 2 (l % 4) and 2 (l % 4) + 1) of matrix
  m; with ``_t`` the transposed matrix, elements (rows 2 (l % 4), 2 (l % 4) + 1; column l // 4).
- ``mma_f16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)`` and ``mma_bf16(...)``:
  ``mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32``, D = A B + C for a 16x16
  A, a 16x8 B and float32 C, D; returns (d0, d1, d2, d3). With g = l // 4 and t = l % 4, lane l
  holds A's rows g (a0, a2) and g + 8 (a1, a3), columns 2t, 2t+1 (a0, a1) and 2t+8, 2t+9 (a2,
  a3); B's column g, rows 2t, 2t+1 (b0) and 2t+8, 2t+9 (b1); C's and D's rows g (c0, c1) and
  g + 8 (c2, c3), columns 2t and 2t+1. (PTX ISA, "Matrix Fragments for mma.m16n8k16".)
- ``pack_f16x2(lo, hi)`` / ``pack_bf16x2(lo, hi)``: two float32 rounded to nearest even into
  one uint32 (``cvt.rn.f16x2.f32``, ``cvt.rn.bf16x2.f32``), e.g. P from the score registers into
  an A fragment without going through memory.
- ``f16_bits_to_f32(h)`` / ``bf16_bits_to_f32(h)``: one 16-bit pattern (a uint16) as float32.
- ``exp2(x)``: 2^x by ``ex2.approx.ftz.f32`` (results below 2^-126 flush to 0). ``math.exp2``
  compiles to the non-ftz form, which must produce denormal results; with this one the tc
  forward ran 10% faster on the H200 (see the README). ``rcp_approx(x)``: 1/x by
  ``rcp.approx.ftz.f32`` (1 ulp): an IEEE division compiles to a call of a slow-path
  subroutine, and any call in a kernel makes ptxas serialise its wgmma (C7509; fa3).
- ``copy16_async``, ``commit_async`` and ``make_wait_async(n)`` (cp.async, 16 bytes from global
  to shared memory, completing in the background; ``wait_group n``) are in
  nbflash.kernels.common.primitives, shared with fa2.

In Numba's CUDA simulator there is no PTX. There each primitive is built from shared memory:
every lane writes its operand to a scratch array, the block synchronises, and each lane
assembles its result from its warp's operands (the simulator's threads run a warp's code
separately). That is the same data movement the instruction does, so the tensor-core kernels run
unchanged in the simulator, with two rules the GPU does not impose: every thread of the block
must call a primitive the same number of times (it synchronises the block), and the simulated
mma sums in float64 before rounding to float32, where the tensor core adds in its own order.
Build them with :func:`make_warp_ops` for a block of `threads` threads.
"""

import numpy as np
from numba import float32, uint16, uint32

from ... import bfloat16
from ..._cuda import SIMULATOR, cuda, intrinsic

WARP = 32


# --------------------------------------------------------------- bit patterns (host and sim)

def _half_value(h, bf16):
    h = int(h) & 0xFFFF
    if bf16:
        return float(np.uint32(h << 16).view(np.float32))
    return float(np.uint16(h).view(np.float16))


def _half_bits(x, bf16):
    if bf16:
        return int(bfloat16.bits(x)[0])
    return int(np.float16(np.float32(x)).view(np.uint16))


# ------------------------------------------------------------------------ simulator versions

def _sim_pack(bf16):
    def pack(lo, hi):
        return uint32(_half_bits(lo, bf16) | (_half_bits(hi, bf16) << 16))
    return pack


def _sim_to_f32(bf16):
    def to_f32(h):
        return float32(_half_value(h, bf16))
    return to_f32


def _make_sim_ops(threads):
    T = threads

    def _ldsm(smem, i, trans):
        scratch = cuda.shared.array(T, np.int64)
        tid = cuda.threadIdx.x
        cuda.syncthreads()           # the previous call's reads are done
        scratch[tid] = i
        cuda.syncthreads()
        lane = tid % WARP
        first = tid - lane
        g, t = lane // 4, lane % 4
        out = []
        for m in range(4):
            if trans:   # elements (2t, g) and (2t + 1, g) of matrix m
                lo = smem[scratch[first + 8 * m + 2 * t] + g]
                hi = smem[scratch[first + 8 * m + 2 * t + 1] + g]
            else:       # elements (g, 2t) and (g, 2t + 1)
                row = scratch[first + 8 * m + g]
                lo, hi = smem[row + 2 * t], smem[row + 2 * t + 1]
            out.append(uint32(int(lo) | (int(hi) << 16)))
        return out[0], out[1], out[2], out[3]

    def ldsm_x4(smem, i):
        return _ldsm(smem, i, False)

    def ldsm_x4_t(smem, i):
        return _ldsm(smem, i, True)

    def _mma(bf16, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        frags = cuda.shared.array((T, 6), np.uint32)
        tid = cuda.threadIdx.x
        cuda.syncthreads()
        for e, x in enumerate((a0, a1, a2, a3, b0, b1)):
            frags[tid, e] = x
        cuda.syncthreads()
        lane = tid % WARP
        first = tid - lane
        g, t = lane // 4, lane % 4

        def a(row, k):   # element (row, k) of A: lane 4 (row % 8) + (k % 8) // 2
            reg = (row // 8) + 2 * (k // 8)
            word = int(frags[first + 4 * (row % 8) + (k % 8) // 2, reg])
            return _half_value(word >> (16 * (k % 2)), bf16)

        def b(k, col):   # element (k, col) of B: lane 4 col + (k % 8) // 2
            word = int(frags[first + 4 * col + (k % 8) // 2, 4 + k // 8])
            return _half_value(word >> (16 * (k % 2)), bf16)

        out = []
        for c, (row, col) in zip((c0, c1, c2, c3),
                                 ((g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1))):
            out.append(float32(float(c) + sum(a(row, k) * b(k, col) for k in range(16))))
        return out[0], out[1], out[2], out[3]

    def mma_f16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        return _mma(False, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)

    def mma_bf16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        return _mma(True, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)

    jit = cuda.jit(device=True)
    _ldsm = jit(_ldsm)
    _mma = jit(_mma)
    return jit(ldsm_x4), jit(ldsm_x4_t), jit(mma_f16), jit(mma_bf16)


# ------------------------------------------------------------------------------ GPU versions

if not SIMULATOR:
    from llvmlite import ir
    from numba.core import types

    from .primitives import asm as _asm, is_1d, shared_address as _shared_address

    _I32, _F32 = ir.IntType(32), ir.FloatType()

    def _ldsm_intrinsic(trans):
        text = ("ldmatrix.sync.aligned.m8n8.x4" + (".trans" if trans else "")
                + ".shared.b16 {$0, $1, $2, $3}, [$4];")

        @intrinsic
        def ldsm(typingctx, smem, i):
            if not (is_1d(smem, (types.uint16,)) and isinstance(i, types.Integer)):
                return None
            sig = types.UniTuple(types.uint32, 4)(smem, i)

            def codegen(context, builder, sig, args):
                addr = _shared_address(context, builder, sig.args[0], args[0], args[1])
                ret = ir.LiteralStructType([_I32] * 4)
                res = _asm(builder, ret, text, "=r,=r,=r,=r,r", [addr])
                parts = [builder.extract_value(res, e) for e in range(4)]
                return context.make_tuple(builder, sig.return_type, parts)

            return sig, codegen

        return ldsm

    def _mma_intrinsic(kind):
        text = (f"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32 "
                "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};")

        @intrinsic
        def mma(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
            if not (all(isinstance(x, types.Integer) for x in (a0, a1, a2, a3, b0, b1))
                    and all(x == types.float32 for x in (c0, c1, c2, c3))):
                return None
            sig = types.UniTuple(types.float32, 4)(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)

            def codegen(context, builder, sig, args):
                regs = [builder.trunc(x, _I32) if x.type.width > 32 else
                        builder.zext(x, _I32) if x.type.width < 32 else x for x in args[:6]]
                ret = ir.LiteralStructType([_F32] * 4)
                res = _asm(builder, ret, text, "=f,=f,=f,=f,r,r,r,r,r,r,0,1,2,3",
                           regs + list(args[6:]))
                parts = [builder.extract_value(res, e) for e in range(4)]
                return context.make_tuple(builder, sig.return_type, parts)

            return sig, codegen

        return mma

    def _pack_intrinsic(kind):
        text = f"cvt.rn.{kind}x2.f32 $0, $1, $2;"   # $1 goes to the upper half

        @intrinsic
        def pack(typingctx, lo, hi):
            if not (lo == types.float32 and hi == types.float32):
                return None
            sig = types.uint32(lo, hi)

            def codegen(context, builder, sig, args):
                return _asm(builder, _I32, text, "=r,f,f", [args[1], args[0]])

            return sig, codegen

        return pack

    @intrinsic
    def f16_bits_to_f32(typingctx, h):
        """float16 bits (the low 16 bits of an integer) as float32 (cvt.f32.f16)."""
        if not isinstance(h, types.Integer):
            return None
        sig = types.float32(h)

        def codegen(context, builder, sig, args):
            h16 = builder.trunc(args[0], ir.IntType(16))
            return _asm(builder, _F32, "cvt.f32.f16 $0, $1;", "=f,h", [h16])

        return sig, codegen

    @intrinsic
    def bf16_bits_to_f32(typingctx, h):
        """bfloat16 bits (the low 16 bits of an integer) as float32 (a shift and a bitcast)."""
        if not isinstance(h, types.Integer):
            return None
        sig = types.float32(h)

        def codegen(context, builder, sig, args):
            x = args[0]
            x = builder.trunc(x, ir.IntType(16)) if x.type.width > 16 else x
            word = builder.shl(builder.zext(x, _I32), ir.Constant(_I32, 16))
            return builder.bitcast(word, _F32)

        return sig, codegen

    def _unary_f32(instruction):
        """An intrinsic float32 -> float32 of one PTX instruction (`instruction` $0, $1)."""
        @intrinsic
        def op(typingctx, x):
            if x != types.float32:
                return None
            sig = types.float32(x)

            def codegen(context, builder, sig, args):
                return _asm(builder, _F32, f"{instruction} $0, $1;", "=f,f", [args[0]])

            return sig, codegen

        return op

    exp2 = _unary_f32("ex2.approx.ftz.f32")
    rcp_approx = _unary_f32("rcp.approx.ftz.f32")

    ldsm_x4, ldsm_x4_t = _ldsm_intrinsic(False), _ldsm_intrinsic(True)
    mma_f16, mma_bf16 = _mma_intrinsic("f16"), _mma_intrinsic("bf16")
    pack_f16x2, pack_bf16x2 = _pack_intrinsic("f16"), _pack_intrinsic("bf16")
else:
    def _sim_exp2(x):
        return float32(0.0) if x < -126 else float32(2.0 ** float(x))

    def _sim_rcp(x):
        return float32(1.0) / x

    exp2 = cuda.jit(device=True)(_sim_exp2)
    rcp_approx = cuda.jit(device=True)(_sim_rcp)
    f16_bits_to_f32 = cuda.jit(device=True)(_sim_to_f32(False))
    bf16_bits_to_f32 = cuda.jit(device=True)(_sim_to_f32(True))
    pack_f16x2 = cuda.jit(device=True)(_sim_pack(False))
    pack_bf16x2 = cuda.jit(device=True)(_sim_pack(True))


_SIM_OPS = {}


def make_warp_ops(threads, bf16=False):
    """(ldsm_x4, ldsm_x4_t, mma, pack, to_f32) for a block of `threads` threads and inputs of
    float16 (bf16 False) or bfloat16: the intrinsics on the GPU, their shared-memory versions in
    the simulator (which need the block size)."""
    if SIMULATOR:
        if threads not in _SIM_OPS:
            _SIM_OPS[threads] = _make_sim_ops(threads)
        ld, ld_t, m16, mbf = _SIM_OPS[threads]
    else:
        ld, ld_t, m16, mbf = ldsm_x4, ldsm_x4_t, mma_f16, mma_bf16
    if bf16:
        return ld, ld_t, mbf, pack_bf16x2, bf16_bits_to_f32
    return ld, ld_t, m16, pack_f16x2, f16_bits_to_f32


def split16(word):
    """(low, high) 16-bit halves of a uint32, as uint16."""
    return uint16(word & uint32(0xFFFF)), uint16(word >> uint32(16))


split16 = cuda.jit(device=True, inline=True)(split16)
