"""fa3's tiles: keys per step (C) and pipeline stages of its forward, per head dim, and its
shared memory (16-bit elements; the tiles' base aligned to 1024 bytes at run time, which the
512 elements of slack pay for)."""

from dataclasses import dataclass

from ..._cuda import SIMULATOR

#: query rows per block: one warpgroup of 4 warps x 16 rows (wgmma's M = 64)
ROWS, THREADS = 64, 128
#: elements of slack for aligning the tiles to 1024 bytes (the 128-byte swizzle's atom)
ALIGN_SLACK = 512


@dataclass(frozen=True)
class Fa3Tiles:
    """d: the head dim (a multiple of 64: TMA boxes of 64 columns with the 128-byte swizzle);
    cols: keys per step (wgmma's N of S = Q Kᵀ, a multiple of 16 up to 256); stages: K/V
    buffers in the ring."""

    d: int
    cols: int
    stages: int = 2

    def __post_init__(self):
        if self.d % 64 or not 64 <= self.d <= 256:
            raise ValueError(f"fa3 takes head dims 64, 128, 192 and 256; got {self.d}")
        if self.cols % 16 or not 16 <= self.cols <= 256 or self.stages < 1:
            raise ValueError(f"fa3 tiles: cols a multiple of 16 up to 256, stages >= 1; got "
                             f"{self.cols}, {self.stages}")

    @property
    def stage_elements(self):
        return 2 * self.cols * self.d          # K_j, then V_j

    @property
    def q_elements(self):
        return ROWS * self.d

    def smem_bytes(self):
        return 2 * (self.q_elements + self.stages * self.stage_elements + ALIGN_SLACK)

    def label(self):
        return f"d={self.d} cols={self.cols} stages={self.stages}"


#: (cols, stages) by head dim; GPU: first choices, not yet swept (nothing has run on one)
GPU_TILES = {"forward": {64: (128, 2), 128: (128, 2), 192: (64, 2), 256: (64, 2)}}
SIM_TILES = {"forward": {64: (16, 2), 128: (16, 2), 192: (16, 2), 256: (16, 2)}}
TABLE = SIM_TILES if SIMULATOR else GPU_TILES
MAX_HEAD_DIM = 256


def tiles(kernel, d, table=None):
    """Fa3Tiles of fa3 `kernel` ("forward") at head dim d (a multiple of 64)."""
    sizes = (table or TABLE)[kernel]
    if d not in sizes:
        raise ValueError(f"fa3 takes head dims {sorted(sizes)}; got {d}")
    return Fa3Tiles(d, *sizes[d])
