"""fa1's tiles: block sizes from the on-chip memory M and the head dim d (FlashAttention paper,
Alg. 1 line 2), and the shared memory of its kernels.

The paper splits on-chip memory of M elements into four quarters, one each for the Q, K, V and O
tiles, and sets

    paper rule:  Bc = ceil(M / 4d),  Br = min(ceil(M / 4d), d)

The notes nbflash was started from (Chinese notes on LLM inference and FlashAttention) write it
the other way round,

    seed rule:   Br = ceil(M / 4d),  Bc = min(ceil(M / 4d), d)

Both keep Br * Bc <= M/4 (up to the rounding of the ceiling), so the S_ij tile also fits in a
quarter. The paper keeps S_ij in registers; nbflash's fa1 kernels keep it (and the backward's
dS_ij, dK~_j and dV~_j) in shared memory, so they need somewhat more than M elements of shared
memory: :meth:`Tiles.smem_plan` lays it out (the kernels' shared arrays take their shapes from
it, and the byte count comes from it), and the default M is the largest one whose kernel fits in
the shared memory a block gets (48 KB of static shared memory on every CUDA GPU since Volta).
"""

import math
from dataclasses import dataclass

from ..._cuda import SIMULATOR
from ..common.smem import SmemPlan

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

    def smem_plan(self, pass_):
        """The shared arrays of the `pass_` ("forward" or "backward") kernel, in the order it
        declares them, with their shapes (float32 elements)."""
        Br, Bc, d, dp, bcp = self.Br, self.Bc, self.d, self.dp, self.bcp
        if pass_ == "forward":   # Q_i, K_j, V_j, O_i, S_ij / P~_ij, two per-row factors
            return SmemPlan(TILE_ITEMSIZE, ("Qi", (Br, dp)), ("Kj", (Bc, dp)), ("Vj", (Bc, dp)),
                            ("Oi", (Br, d)), ("S", (Br, bcp)), ("keep", Br), ("new", Br))
        return SmemPlan(TILE_ITEMSIZE,   # Q_i, dO_i, K_j, V_j, P_ij, dS_ij, lse_i, D_i, dK~, dV~
                        ("Qi", (Br, dp)), ("dOi", (Br, dp)), ("Kj", (Bc, dp)), ("Vj", (Bc, dp)),
                        ("P", (Br, bcp)), ("dS", (Br, bcp)), ("lse_i", Br), ("D_i", Br),
                        ("dKj", (Bc, d)), ("dVj", (Bc, d)))

    def smem_bytes(self, pass_):
        return self.smem_plan(pass_).nbytes

    def label(self):
        return f"d={self.d} Br={self.Br} Bc={self.Bc} T={self.threads}"


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


#: Threads per block. On the H200 (experiments/tuning/fa1_threads.py, its data in figures/data/)
#: 256 ran fa1 forward+backward 1.25-1.3x faster than 128 when B*H fills few SMs (32 or 128
#: blocks) and as fast at B*H = 512; 512 was faster still on small grids but slower on large
#: ones. The simulator runs each CUDA thread as a Python thread, so it gets fewer.
GPU_THREADS, SIM_THREADS = 256, 16
DEFAULT_THREADS = SIM_THREADS if SIMULATOR else GPU_THREADS
#: Largest head dim fa1 takes: what the tests cover
MAX_HEAD_DIM = 128


def tiles(kernel, d, threads=None):
    """The tiles of fa1's `kernel` ("forward" or "backward") by default at head dim d: the
    largest M that fits, the paper's rule."""
    return tiles_for(default_M(d, kernel, "paper"), d, "paper", threads or DEFAULT_THREADS)
