"""Which tiles make tc fastest on this GPU: warps, columns per step, stages, launch bounds and
m-tiles of its forward and dK/dV kernels.

Every candidate TcTiles (warps, cols, stages[, min_blocks[, mtiles[, dsplit[, qregs]]]]) of the
forward, the dK/dV pass and the deterministic dQ pass runs through a tc launch
plan at the FlashAttention-2 grid's N = 8192 point (16k tokens, hidden 2048), float16, not
causal; it is checked against the float64 reference and the forward (forward kernel) or the
backward (dK/dV) is timed. nbflash/kernels/tc/tiles.py's GPU_TILES holds the winners; the
sweeps that chose them are in docs/tensor-cores.md.
"""

from nbflash.kernels.common.factory import kernel as compiled
from nbflash.kernels.common.options import Features
from nbflash.kernels.tc import plan as tc_plan, tiles as tc_tiles

from .. import common
from . import PlanRunner, tile_sweep

NAME = "tc_tiles"
#: (warps, cols, stages[, min_blocks[, mtiles[, dsplit[, qregs]]]]): nbflash.kernels.tc.tiles
GPU_CANDIDATES = {
    "forward": {64: [(8, 64, 2, 2), (8, 64, 2), (8, 128, 2, 2), (4, 64, 2, 4),
                     (4, 64, 2, 1, 2), (8, 64, 3, 2)],
                128: [(8, 64, 2, 1, 2, 1, False), (8, 64, 2), (4, 64, 2, 1, 2, 1, False),
                      (8, 128, 2, 1, 1, 1, False), (8, 32, 2)],
                256: [(4, 32, 2, 1, 1, 1, False), (4, 16, 2, 1, 1, 1, False)]},
    "dkdv": {64: [(8, 32, 2), (8, 64, 2), (4, 64, 2)],
             128: [(8, 16, 2), (8, 32, 2), (4, 16, 2)],
             256: [(4, 16, 2, 1, 1, 2), (8, 16, 2, 1, 1, 2)]},
    "dq": {64: [(4, 64, 2), (8, 64, 2)],
           128: [(4, 32, 2, 1, 1, 1, False), (4, 64, 2, 1, 1, 1, False)]},
}
SIM_CANDIDATES = {"forward": {32: [(1, 16, 2), (1, 16, 2, 1, 2)]}, "dkdv": {32: [(2, 16, 2)]},
                  "dq": {32: [(2, 16, 2)]}}


def config():
    """(candidates, N, tokens, hidden, repeats) on a GPU and in the simulator."""
    return common.sized((GPU_CANDIDATES, 8192, 16384, 2048, 10), (SIM_CANDIDATES, 32, 32, 32, 1))


def _candidate(kernel, d, sizes, B, H, N):
    """A candidate's plan: the forward's, or the default backward's (at d's tiles.DQ_PASS: the
    dQ pass and then the dK/dV pass without dQ, or the atomic dK/dV pass) with these dK/dV
    tiles, or for "dq" the backward with the dQ pass with these tiles."""
    t = tc_tiles.TcTiles(d, *sizes)
    fields = {"threads": t.threads, "smem_bytes": t.smem_bytes(kernel)}
    det = kernel == "dq"
    plan = tc_plan.plan_for(B, H, N, N, d, "float16", False, d ** -0.5, ((kernel, t),),
                            deterministic=det)
    # the plan's compiled kernel (the dK/dV pass adds dQ where the backward is atomic)
    extra = (Features(), not (det or tc_tiles.dq_pass(d))) if kernel == "dkdv" else ()
    return (fields, PlanRunner(False, plan),
            lambda: compiled(tc_plan.spec, kernel, t, False, "float16", *extra).resources())


def measure(fresh=False):
    tile_sweep(NAME, "float16", config(), fresh, _candidate)
