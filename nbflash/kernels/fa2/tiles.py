"""fa2's tiles: the register tiling of each kernel, its shared-memory plan, and the tile tables
(chosen by measured sweeps on the H200; small ones for the simulator)."""

from dataclasses import dataclass

from ..._cuda import SIMULATOR
from ..common.smem import SmemPlan

#: Shared tiles are float32 whatever the input dtype (accumulation is in float32).
TILE_ITEMSIZE = 4


def _round_up(n, m):
    return -(-n // m) * m


@dataclass(frozen=True)
class RegTiles:
    """Register tiling of one fa2 kernel (nbflash.kernels.fa2.forward, .backward).

    The block owns R rows of one operand (query rows in the forward and the dQ pass, key rows
    in the dK/dV pass) and walks the other operand C rows at a time; head dim d. The R x C score
    tile is cut into tm x tn register tiles, one per thread: thread (rg, cg) owns rows
    rg, rg + R/tm, ... and columns cg, cg + C/tn, ... (interleaved, so that 16-byte shared-memory
    reads of whole rows hit distinct banks). The `lanes` = C/tn threads of a row are consecutive
    in one warp, so row statistics reduce with warp shuffles. The thread's slice of each R x d
    output (O, dK, dV, dQ) is the same rows, times chunks of 4 columns strided by 4 * lanes.
    """

    R: int
    C: int
    d: int
    tm: int
    tn: int
    #: buffers for the streamed tiles (K, V in the forward; Q, dO in the dK/dV pass): 2 loads
    #: the next block while the current one is computed on (cp.async for float32 inputs with d
    #: a multiple of 4)
    stages: int = 1

    def __post_init__(self):
        problems = []
        if min(self.R, self.C, self.d, self.tm, self.tn) < 1:
            problems.append("all sizes must be positive")
        elif self.stages not in (1, 2):
            problems.append("stages must be 1 or 2")
        elif self.R % self.tm or self.C % self.tn:
            problems.append("tm must divide R and tn must divide C")
        elif self.lanes & (self.lanes - 1) or 32 % self.lanes:
            problems.append(f"C/tn = {self.lanes} must be a power of two dividing 32")
        elif self.R % 4 or self.C % 4:
            problems.append("R and C must be multiples of 4 (16-byte reads)")
        elif self.C % self.row_groups:
            problems.append("R/tm must divide C (the dK/dV pass gives each thread C/(R/tm) "
                            "rows of dQ)")
        if problems:
            raise ValueError(f"{self}: {'; '.join(problems)}")

    @property
    def lanes(self):
        """Threads sharing a row of the score tile (C / tn)."""
        return self.C // self.tn

    @property
    def row_groups(self):
        return self.R // self.tm

    @property
    def threads(self):
        return self.row_groups * self.lanes

    @property
    def d4(self):
        """Chunks of 4 along the head dim (the contraction of Q Kᵀ)."""
        return -(-self.d // 4)

    @property
    def tx4(self):
        """Chunks of 4 output columns per thread."""
        return -(-self.d // (4 * self.lanes))

    @property
    def dp(self):
        """Head dim padded to whole output chunks (tx4 * 4 * lanes)."""
        return self.tx4 * 4 * self.lanes

    @property
    def ds(self):
        """Row stride of the d-wide shared tiles (Q, K, V, dO): 4 more than a multiple of 32
        words, so the rows read by 8 neighbouring lanes start in 8 different bank quads."""
        return _round_up(max(self.dp, 4 * self.d4), 32) + 4

    def ps(self, cols):
        """Row stride of a score-shaped tile (P, dS) with `cols` columns: the lanes of a warp
        store one column each, lanes consecutive; a stride of lanes mod 32 keeps the warp's rows
        in distinct banks (and 16-byte aligned)."""
        return _round_up(cols, 32) + max(4, self.lanes)

    def keep_words(self):
        """Dropout's keep bits of one R x C score tile: a 32-bit word per row and 8 columns
        (nbflash.kernels.common.dropout.make_keep_tile); they follow the kernel's other tiles."""
        return self.R * self.C // 8

    def smem_plan(self, kernel, dropout=False):
        """The shared memory of fa2 `kernel` ("forward", "dkdv" or "dq") as named regions of
        float32 elements; "keep" (dropout's keep bits, uint32) last, empty without dropout."""
        R, C, ds, stages = self.R, self.C, self.ds, self.stages
        keep = ("keep", self.keep_words() if dropout else 0)
        if kernel == "forward":   # Q_i; per stage K_j, V_j; P̃
            kv = SmemPlan(TILE_ITEMSIZE, ("K", C * ds), ("V", C * ds))
            return SmemPlan(TILE_ITEMSIZE, ("Q", R * ds), ("KV", kv, stages),
                            ("P", R * self.ps(C)), keep)
        if kernel == "dq":        # Q_i, dO_i; K_j, V_j; dS; lse_i, D_i
            return SmemPlan(TILE_ITEMSIZE, ("Q", R * ds), ("dO", R * ds), ("K", C * ds),
                            ("V", C * ds), ("dS", R * self.ps(C)), ("lse", R), ("D", R), keep)
        if kernel == "dkdv":      # K_j, V_j; Pᵀ, dSᵀ (R x C), dS (C x R); per step Q_i, dO_i,
            #                         lse_i, D_i
            step = SmemPlan(TILE_ITEMSIZE, ("Q", C * ds), ("dO", C * ds), ("lse", C), ("D", C))
            return SmemPlan(TILE_ITEMSIZE, ("K", R * ds), ("V", R * ds), ("Pt", R * self.ps(C)),
                            ("dSt", R * self.ps(C)), ("dS", C * self.ps(R)),
                            ("steps", step, stages), keep)
        raise ValueError(kernel)

    def smem_bytes(self, kernel, dropout=False):
        return self.smem_plan(kernel, dropout).nbytes

    def label(self):
        return (f"d={self.d} R={self.R} C={self.C} {self.tm}x{self.tn} stages={self.stages} "
                f"T={self.threads}")


#: fa2's tiles on the GPU per kernel, for head dims up to the key: (R, C, tm, tn[, stages]).
#: Up to 128 chosen by experiments/tuning/fa2_tiles.py on the H200 (its data in figures/data/).
#: The 256 entries (head dims 129-256) are not tuned: the largest tiles whose accumulators
#: (each thread's rows x 16 output columns of 16 lanes, 8 of 32 in the dK/dV pass) compiled
#: for sm_90 in CI's compile without stack or spills, every option on too, in at most 158 KB
#: of shared memory (2026-12-02; not yet run on a GPU). The simulator uses SIM_TILES, small
#: enough that the tests' short sequences span several blocks.
GPU_TILES = {
    "forward": {64: (64, 64, 8, 4, 2), 128: (128, 64, 8, 4), 256: (64, 32, 4, 2)},
    "dkdv": {64: (64, 32, 8, 2), 128: (32, 32, 4, 2), 256: (32, 32, 4, 1)},
    "dq": {64: (64, 64, 8, 4), 128: (64, 32, 8, 2), 256: (32, 32, 2, 2)},
}
SIM_TILES = {kernel: {64: (8, 8, 2, 2), 128: (8, 8, 2, 2), 256: (8, 8, 2, 2)}
             for kernel in GPU_TILES}
#: the table this device mode uses
TABLE = SIM_TILES if SIMULATOR else GPU_TILES
#: Largest head dim fa2 takes: what the tests cover
MAX_HEAD_DIM = 256
#: local memory (bytes) accepted for a GPU_TILES entry with every option on (dropout, key
#: padding, block sparsity, causal), by (kernel, the entry's head dim); every other variant
#: must have none (tests/test_compile.py). The d = 64 dK/dV kernel with every option was at 252
#: of 255 registers; the layouts' runtime row strides (nbflash.kernels.common.layouts) took it
#: to 255 and 36 bytes of spills in CI's compile (2026-12-01); the plain kernels have none.
OPTIONS_LOCAL_ALLOWANCE = {("dkdv", 64): 40}


def local_allowance(kernel, d, options):
    """The local memory accepted for fa2 `kernel` at head dim d with the GPU table's tiles,
    with every option (`options`) or none."""
    if not options:
        return 0
    return OPTIONS_LOCAL_ALLOWANCE.get((kernel, _entry(GPU_TILES[kernel], d)), 0)


def _entry(sizes, d):
    """The head dim of the entry of a kernel's table that head dim d takes: the smallest one
    >= d (head dims above the largest are refused by the input checks)."""
    return min((k for k in sizes if k >= d), default=max(sizes))


def tiles(kernel, d, table=None):
    """RegTiles of fa2 `kernel` ("forward", "dkdv" or "dq") for head dim d from `table` (None:
    this device's, TABLE): the entry of the smallest head dim >= d (head dims above the largest
    key are refused by the input checks)."""
    sizes = (table or TABLE)[kernel]
    R, C, *rest = sizes[_entry(sizes, d)]
    return RegTiles(R, C, d, *rest)
