"""tc's tiles: warps, m-tiles and pipeline stages of each tensor-core kernel, its shared-memory
plan, and the tile tables (chosen by measured sweeps on the H200; small ones for the
simulator)."""

from dataclasses import dataclass

from ..._cuda import SIMULATOR
from ..common.smem import SmemPlan

#: shared tiles hold 16-bit elements (float16 or bfloat16 bits)
ELEMENT = 2


@dataclass(frozen=True)
class TcTiles:
    """Tiles of a tensor-core kernel (nbflash.kernels.tc.forward, .backward): W warps each own
    16·mtiles rows of the block's tile (rows = 16 W mtiles: query rows in the forward and the dQ
    pass, keys in the dK/dV pass); each step takes `cols` rows of the other operand (keys, or
    queries), streamed through `stages` shared buffers by cp.async. 16-bit elements; rows padded
    by 8 elements (16 bytes).

    `d` is the head dim the kernel reads and writes (a multiple of 8: the plan pads other head
    dims, as FlashAttention does); the shared tiles and the mma work on :attr:`dp` columns, d
    rounded up to the mma's 16 (the columns past d are loaded as zeros and never written)."""

    d: int
    warps: int
    cols: int
    stages: int = 2
    #: blocks per SM the compiler must leave room for (launch bounds): caps the registers at
    #: 65536 / (threads · min_blocks); 1 leaves the compiler its 255
    min_blocks: int = 1
    #: m-tiles (of 16 rows) per warp: the forward's warps may own 32 rows (2), as in
    #: FlashAttention-2, so that each K or V fragment read feeds two mma; the dK/dV pass: 1
    mtiles: int = 1
    #: the dK/dV pass: blocks that share one key tile, each accumulating dK and dV for 1/dsplit
    #: of the columns (large head dims: 2 x 16 x d float32 accumulators would not fit in a
    #: warp's registers); each recomputes S and dP
    dsplit: int = 1
    #: the forward and the dQ pass: keep Q_i's (and dO_i's) A fragments in registers for every
    #: step, or read them from shared memory at each step (large head dims)
    qregs: bool = True

    @property
    def rows(self):
        return 16 * self.warps * self.mtiles

    @property
    def threads(self):
        return 32 * self.warps

    @property
    def dp(self):
        """The head dim of the shared tiles and the mma: d rounded up to 16 (the dK/dV pass:
        to 16·dsplit, so that every part has whole 16-column pieces)."""
        unit = 16 * self.dsplit
        return -(-self.d // unit) * unit

    @property
    def dh(self):
        """Columns of dK, dV (and dQ) a dK/dV block accumulates: dp / dsplit."""
        return self.dp // self.dsplit

    @property
    def ds(self):
        """Row stride (elements) of the d-wide shared tiles."""
        return self.dp + 8

    @property
    def ps(self):
        """Row stride of the dkdv pass's dSᵀ tile (rows keys, `cols` query columns)."""
        return self.cols + 8

    def smem_plan(self, kernel, dropout=False, dq=True):
        """The shared memory of tc `kernel` ("forward", "dkdv" or "dq") as named regions of
        16-bit elements (lse and D are float32); "keep" (dropout's keep bits, uint32) last,
        empty without dropout. dq (dkdv): whether the pass also computes dQ (its dSᵀ tile)."""
        R, C, DS = self.rows, self.cols, self.ds
        keep = ("keep", R * C // 8 if dropout else 0, 4)
        if kernel == "forward":     # Q_i; per stage K_j, V_j
            kv = SmemPlan(ELEMENT, ("K", C * DS), ("V", C * DS))
            return SmemPlan(ELEMENT, ("Q", R * DS), ("KV", kv, self.stages), keep)
        if kernel == "dq":          # Q_i, dO_i; per stage K_j, V_j
            kv = SmemPlan(ELEMENT, ("K", C * DS), ("V", C * DS))
            return SmemPlan(ELEMENT, ("Q", R * DS), ("dO", R * DS), ("KV", kv, self.stages),
                            keep)
        if kernel == "dkdv":        # K_j, V_j, dSᵀ; per stage Q_i, dO_i, float32 lse_i, D_i
            step = SmemPlan(ELEMENT, ("Q", C * DS), ("dO", C * DS), ("lse", C, 4), ("D", C, 4))
            return SmemPlan(ELEMENT, ("K", R * DS), ("V", R * DS),
                            ("dSt", R * self.ps if dq else 0),
                            ("steps", step, self.stages), keep)
        raise ValueError(kernel)

    def smem_bytes(self, kernel, dropout=False, dq=True):
        return self.smem_plan(kernel, dropout, dq).nbytes

    def label(self):
        return (f"d={self.d} warps={self.warps} mtiles={self.mtiles} cols={self.cols} "
                f"stages={self.stages} min_blocks={self.min_blocks} dsplit={self.dsplit} "
                f"qregs={self.qregs}")


#: (warps, cols, stages[, min_blocks[, mtiles[, dsplit[, qregs]]]]) per kernel and head dim
#: (the entry of the smallest head dim >= d). GPU: chosen from sweeps on the H200
#: (experiments/tuning/tc_tiles.py; numbers in docs/tensor-cores.md); simulator: one or two
#: warps and 16-32 columns, so that the tests' short sequences span several tiles.
GPU_TILES = {
    "forward": {64: (8, 64, 2, 2), 128: (8, 64, 2, 1, 2, 1, False),
                256: (4, 32, 2, 1, 1, 1, False)},
    "dkdv": {64: (8, 64, 2), 128: (8, 32, 2), 256: (4, 16, 2, 1, 1, 2)},
    "dq": {64: (4, 64, 2), 128: (4, 64, 2, 1, 1, 1, False), 256: (4, 16, 2, 1, 1, 1, False)},
}
SIM_TILES = {
    "forward": {32: (1, 16, 2, 1, 2), 128: (1, 16, 3), 256: (1, 16, 2, 1, 1, 1, False)},
    "dkdv": {32: (2, 16, 2), 128: (1, 16, 2), 256: (1, 16, 2, 1, 1, 2)},
    "dq": {32: (2, 16, 2), 256: (1, 16, 2, 1, 1, 1, False)},
}
#: how the backward gets dQ by default, by the table entry's head dim: True, from the dQ pass
#: after a dK/dV pass without dQ (bitwise reproducible); False, added by the dK/dV pass with
#: atomics (FA2's Algorithm 2 as written). On the H200 the dQ pass is the faster at every point
#: measured (2026-12-01, fp16, N 2048 and 8192, causal and not, against the atomic backward with
#: the same dK/dV tiles: 1.18-1.70x at d=64, 1.23-1.86x at d=128; docs/tensor-cores.md); the
#: simulator keeps the atomic one at d=128 so that the tests run both.
GPU_DQ_PASS = {64: True, 128: True, 256: True}
SIM_DQ_PASS = {32: True, 128: False, 256: True}

#: local memory (bytes per thread: spills, and the stack they take) that the H200 sweeps
#: accepted for a GPU_TILES entry, by (kernel, the entry's head dim); every other kernel must
#: have none (tests/test_compile.py, and test_tc.py's SASS test on the GPU). Two forwards spill
#: a few registers and are still the fastest (the 2026-12-01 sweep in docs/tensor-cores.md,
#: N = 8192): d = 64
#: with 2 blocks of 8 warps per SM (its 128-register cap) 193 TFLOP/s, 16 bytes spilled by the
#: H200's compiler, none by CI's, against 153 for min_blocks 1 without spills; d = 128 with 8
#: warps of 32 rows and Q from shared memory 238, against 200 for the best tiles without
#: (16 bytes on the H200, 72 causal; 116 in CI's compile).
LOCAL_ALLOWANCE = {("forward", 64): 32, ("forward", 128): 128}

#: the tables this device mode uses
TABLE, DQ_PASS = (SIM_TILES, SIM_DQ_PASS) if SIMULATOR else (GPU_TILES, GPU_DQ_PASS)
#: head dims the tc kernels take: every one up to MAX_HEAD_DIM (the kernels read and write
#: multiples of KERNEL_HEAD_DIM_MULTIPLE; the plan pads the others)
MAX_HEAD_DIM, HEAD_DIM_MULTIPLE, KERNEL_HEAD_DIM_MULTIPLE = 256, 1, 8


def kernel_head_dim(d):
    """The head dim tc's kernels run a call of head dim d at: d rounded up to a multiple of 8
    (16-byte rows for cp.async)."""
    return -(-d // KERNEL_HEAD_DIM_MULTIPLE) * KERNEL_HEAD_DIM_MULTIPLE


def _entry(sizes, d):
    """The head dim of the entry of a kernel's table that head dim d (rounded up to the kernels'
    multiple of 8) takes: the smallest one >= d, else the largest."""
    d = kernel_head_dim(d)
    return min((k for k in sizes if k >= d), default=max(sizes))


def tiles(kernel, d, table=None):
    """TcTiles of tc `kernel` ("forward", "dkdv" or "dq") for head dim d from `table` (None:
    this device's, TABLE); d is rounded up to the kernels' multiple of 8."""
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"tc takes head dims 1 to {MAX_HEAD_DIM}; got {d}")
    sizes = (table or TABLE)[kernel]
    return TcTiles(kernel_head_dim(d), *sizes[_entry(sizes, d)])


def dq_pass(d, table=None):
    """Whether tc's backward at head dim d computes dQ in its own pass by default (DQ_PASS)."""
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"tc takes head dims 1 to {MAX_HEAD_DIM}; got {d}")
    table = table or DQ_PASS
    return table[_entry(table, d)]


def local_allowance(kernel, d):
    """The local memory LOCAL_ALLOWANCE accepts for tc `kernel` at head dim d with the GPU
    table's tiles (0 for most)."""
    return LOCAL_ALLOWANCE.get((kernel, _entry(GPU_TILES[kernel], d)), 0)
