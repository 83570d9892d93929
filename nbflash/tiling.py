"""Block sizes from the on-chip memory M and the head dim d (FlashAttention paper, Alg. 1 line 2).

The paper splits on-chip memory of M elements into four quarters, one each for the Q, K, V and O
tiles, and sets

    paper rule:  Bc = ceil(M / 4d),  Br = min(ceil(M / 4d), d)

The notes nbflash was started from (``shared/seed``) write it the other way round,

    seed rule:   Br = ceil(M / 4d),  Bc = min(ceil(M / 4d), d)

Both keep Br * Bc <= M/4 (up to the rounding of the ceiling), so the S_ij tile also fits in a
quarter. The paper keeps S_ij in registers; nbflash's fa1 kernels keep it (and the backward's
dS_ij, dK~_j and dV~_j) in shared memory, so they need somewhat more than M elements of shared
memory: the functions below count it exactly, and the default M is the largest one whose kernel fits in the shared
memory a block gets (48 KB of static shared memory on every CUDA GPU since Volta).
"""

import math
from dataclasses import dataclass

RULES = ("paper", "seed")

#: Bytes of static shared memory a CUDA block may use without opting in to more.
STATIC_SMEM_BYTES = 48 * 1024

#: Shared tiles are float32 whatever the input dtype (accumulation is in float32).
TILE_ITEMSIZE = 4


def padded(n):
    """Row stride for a shared tile read down its columns: odd, so 32 threads reading one column
    each hit 32 different banks."""
    return n if n % 2 else n + 1


def block_sizes(M, d, rule="paper"):
    """(Br, Bc) for on-chip memory of M elements and head dim d."""
    if rule not in RULES:
        raise ValueError(f"block_rule={rule!r} is not a rule; use one of {RULES}")
    if M < 1 or d < 1:
        raise ValueError(f"M and d must be positive (got M={M}, d={d})")
    quarter = math.ceil(M / (4 * d))
    if rule == "paper":
        return min(quarter, d), quarter
    return quarter, min(quarter, d)


@dataclass(frozen=True)
class Tiles:
    """Tile shapes of one fa1 kernel: Br query rows, Bc key rows, head dim d, threads per block."""

    Br: int
    Bc: int
    d: int
    threads: int

    @property
    def dp(self):
        """Padded row stride of the Q, K, V (and dO) tiles."""
        return padded(self.d)

    @property
    def bcp(self):
        """Padded row stride of the S / P / dS tiles."""
        return padded(self.Bc)

    def forward_smem_elements(self):
        # Q_i, K_j, V_j (padded) and O_i, the S_ij / P~_ij tile, two per-row rescaling factors
        return (self.Br + 2 * self.Bc) * self.dp + self.Br * self.d \
            + self.Br * self.bcp + 2 * self.Br

    def backward_smem_elements(self):
        # Q_i, dO_i, K_j, V_j (padded), dK~_j, dV~_j, P_ij and dS_ij, and lse_i, D_i
        return 2 * (self.Br + self.Bc) * self.dp + 2 * self.Bc * self.d \
            + 2 * self.Br * self.bcp + 2 * self.Br

    def smem_bytes(self, pass_):
        n = self.forward_smem_elements() if pass_ == "forward" else self.backward_smem_elements()
        return n * TILE_ITEMSIZE


def tiles_for(M, d, rule, threads):
    Br, Bc = block_sizes(M, d, rule)
    return Tiles(Br, Bc, d, threads)


def default_M(d, pass_, rule="paper", limit=STATIC_SMEM_BYTES):
    """Largest M whose kernel for this pass ("forward" or "backward") fits in `limit` bytes.

    The footprint grows with M (threads per block do not enter it), so a bisection finds it.
    Returns None if not even M = 4 fits.
    """
    def fits(M):
        return tiles_for(M, d, rule, threads=1).smem_bytes(pass_) <= limit

    lo, hi = 4, limit // TILE_ITEMSIZE
    if not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


# ------------------------------------------------------------------------------------------ fa2

def _round_up(n, m):
    return -(-n // m) * m


@dataclass(frozen=True)
class RegTiles:
    """Register tiling of one fa2 kernel (nbflash.kernels.fa2).

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

    def smem_elements(self, kernel):
        R, C, ds = self.R, self.C, self.ds
        if kernel == "forward":       # Q (R x d), K, V (C x d) per stage, P (R x C)
            return (R + 2 * C * self.stages) * ds + R * self.ps(C)
        if kernel == "dq":            # Q, dO (R x d), K, V (C x d), dS (R x C), lse, D (R)
            return 2 * (R + C) * ds + R * self.ps(C) + 2 * R
        if kernel == "dkdv":   # K, V (R x d), Pᵀ, dSᵀ (R x C), dS (C x R); per stage Q, dO
            return (2 * R * ds + 2 * R * self.ps(C) + C * self.ps(R)   # (C x d), lse, D (C)
                    + self.stages * (2 * C * ds + 2 * C))
        raise ValueError(kernel)

    def keep_words(self):
        """Dropout's keep bits of one R x C score tile: a 32-bit word per row and 8 columns
        (nbflash.kernels.dropout.make_keep_tile); they follow the kernel's other tiles."""
        return self.R * self.C // 8

    def smem_bytes(self, kernel, dropout=False):
        return (self.smem_elements(kernel) + (self.keep_words() if dropout else 0)) \
            * TILE_ITEMSIZE


#: fa2's tiles on the GPU per kernel, for head dims up to the key: (R, C, tm, tn). Chosen by
#: experiments/fa2_tiles.py on the H200 (its data in figures/data/); the simulator uses
#: SIM_FA2_TILES, small enough that the tests' short sequences span several blocks.
GPU_FA2_TILES = {
    "forward": {64: (64, 64, 8, 4, 2), 128: (128, 64, 8, 4)},
    "dkdv": {64: (64, 32, 8, 2), 128: (32, 32, 4, 2)},
    "dq": {64: (64, 64, 8, 4), 128: (64, 32, 8, 2)},
}
SIM_FA2_TILES = {kernel: {64: (8, 8, 2, 2), 128: (8, 8, 2, 2)} for kernel in GPU_FA2_TILES}
FA2_KERNELS = tuple(GPU_FA2_TILES)


def fa2_tiles(kernel, d, table):
    """RegTiles of fa2 `kernel` ("forward", "dkdv" or "dq") for head dim d from `table`: the
    entry of the smallest head dim >= d (head dims above the largest key are refused by the
    input checks)."""
    sizes = table[kernel]
    key = min((k for k in sizes if k >= d), default=max(sizes))
    R, C, *rest = sizes[key]
    return RegTiles(R, C, d, *rest)


# ------------------------------------------------------------------------- tc (tensor cores)

@dataclass(frozen=True)
class TcTiles:
    """Tiles of a tensor-core kernel (nbflash.kernels.tc): W warps each own 16·mtiles rows of
    the block's tile (rows = 16 W mtiles: query rows in the forward, keys in the dK/dV pass);
    each step takes `cols` rows of the other operand (keys, or queries), streamed through
    `stages` shared buffers by cp.async. 16-bit elements; rows padded by 8 elements (16 bytes)."""

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
    def ds(self):
        """Row stride (elements) of the d-wide shared tiles."""
        return self.d + 8

    @property
    def ps(self):
        """Row stride of the dkdv pass's dSᵀ tile (rows keys, `cols` query columns)."""
        return self.cols + 8

    def elements(self, kernel):
        """16-bit elements of shared memory before dropout's keep bits."""
        R, C, DS = self.rows, self.cols, self.ds
        if kernel == "forward":     # Q_i; stages of K_j, V_j
            return R * DS + self.stages * 2 * C * DS
        if kernel == "dkdv":        # K_j, V_j, dSᵀ; stages of Q_i, dO_i and float32 lse_i, D_i
            return 2 * R * DS + R * self.ps + self.stages * (2 * C * DS + 4 * C)
        raise ValueError(kernel)

    def keep_offset(self, kernel):
        """Index (in uint32 words) of dropout's keep bits."""
        return self.elements(kernel) // 2

    def smem_bytes(self, kernel, dropout=False):
        keep = self.rows * self.cols // 8 * 4 if dropout else 0
        return 2 * self.elements(kernel) + keep


#: (warps, cols, stages[, min_blocks[, mtiles]]) per kernel and head dim (the entry of the
#: smallest head dim >= d). GPU: chosen from sweeps on the H200 (tools/tc_probe.py sweep; numbers in the
#: README); simulator: one or two warps and 16-32 columns, so that the tests' short sequences
#: span several tiles.
GPU_TC_TILES = {
    "forward": {64: (8, 64, 2, 2), 128: (8, 64, 2)},
    "dkdv": {64: (8, 32, 2), 128: (8, 16, 2)},
}
SIM_TC_TILES = {
    "forward": {32: (1, 16, 2, 1, 2), 128: (1, 16, 3)},
    "dkdv": {32: (2, 16, 2), 128: (1, 16, 2)},
}
TC_KERNELS = tuple(GPU_TC_TILES)
#: head dims the tc kernels take: multiples of 16 up to TC_MAX_HEAD_DIM
TC_MAX_HEAD_DIM = 128


def tc_tiles(kernel, d, table):
    """TcTiles of tc `kernel` ("forward" or "dkdv") for head dim d from `table`."""
    sizes = table[kernel]
    key = min((k for k in sizes if k >= d), default=max(sizes))
    warps, cols, stages, *more = sizes[key]      # more: min_blocks, mtiles
    if kernel == "dkdv":   # dQ's 16 x 16 pieces are shared evenly among the warps
        cols = next(c for c in (cols, 2 * cols, 4 * cols) if (c // 16) * (d // 16) % warps == 0)
    return TcTiles(d, warps, cols, stages, *more)
