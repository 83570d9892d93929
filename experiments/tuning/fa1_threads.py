"""How fa1's speed depends on threads per block, and on B*H (the grid), on this GPU.

fa1 runs one block per (batch, head): at a few problem sizes (B, H, N, d) each thread count
runs Algorithms 1 and 4 with fa1's default tiles (the largest M that fits, the paper's rule)
through its launch plan, checked against the float64 reference, then forward and backward
timed; the naive baseline is timed at the same points for the ratio. The thread count chosen
from these (nbflash/kernels/fa1/tiles.py, GPU_THREADS) and the H200's points are in
figures/data/fa1_threads_h200.json.
"""

from nbflash import bench
from nbflash.kernels.common.options import NONE
from nbflash.kernels.fa1 import plan as fa1_plan, tiles as fa1_tiles

from .. import common
from . import PlanRunner, data_path, measure_candidate

NAME = "fa1_threads"


def config():
    """(problems (B, H, N, d), thread counts, repeats) on a GPU and in the simulator."""
    return common.sized((((4, 8, 2048, 64), (4, 8, 2048, 128), (16, 32, 1024, 64),
                          (8, 16, 2048, 128)), (128, 256, 512), 5),
                        (((1, 2, 16, 8),), (8, 16), 1))


def measure(fresh=False):
    problems, threads, repeats = config()
    params = {"problems": problems, "threads": threads, "dtype": "float32", "causal": False,
              "repeats": repeats}
    store = common.Store(NAME, params, key=("impl", "B", "H", "N", "d", "threads"), fresh=fresh,
                         path=data_path(NAME),
                         planned=[{"impl": i, "B": B, "H": H, "N": N, "d": d, "threads": T}
                                  for B, H, N, d in problems
                                  for i, T in [("naive", None)] + [("fa1", T) for T in threads]])
    for B, H, N, d in problems:
        group = None
        for impl, T in [("naive", None)] + [("fa1", T) for T in threads]:
            if store.done(impl=impl, B=B, H=H, N=N, d=d, threads=T):
                continue
            group = group or bench.Group("float32", B, H, N, d, False)
            point = {"impl": impl, "B": B, "H": H, "N": N, "d": d, "threads": T}
            if impl == "naive":
                runner = bench.make_runner("naive", False, "float32", group)
            else:
                plans = [fa1_plan.Fa1Plan(fa1_tiles.tiles(kernel, d, T), False, d ** -0.5, NONE)
                         for kernel in fa1_plan.KERNELS]
                runner = PlanRunner(False, *plans)
            measure_candidate(store, point, group, runner, ("fwd", "bwd"), repeats, 1)
        del group
        bench.free_memory(collect=True)
    store.finish()
