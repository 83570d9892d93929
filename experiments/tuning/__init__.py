"""Tuning sweeps: which tiles (fa2, tc, fa3) or threads per block (fa1) make a kernel family
fastest on this GPU.

    python -m experiments.tuning NAME [--fresh]          (on a GPU; in the simulator at tiny sizes)

Each candidate is checked against the float64 reference before it is timed, exactly as the
benchmark checks and times its points (nbflash.bench: the tolerance rule on a slice, CUDA events
over rotated inputs, the median), through a launch plan built with the candidate's tiles. The
points go to figures/data/<name>_<gpu>.json (the benchmark's resumable store: a rerun skips what
is there). The winners go into the family's tile table by hand (nbflash/kernels/<family>/
tiles.py), whose comment names the data.
"""

import nbflash
from nbflash import bench
from nbflash._cuda import MODE

from .. import common

#: the sweeps, in the order `python -m experiments.tuning all` runs them
NAMES = ("fa2_tiles", "tc_tiles", "fa1_threads", "fa3_tiles")


def data_path(name):
    """figures/data/<name>_<gpu>.json (<name>_sim.json in the simulator)."""
    gpu = bench.gpu_short_name(nbflash.info()["gpu"] or "gpu") if MODE == "gpu" else "sim"
    return common.FIGURES / "data" / f"{name}_{gpu}.json"


def stream():
    """CuPy's current stream on the GPU (where the timer's events are recorded), else 0."""
    if MODE != "gpu":
        return 0
    import cupy  # noqa: PLC0415
    return cupy.cuda.get_current_stream().ptr


class PlanRunner(bench.NbflashRunner):
    """Launch plans (a family's, built with a candidate's tiles) in the benchmark's runner
    protocol: `forward` runs the forward plan, `backward` the backward plan (None: the same)."""

    def __init__(self, causal, forward, backward=None):
        super().__init__(None, causal)
        self.fwd_plan, self.bwd_plan = forward, backward or forward

    def forward(self, q, k, v):
        return self.fwd_plan.forward(bench.xp(), q, k, v, stream())

    def backward(self, do, q, k, v, o, lse):
        return self.bwd_plan.backward(bench.xp(), do, q, k, v, o, lse, stream())


def measure_candidate(store, point, group, runner, passes, repeats, warmup, resources=None):
    """Check `runner` on `group`, time `passes`, and store `point` with what was measured
    (the first pass's fields; a pass after it as "<pass>_ms" and "<pass>_tflops")."""
    try:
        fields = list(bench.measure_passes(runner, group, passes, repeats, warmup))
        point.update(fields[0])
        for p, f in zip(passes[1:], fields[1:]):
            point[f"{p}_ms"], point[f"{p}_tflops"] = f.get("median_ms"), f.get("tflops")
        if point["status"] == "ok" and resources is not None and MODE == "gpu":
            point.update(resources())
    except Exception as exc:  # noqa: BLE001  (recorded, the sweep goes on)
        point.update(bench.failure(exc))
    store.add(point)
    what = (f"{point.get('kernel', point.get('impl'))} d={point['d']} "
            f"{point.get('tiles', point.get('threads'))}")
    print(f"{what}: {point['median_ms']:.3f} ms, {point['tflops']:.2f} TFLOP/s"
          if point["status"] == "ok" else f"{what}: {point['status']} {point.get('error', '')}",
          flush=True)
    return point


def tile_sweep(name, dtype, config, fresh, candidate):
    """The loop of the tile sweeps (fa2_tiles, tc_tiles): config = (candidates {kernel: {d:
    [tile sizes, ...]}}, N, tokens, hidden, repeats) at the FlashAttention-2 grid's point N,
    not causal. For each kernel and head dim, one Group (inputs and reference); each candidate
    not stored yet gives candidate(kernel, d, sizes, B, H, N) -> (fields, runner, resources):
    the point's own fields, and a runner of the plan with those tiles (None: the candidate
    cannot run, fields say why) whose forward (the forward kernel) or backward (the others) is
    checked, then timed."""
    candidates, N, tokens, hidden, repeats = config
    params = {"candidates": {k: {str(d): c for d, c in v.items()} for k, v in candidates.items()},
              "N": N, "tokens": tokens, "hidden": hidden, "dtype": dtype, "causal": False,
              "repeats": repeats}
    store = common.Store(name, params, key=("kernel", "d", "tiles"), fresh=fresh,
                         path=data_path(name),
                         planned=[{"kernel": k, "d": d, "tiles": list(sizes)}
                                  for k, by_d in candidates.items()
                                  for d, cands in by_d.items() for sizes in cands])
    for kernel, by_d in candidates.items():
        for d, cands in by_d.items():
            B, H = bench.problem_size(tokens, hidden, N, d)
            group = None
            for sizes in cands:
                if store.done(kernel=kernel, d=d, tiles=list(sizes)):
                    continue
                fields, runner, resources = candidate(kernel, d, sizes, B, H, N)
                point = {"kernel": kernel, "d": d, "tiles": list(sizes), "B": B, "H": H, "N": N,
                         **fields}
                if runner is None:
                    store.add(point)
                    continue
                group = group or bench.Group(dtype, B, H, N, d, False)
                passes = ("fwd",) if kernel == "forward" else ("bwd",)
                measure_candidate(store, point, group, runner, passes, repeats, 2, resources)
            del group
            bench.free_memory(collect=True)
    store.finish()
