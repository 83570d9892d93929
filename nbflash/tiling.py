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
