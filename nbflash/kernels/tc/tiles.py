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
    16·mtiles rows of the block's tile (rows = 16 W mtiles: query rows in the forward, keys in
    the dK/dV pass); each step takes `cols` rows of the other operand (keys, or queries),
    streamed through `stages` shared buffers by cp.async. 16-bit elements; rows padded by 8
    elements (16 bytes)."""

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

    @property
    def rows(self):
        return 16 * self.warps * self.mtiles

    @property
    def threads(self):
        return 32 * self.warps

    @property
    def shares_dq_evenly(self):
        """The dK/dV pass shares dQ's (cols/16) x (d/16) pieces of 16 x 16 evenly among its
        warps (the kernel needs it)."""
        return (self.cols // 16) * (self.d // 16) % self.warps == 0

    @property
    def ds(self):
        """Row stride (elements) of the d-wide shared tiles."""
        return self.d + 8

    @property
    def ps(self):
        """Row stride of the dkdv pass's dSᵀ tile (rows keys, `cols` query columns)."""
        return self.cols + 8

    def smem_plan(self, kernel, dropout=False):
        """The shared memory of tc `kernel` ("forward" or "dkdv") as named regions of 16-bit
        elements (lse and D are float32); "keep" (dropout's keep bits, uint32) last, empty
        without dropout."""
        R, C, DS = self.rows, self.cols, self.ds
        keep = ("keep", R * C // 8 if dropout else 0, 4)
        if kernel == "forward":     # Q_i; per stage K_j, V_j
            kv = SmemPlan(ELEMENT, ("K", C * DS), ("V", C * DS))
            return SmemPlan(ELEMENT, ("Q", R * DS), ("KV", kv, self.stages), keep)
        if kernel == "dkdv":        # K_j, V_j, dSᵀ; per stage Q_i, dO_i, float32 lse_i, D_i
            step = SmemPlan(ELEMENT, ("Q", C * DS), ("dO", C * DS), ("lse", C, 4), ("D", C, 4))
            return SmemPlan(ELEMENT, ("K", R * DS), ("V", R * DS), ("dSt", R * self.ps),
                            ("steps", step, self.stages), keep)
        raise ValueError(kernel)

    def smem_bytes(self, kernel, dropout=False):
        return self.smem_plan(kernel, dropout).nbytes

    def label(self):
        return (f"d={self.d} warps={self.warps} mtiles={self.mtiles} cols={self.cols} "
                f"stages={self.stages} min_blocks={self.min_blocks}")


#: (warps, cols, stages[, min_blocks[, mtiles]]) per kernel and head dim (the entry of the
#: smallest head dim >= d). GPU: chosen from sweeps on the H200 (experiments/tuning/tc_tiles.py;
#: numbers in docs/tensor-cores.md); simulator: one or two warps and 16-32 columns, so that the
#: tests' short sequences span several tiles.
GPU_TILES = {
    "forward": {64: (8, 64, 2, 2), 128: (8, 64, 2)},
    "dkdv": {64: (8, 32, 2), 128: (8, 16, 2)},
}
SIM_TILES = {
    "forward": {32: (1, 16, 2, 1, 2), 128: (1, 16, 3)},
    "dkdv": {32: (2, 16, 2), 128: (1, 16, 2)},
}
#: the table this device mode uses
TABLE = SIM_TILES if SIMULATOR else GPU_TILES
#: head dims the tc kernels take: multiples of HEAD_DIM_MULTIPLE up to MAX_HEAD_DIM
MAX_HEAD_DIM, HEAD_DIM_MULTIPLE = 128, 16


def tiles(kernel, d, table=None):
    """TcTiles of tc `kernel` ("forward" or "dkdv") for head dim d from `table` (None: this
    device's, TABLE)."""
    sizes = (table or TABLE)[kernel]
    key = min((k for k in sizes if k >= d), default=max(sizes))
    warps, cols, stages, *more = sizes[key]      # more: min_blocks, mtiles
    if kernel == "dkdv":   # dQ's (cols/16) x (d/16) pieces of 16 x 16 are shared evenly among
        # the warps: more columns per step, or else fewer warps, until they are
        return next(t for w in (warps, warps // 2, warps // 4, 1) if w >= 1
                    for t in (TcTiles(d, w, c, stages, *more) for c in (cols, 2 * cols, 4 * cols))
                    if t.shares_dq_evenly)
    return TcTiles(d, warps, cols, stages, *more)
