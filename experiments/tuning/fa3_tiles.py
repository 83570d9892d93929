"""Which tiles make fa3's first forward fastest on this GPU (nbflash.kernels.fa3: one
warpgroup per 64 query rows, wgmma and TMA): keys per step and K/V stages.

Every candidate Fa3Tiles (cols, stages) of the forward runs through an fa3 launch plan at the
FlashAttention-2 grid's N = 8192 point (16k tokens, hidden 2048), float16, not causal; it is
checked against the float64 reference and timed. nbflash/kernels/fa3/tiles.py's GPU_TILES are
first choices, not the result of this sweep yet (it has not run on a GPU).
"""

from nbflash.kernels.common.factory import kernel as compiled
from nbflash.kernels.fa3 import plan as fa3_plan
from nbflash.kernels.fa3.tiles import THREADS, Fa3Tiles

from .. import common
from . import PlanRunner, tile_sweep

NAME = "fa3_tiles"
#: the sm_90 opt-in limit of shared memory per block
SMEM_LIMIT = 232448
#: (cols, stages) per head dim
GPU_CANDIDATES = {"forward": {64: [(128, 2), (64, 2), (128, 3), (192, 2), (256, 2)],
                              128: [(128, 2), (64, 2), (128, 3), (64, 4)],
                              256: [(64, 2), (32, 2), (64, 3)]}}
SIM_CANDIDATES = {"forward": {64: [(16, 2)]}}


def config():
    """(candidates, N, tokens, hidden, repeats) on a GPU and in the simulator."""
    return common.sized((GPU_CANDIDATES, 8192, 16384, 2048, 10), (SIM_CANDIDATES, 32, 32, 64, 1))


def _candidate(kernel, d, sizes, B, H, N):
    t = Fa3Tiles(d, *sizes)
    fields = {"threads": THREADS, "smem_bytes": t.smem_bytes()}
    if t.smem_bytes() > SMEM_LIMIT:
        return {**fields, "status": "skipped",
                "error": f"{t.smem_bytes()} bytes of shared memory, {SMEM_LIMIT} allowed"}, \
            None, None
    plan = fa3_plan.plan_for(B, H, N, N, d, "float16", False, d ** -0.5, t)
    return (fields, PlanRunner(False, plan),
            lambda: compiled(fa3_plan.spec, kernel, t, False, "float16").resources())


def measure(fresh=False):
    tile_sweep(NAME, "float16", config(), fresh, _candidate)
