"""Which register tiles make fa2 fastest on this GPU: a sweep over tile shapes per kernel.

For each kernel (forward, the dK/dV pass with atomic dQ, the deterministic dQ pass) and head
dim, every candidate RegTiles (R rows per block, C per step, tm x tn scores per thread[,
stages]) runs through an fa2 launch plan at the FlashAttention-2 grid's N = 2048 point (16k
tokens, hidden 2048), float32, not causal; it is checked against the float64 reference and the
forward (forward kernel) or the backward (the others) is timed. The compiler's registers and
local memory are recorded with each point. nbflash/kernels/fa2/tiles.py's GPU_TILES holds the
winners; figures/data/fa2_tiles_h200.json the H200's points.
"""

from nbflash.kernels.common.factory import kernel as compiled
from nbflash.kernels.common.options import Features
from nbflash.kernels.fa2 import plan as fa2_plan, tiles as fa2_tiles

from .. import common
from . import PlanRunner, tile_sweep

NAME = "fa2_tiles"
GPU_CANDIDATES = {
    "forward": {64: [(64, 64, 8, 4), (128, 64, 8, 4), (64, 32, 8, 2), (128, 32, 8, 2),
                     (64, 64, 4, 4), (64, 64, 8, 4, 2), (64, 32, 8, 2, 2), (128, 64, 8, 4, 2)],
                128: [(64, 32, 8, 2), (128, 32, 8, 2), (64, 64, 8, 4), (32, 32, 4, 2),
                      (64, 32, 4, 2), (64, 32, 8, 2, 2), (32, 32, 4, 2, 2), (64, 16, 8, 1, 2),
                      (128, 64, 8, 4)]},
    "dkdv": {64: [(64, 32, 8, 2), (32, 32, 4, 2), (64, 32, 4, 2), (128, 32, 8, 2),
                  (64, 32, 8, 2, 2), (128, 32, 8, 2, 2)],
             128: [(32, 32, 4, 2), (32, 32, 2, 2), (64, 32, 4, 2), (64, 16, 4, 1),
                   (64, 32, 4, 2, 2), (32, 32, 4, 2, 2)]},
    "dq": {64: [(64, 64, 8, 4), (64, 32, 8, 2), (128, 32, 8, 2), (64, 64, 4, 4)],
           128: [(64, 32, 8, 2), (32, 32, 4, 2), (64, 32, 4, 2), (128, 32, 8, 2)]},
}
SIM_CANDIDATES = {"forward": {8: [(8, 8, 2, 2), (8, 8, 2, 2, 2)]}, "dkdv": {8: [(8, 8, 2, 2)]},
                  "dq": {8: [(8, 8, 2, 2)]}}


def config():
    """(candidates, N, tokens, hidden, repeats) on a GPU and in the simulator."""
    return common.sized((GPU_CANDIDATES, 2048, 16384, 2048, 10), (SIM_CANDIDATES, 16, 16, 8, 1))


def _candidate(kernel, d, sizes, B, H, N):
    t = fa2_tiles.RegTiles(sizes[0], sizes[1], d, *sizes[2:])
    deterministic = kernel == "dq"
    plan = fa2_plan.plan_for(B, H, N, N, d, "float32", False, d ** -0.5, deterministic,
                             ((kernel, t),))
    return ({"threads": t.threads, "smem_bytes": t.smem_bytes(kernel)}, PlanRunner(False, plan),
            lambda: compiled(fa2_plan.spec, kernel, t, False, "float32", Features(),
                             not deterministic).resources())


def measure(fresh=False):
    tile_sweep(NAME, "float32", config(), fresh, _candidate)
