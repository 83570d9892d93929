"""Hopper's warpgroup matrix multiply (wgmma) for Numba, through inline PTX (sm_90a): the first
building block of fa3 (issue 15).

One ``wgmma.mma_async.sync.aligned.m64nNk16.f32.{f16,bf16}.{f16,bf16}`` multiplies a 64 x 16
tile A by a 16 x N tile B (N a multiple of 8 up to 256) and adds the product to a float32
64 x N tile D that the warpgroup's 128 threads hold in registers. A and B are read from shared
memory through 64-bit *matrix descriptors* (start address, the byte strides between 8 x 16-byte
core matrices, a swizzle mode), asynchronously: the instruction is issued, its reads and the
accumulation complete in the background, and ``wgmma.commit_group`` / ``wait_group n`` mark and
wait for them. PTX ISA, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate Instructions".

- :class:`KMajor`: how a rows x cols tile of 16-bit elements (rows: A's M or B's N; cols: the
  reduction dim K, contiguous) lies in shared memory, with no swizzle or the 128-byte swizzle
  (the one TMA writes); its ``offset(mn, k)`` is the element index of operand element (mn, k),
  for the code that fills the tile (:func:`make_offset` on the device), and its descriptor
  fields are the ones the instruction decodes. :class:`MNMajor`: the same for a tile whose M/N
  dim is contiguous (B transposed: V_j, keys by d, for P V).
- :func:`make_wgmma(N, bf16, a, b)`: ``wgmma(acc, x0, smem, a_at, b_at, k0, scale_d)`` adds
  A[:, k0:k0+16] · B[:, k0:k0+16]ᵀ (B given as its N x K tile, "K-major", as K_j is for
  S = Q K_jᵀ) to acc[x0:x0 + N/2]; scale_d = 0 overwrites instead (the first k-step).
  Thread t of the warpgroup holds D's rows 16w + g and 16w + g + 8 (w = t // 32, g = t % 32 // 4)
  and columns 8j + 2(t % 4) + e: acc[x0 + 4j + 2h + e] = D[16w + g + 8h, 8j + 2(t % 4) + e],
  the mma.m16n8 layout once per warp (nbflash.kernels.tc.fragments).
  :func:`make_wgmma_rs(N, bf16, b)`: the same with A's 16 columns from registers, four uint32
  per thread in mma.m16n8k16's A-fragment layout (P packed from the score fragments).
- :func:`shared_byte` (a shared element's byte address), :func:`aligned_start` (the first
  element at a 1024-byte boundary, where swizzled tiles start),
  :func:`fence`, :func:`commit`, :func:`make_wait` (``wgmma.fence``, ``commit_group``,
  ``wait_group n``), :func:`make_fence_acc` (ties the accumulators to the point after a wait,
  so that the compiler cannot read them earlier), :func:`fence_proxy_async` (shared memory
  written by ordinary stores becomes visible to wgmma's reads: before the barrier that
  precedes the first wgmma on it).

In Numba's CUDA simulator there is no PTX: there each thread computes its own fragment of the
product at once, reading A and B from the shared array through the same address function the
descriptors encode (swizzle included), in float64 before rounding to float32. That checks the
kernels' logic and the layouts' arithmetic; whether the descriptor bits mean to the hardware
what this module says is checked by tests/test_wgmma.py on the GPU (marked gpu).

A from shared memory is K-major (Q_i, dO_i); B K-major (K_j) or MN-major (V_j).
"""

from dataclasses import dataclass

import numpy as np
from numba import float32

from ..._cuda import SIMULATOR, cuda, intrinsic
from .warp import _half_value

#: the wgmma descriptor's swizzle field (sm_90): none, or the 128-byte swizzle
_SWIZZLE_CODE = {0: 0, 128: 1}


class _Layout:
    """What the two operand layouts share: their size, each element's index from the tile's
    base (for filling it), and the tile's shared-memory image on the host. A subclass gives
    the descriptor's strides (lbo, sbo), where the descriptor of 16 K-columns starts
    (k_start) and the hardware's address of an element from it (byte)."""

    def _check(self, mn_unit, k_unit):
        if self.swizzle not in _SWIZZLE_CODE:
            raise ValueError(f"swizzle {self.swizzle}: 0 or 128")
        rows_unit, cols_unit = (k_unit, mn_unit) if self.trans else (mn_unit, k_unit)
        if self.rows % rows_unit or self.cols % cols_unit:
            raise ValueError(f"a {self.rows} x {self.cols} {self.name} tile: rows must be a "
                             f"multiple of {rows_unit} and cols a multiple of {cols_unit} "
                             f"(swizzle {self.swizzle})")

    @property
    def elements(self):
        return self.rows * self.cols

    @property
    def extents(self):
        """(M/N extent, K extent) of the operand the tile holds."""
        return (self.cols, self.rows) if self.trans else (self.rows, self.cols)

    def offset(self, mn, k):
        """The element index of operand element (mn, k) of the whole tile from its base."""
        k0 = k - k % 16
        return self.byte(self.k_start(k0), mn, k % 16) // 2

    def host_image(self, tile):
        """The shared-memory image (a flat array of `elements` entries, NumPy) of the operand
        `tile`, indexed [mn, k] (for tests and for reading the layout)."""
        tile = np.asarray(tile)
        out = np.zeros(self.elements, tile.dtype)
        mn_extent, k_extent = self.extents
        for mn in range(mn_extent):
            for k in range(k_extent):
                out[self.offset(mn, k)] = tile[mn, k]
        return out


@dataclass(frozen=True)
class KMajor(_Layout):
    """A rows x cols tile of 16-bit elements in shared memory, K (cols) contiguous, as wgmma
    reads A (rows = 64) or B (rows = N) through a descriptor. rows a multiple of 8; cols a
    multiple of 16 (swizzle 0) or of 64 (swizzle 128). The tile's base must be 1024-byte
    aligned in shared memory for swizzle 128 (the swizzle is a function of address bits).

    swizzle 0: 8 x 8-element core matrices of 128 contiguous bytes, the rows' cores one after
    the other (SBO = 128 bytes), K's cores `rows / 8` cores apart (LBO = 16 rows bytes).
    swizzle 128: 8-row atoms of 8 x 64 elements (128-byte rows), atoms along rows 1024 bytes
    apart (SBO), along K `rows` x 128 bytes apart; within an atom, the 16-byte chunk c of row r
    is stored at chunk c XOR (r % 8)."""

    rows: int
    cols: int
    swizzle: int = 128
    #: the instruction's transpose immediate for this operand (0: K-major)
    trans = 0
    name = "K-major"

    def __post_init__(self):
        self._check(8, 64 if self.swizzle else 16)

    @property
    def lbo(self):
        """Leading-dimension byte offset (between core matrices along K; unused by the
        hardware with the 128-byte swizzle, where it is 1 by convention)."""
        return 16 if self.swizzle else 16 * self.rows

    @property
    def sbo(self):
        """Stride-dimension byte offset (between 8-row groups)."""
        return 1024 if self.swizzle else 128

    def k_start(self, k0):
        """Byte offset from the tile's base at which the descriptor of the 16 columns from k0
        (a multiple of 16) starts."""
        if self.swizzle:
            return (k0 // 64) * self.rows * 128 + (k0 % 64) * 2
        return (k0 // 8) * 16 * self.rows

    def byte(self, start, r, k):
        """The byte address of element (r, k) of the 16 columns a descriptor starting at byte
        `start` covers (k < 16), as the hardware computes it: linear in the layout, then (swizzle
        128) bits 4-6 XOR bits 7-9."""
        if self.swizzle:
            linear = start + (r // 8) * self.sbo + (r % 8) * 128 + 2 * k
            return linear ^ (((linear >> 7) & 7) << 4)
        return start + (r // 8) * self.sbo + (k // 8) * self.lbo + (r % 8) * 16 + 2 * (k % 8)


@dataclass(frozen=True)
class MNMajor(_Layout):
    """A tile whose M/N dim is contiguous, as wgmma reads a transposed operand (B with
    imm-trans-b = 1): V_j for P V, whose rows are keys (K) and whose d columns (N) are
    contiguous. rows: its K extent (a multiple of 16); cols: its M/N extent (a multiple of 64
    with swizzle 128, of 8 without). Element (mn, k) of the operand is row k, column mn.

    swizzle 128 (CUTLASS's MN-major SW128 atom): atoms of 8 K-rows x 64 MN-elements (1024 bytes,
    the 16-byte chunk c of K-row r at chunk c XOR (r % 8)), along K 1024 bytes apart (SBO),
    along MN rows x 128 bytes apart (LBO). swizzle 0: core matrices of 8 K-rows x 8 MN-elements
    (128 contiguous bytes), along K 128 bytes apart (LBO), along MN rows x 16 bytes apart
    (SBO)."""

    rows: int
    cols: int
    swizzle: int = 128
    trans = 1
    name = "MN-major"

    def __post_init__(self):
        self._check(64 if self.swizzle else 8, 16)

    @property
    def lbo(self):
        return 128 * self.rows if self.swizzle else 128

    @property
    def sbo(self):
        return 1024 if self.swizzle else 16 * self.rows

    def k_start(self, k0):
        """Byte offset of the descriptor of K-rows k0 .. k0 + 15 (k0 a multiple of 16)."""
        return (k0 // 8) * (1024 if self.swizzle else 128)

    def byte(self, start, mn, k):
        """The byte address of operand element (mn, k), k < 16 from the descriptor's start."""
        if self.swizzle:
            linear = start + (mn // 64) * self.lbo + (k // 8) * self.sbo + (k % 8) * 128 \
                + 2 * (mn % 64)
            return linear ^ (((linear >> 7) & 7) << 4)
        return start + (mn // 8) * self.sbo + (k // 8) * self.lbo + (k % 8) * 16 + 2 * (mn % 8)


def offset_formula(layout):
    """f(mn, k) = layout.offset(mn, k) written with integer operations only (for a 1024-byte
    aligned tile, where the swizzle's address bits are the chunk's and row's), a plain Python
    function; :func:`make_offset` compiles it as a device function for the code that fills a
    tile."""
    R, swizzled = layout.rows, bool(layout.swizzle)
    if not layout.trans:
        if swizzled:
            def f(mn, k):
                return ((k // 64) * R * 64 + (mn // 8) * 512 + (mn % 8) * 64
                        + ((((k % 64) // 8) ^ (mn % 8)) * 8) + k % 8)
        else:
            def f(mn, k):
                return ((k // 8) * (R // 8) + mn // 8) * 64 + (mn % 8) * 8 + k % 8
    elif swizzled:
        def f(mn, k):
            return ((mn // 64) * R * 64 + (k // 8) * 512 + (k % 8) * 64
                    + ((((mn % 64) // 8) ^ (k % 8)) * 8) + mn % 8)
    else:
        def f(mn, k):
            return (mn // 8) * R * 8 + (k // 8) * 64 + (k % 8) * 8 + mn % 8
    return f


def make_offset(layout):
    """Device function offset(mn, k): the element index of operand element (mn, k) in a tile of
    `layout` from its (1024-byte aligned) base."""
    return cuda.jit(device=True, inline=True)(offset_formula(layout))


def _check_n(N):
    if N % 8 or not 8 <= N <= 256:
        raise ValueError(f"wgmma N = {N}: a multiple of 8 from 8 to 256")


def _sim_accumulate(acc, x0, N, a_value, b_value, row0, lane, scale_d):
    """The simulated product: acc[x0 + 4j + 2h + e] = (acc's value if scale_d) +
    Σ_k A[row0 + g + 8h, k] B[8j + 2t + e, k] (g, t: the lane's), summed in float64 and rounded
    to float32; a_value(row, k), b_value(col, k) give the operands' elements as floats."""
    g, t = lane // 4, lane % 4
    for j in range(N // 8):
        for h in range(2):
            for e in range(2):
                row, col = row0 + g + 8 * h, 8 * j + 2 * t + e
                s = 0.0
                for k in range(16):
                    s += a_value(row, k) * b_value(col, k)
                x = x0 + 4 * j + 2 * h + e
                acc[x] = float32((float(acc[x]) if scale_d else 0.0) + s)


def _make_sim_wgmma(N, bf16, a, b):
    """The simulator's wgmma: each thread its own fragment, from the shared array directly."""

    def wgmma(acc, x0, smem, a_at, b_at, k0, scale_d):
        tid = cuda.threadIdx.x % 128
        a_start, b_start = 2 * a_at + a.k_start(k0), 2 * b_at + b.k_start(k0)
        _sim_accumulate(acc, x0, N,
                        lambda r, k: _half_value(smem[a.byte(a_start, r, k) // 2], bf16),
                        lambda c, k: _half_value(smem[b.byte(b_start, c, k) // 2], bf16),
                        16 * (tid // 32), tid % 32, scale_d)

    return cuda.jit(device=True)(wgmma)


def _make_sim_wgmma_rs(N, bf16, b):
    """The simulator's wgmma with A from registers: the warp's A fragments exchanged among its
    lanes (nbflash.kernels.common.groups: only the warp waits, as the instruction needs only
    the warpgroup), then as _make_sim_wgmma."""
    from .groups import warp_exchange_words  # noqa: PLC0415

    def wgmma_rs(acc, x0, a0, a1, a2, a3, smem, b_at, k0, scale_d):
        frags = warp_exchange_words((a0, a1, a2, a3))
        b_start = 2 * b_at + b.k_start(k0)

        def a_value(row, k):   # A[16w + row, k] (row < 16): lane 4 (row % 8) + (k % 8) // 2
            word = int(frags[4 * (row % 8) + (k % 8) // 2, row // 8 + 2 * (k // 8)])
            return _half_value(word >> (16 * (k % 2)), bf16)

        _sim_accumulate(acc, x0, N, a_value,
                        lambda c, k: _half_value(smem[b.byte(b_start, c, k) // 2], bf16),
                        0, cuda.threadIdx.x % 32, scale_d)

    return cuda.jit(device=True)(wgmma_rs)


if not SIMULATOR:
    from llvmlite import ir
    from numba.core import types

    from .primitives import asm as _asm, i32 as _i32, is_1d, shared_address, void_statement

    _I32, _I64, _F32 = ir.IntType(32), ir.IntType(64), ir.FloatType()

    fence = void_statement("wgmma.fence.sync.aligned;")
    commit = void_statement("wgmma.commit_group.sync.aligned;")
    fence_proxy_async = void_statement("fence.proxy.async.shared::cta;")

    def make_wait(n):
        """wgmma.wait_group n: until at most n committed groups are pending."""
        return void_statement(f"wgmma.wait_group.sync.aligned {int(n)};")

    def _descriptor(builder, address, layout, start):
        """The 64-bit matrix descriptor of a tile at shared byte `address` + `start` (i32)."""
        addr = builder.zext(builder.add(address, start), _I64)
        lo = builder.lshr(builder.and_(addr, ir.Constant(_I64, 0x3FFFF)), ir.Constant(_I64, 4))
        fields = ((layout.lbo >> 4) << 16) | ((layout.sbo >> 4) << 32) \
            | (_SWIZZLE_CODE[layout.swizzle] << 62)
        return builder.or_(lo, ir.Constant(_I64, fields))

    def _k_start_ir(builder, layout, k0):
        """layout.k_start(k0) for an integer k0, as i32 (the layouts' k_start in IR)."""
        k = _i32(builder, k0)
        c = lambda v: ir.Constant(_I32, v)  # noqa: E731
        if layout.trans:      # MNMajor.k_start
            return builder.mul(builder.udiv(k, c(8)), c(1024 if layout.swizzle else 128))
        if layout.swizzle:
            atom = builder.mul(builder.udiv(k, c(64)), c(layout.rows * 128))
            return builder.add(atom, builder.mul(builder.urem(k, c(64)), c(2)))
        return builder.mul(builder.udiv(k, c(8)), c(16 * layout.rows))

    def _operand(context, builder, arrty, smem, at, layout, k0):
        """The descriptor of `layout`'s tile at element `at` of `smem`, for K-columns k0..+15."""
        return _descriptor(builder, shared_address(context, builder, arrty, smem, at), layout,
                           _k_start_ir(builder, layout, k0))

    @intrinsic
    def shared_byte(typingctx, smem, i):
        """The 32-bit shared-memory byte address of smem[i] (a uint16 shared array)."""
        if not (is_1d(smem, (types.uint16,)) and isinstance(i, types.Integer)):
            return None
        sig = types.uint32(smem, i)

        def codegen(context, builder, sig, args):
            return shared_address(context, builder, sig.args[0], args[0], args[1])

        return sig, codegen

    def _through_asm(context, builder, arrty, acc, x0, n, text, constraints, ins):
        """acc[x0:x0+n] through the statement `text`: loaded as its last n operands (tied to
        its n outputs), `ins` before them, and stored back from the outputs."""
        data = context.make_array(arrty)(context, builder, acc).data
        x0 = builder.sext(x0, _I64) if x0.type.width < 64 else x0
        ptrs = [builder.gep(data, [builder.add(x0, ir.Constant(_I64, i))]) for i in range(n)]
        res = _asm(builder, ir.LiteralStructType([_F32] * n), text, constraints,
                   list(ins) + [builder.load(p) for p in ptrs])
        for i, p in enumerate(ptrs):
            builder.store(builder.extract_value(res, i), p)
        return context.get_dummy_value()

    def _mma_text(N, bf16, a_operand, n_ins, trans_b):
        """The wgmma statement for m64nNk16 with A `a_operand` (a descriptor "$i" or registers
        "{$i, ...}"), the B descriptor and the scale-d predicate from the operands after it."""
        kind = "bf16" if bf16 else "f16"
        R = N // 2
        outs = ", ".join(f"${i}" for i in range(R))
        tail = f"p, 1, 1, 0, {trans_b}" if a_operand.startswith("$") else f"p, 1, 1, {trans_b}"
        return ("{ .reg .pred p; setp.ne.b32 p, $" + str(R + n_ins - 1) + ", 0; "
                f"wgmma.mma_async.sync.aligned.m64n{N}k16.f32.{kind}.{kind} "
                "{" + outs + "}, " + a_operand + ", $" + str(R + n_ins - 2) + ", " + tail
                + "; }")

    def make_wgmma(N, bf16, a, b):
        """wgmma(acc, x0, smem, a_at, b_at, k0, scale_d): see the module docstring (a_at, b_at:
        the tiles' element offsets in the uint16 shared array `smem`)."""
        _check_n(N)
        if a.trans:
            raise ValueError("A from shared memory is K-major here")
        R = N // 2
        text = _mma_text(N, bf16, f"${R}", 3, b.trans)
        constraints = ",".join(["=f"] * R + ["l", "l", "r"] + [str(i) for i in range(R)])

        @intrinsic
        def wgmma(typingctx, acc, x0, smem, a_at, b_at, k0, scale_d):
            if not (isinstance(acc, types.Array) and acc.dtype == types.float32
                    and is_1d(smem, (types.uint16,))
                    and all(isinstance(x, types.Integer) for x in (x0, a_at, b_at, k0, scale_d))):
                return None
            sig = types.void(acc, x0, smem, a_at, b_at, k0, scale_d)

            def codegen(context, builder, sig, args):
                acc_, x0_, smem_, a_at_, b_at_, k0_, sd = args
                da = _operand(context, builder, sig.args[2], smem_, a_at_, a, k0_)
                db = _operand(context, builder, sig.args[2], smem_, b_at_, b, k0_)
                return _through_asm(context, builder, sig.args[0], acc_, x0_, R, text,
                                    constraints, [da, db, _i32(builder, sd)])

            return sig, codegen

        return wgmma

    def make_wgmma_rs(N, bf16, b, threads=None):
        """wgmma_rs(acc, x0, a0, a1, a2, a3, smem, b_at, k0, scale_d): as make_wgmma's, with A's
        16 columns from registers: a0..a3 (uint32 pairs of 16-bit values) in the mma.m16n8k16
        A-fragment layout of the thread's warp's 16 rows (rows 16w + g, + 8; columns 2t, 2t + 1
        and + 8), e.g. P packed from score fragments (nbflash.kernels.tc.fragments.make_pack_a).
        (`threads`: unused, kept for the callers that name the block size.)"""
        _check_n(N)
        R = N // 2
        regs = "{" + ", ".join(f"${R + i}" for i in range(4)) + "}"
        text = _mma_text(N, bf16, regs, 6, b.trans)
        constraints = ",".join(["=f"] * R + ["r"] * 4 + ["l", "r"] + [str(i) for i in range(R)])

        @intrinsic
        def wgmma_rs(typingctx, acc, x0, a0, a1, a2, a3, smem, b_at, k0, scale_d):
            if not (isinstance(acc, types.Array) and acc.dtype == types.float32
                    and is_1d(smem, (types.uint16,))
                    and all(isinstance(x, types.Integer)
                            for x in (x0, a0, a1, a2, a3, b_at, k0, scale_d))):
                return None
            sig = types.void(acc, x0, a0, a1, a2, a3, smem, b_at, k0, scale_d)

            def codegen(context, builder, sig, args):
                acc_, x0_, *regs_, smem_, b_at_, k0_, sd = args
                db = _operand(context, builder, sig.args[6], smem_, b_at_, b, k0_)
                return _through_asm(context, builder, sig.args[0], acc_, x0_, R, text,
                                    constraints,
                                    [_i32(builder, r) for r in regs_] + [db, _i32(builder, sd)])

            return sig, codegen

        return wgmma_rs

    def make_fence_acc(n):
        """fence_acc(acc, x0): acc[x0:x0+n] passed through an empty volatile asm, so that code
        after a wait_group reads the values the wgmma wrote (CUTLASS's
        warpgroup_fence_operand)."""
        text = " ".join(f"// ${i}" for i in range(n))   # (comments: no instruction)
        constraints = ",".join(["=f"] * n + [str(i) for i in range(n)])

        @intrinsic
        def fence_acc(typingctx, acc, x0):
            if not (isinstance(acc, types.Array) and acc.dtype == types.float32
                    and isinstance(x0, types.Integer)):
                return None
            sig = types.void(acc, x0)

            def codegen(context, builder, sig, args):
                return _through_asm(context, builder, sig.args[0], args[0], args[1], n, text,
                                    constraints, [])

            return sig, codegen

        return fence_acc
else:
    def _nothing():
        pass

    def _sim_shared_byte(smem, i):
        return 2 * i      # (the simulator's shared arrays: every one at address 0)

    shared_byte = cuda.jit(device=True)(_sim_shared_byte)

    fence = commit = fence_proxy_async = cuda.jit(device=True)(_nothing)

    def make_wait(n):
        """(the simulator's wgmma completes at once)"""
        return fence

    def make_wgmma(N, bf16, a, b):
        _check_n(N)
        if a.trans:
            raise ValueError("A from shared memory is K-major here")
        return _make_sim_wgmma(N, bf16, a, b)

    def make_wgmma_rs(N, bf16, b, threads=None):
        _check_n(N)
        return _make_sim_wgmma_rs(N, bf16, b)

    def make_fence_acc(n):
        def fence_acc(acc, x0):
            pass

        return cuda.jit(device=True)(fence_acc)


def aligned_start(smem):
    """The index of the first 16-bit element of the shared array `smem` at a 1024-byte boundary
    (the swizzled tiles' alignment; size `smem` 512 elements more than the tiles need)."""
    return ((1024 - shared_byte(smem, 0) % 1024) % 1024) // 2


aligned_start = cuda.jit(device=True, inline=True)(aligned_start)
