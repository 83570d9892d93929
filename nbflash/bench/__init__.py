"""The benchmark harness: every speed figure nbflash reports comes from here.

    import nbflash.bench
    result = nbflash.bench.run(out="figures/data/bench_h200.json")    # or python -m nbflash bench

- ``grid``: the FlashAttention-2 grid's points, their options and FLOPs;
- ``reference``: a problem's rotated inputs, the float64 reference on a slice, and the check
  (the tolerance rule) that every point passes before it is timed;
- ``runners``: every registered nbflash impl through the API, and torch SDPA beside them;
- ``timing``: the one timer (CUDA events over rotated inputs, median), host time, peak memory;
- ``store``: the one resumable JSON store (also the experiments'), run metadata;
- ``report``: tables on screen and in Markdown;
- ``run``: the grid run, resumable, and the host time per call;
- ``cli``: ``python -m nbflash bench`` and ``python -m nbflash report``.

The names below are the harness's public API, which the experiments and tuning sweeps use.
"""

from .device import FINAL, Unsupported, failure, free_memory, sync, to_host, xp
from .grid import (DROPOUT_SEED, DTYPES, GPU_DEFAULTS, PADDING_SPREAD, PASSES, SIM_DEFAULTS,
                   Point, api_options, defaults, flops, grid_points, options_label,
                   problem_size, record_key, record_options)
from .reference import (CHECK_SLICE, FACTORS, MAX_COPIES, MIN_COPIES, REFERENCE_CHUNK_BYTES,
                        Group, check, compare, copies_for, make_copies, reference_row_chunk,
                        slice_options, slice_reference)
from .report import markdown_table, print_host_overhead, print_table
from .run import default_out, gpu_short_name, measure_host_overhead, run
from .runners import (TORCH_IMPLS, NbflashRunner, TorchRunner, default_impls, exact_float32,
                      known_impls, make_runner, nbflash_impls)
from .store import StaleData, Store, load_json, run_meta, write_json
from .timing import (SIM_HOST, host_us, measure_passes, median_ms, peak_memory, time_ms,
                     time_pass)

__all__ = [
    "FINAL", "Unsupported", "failure", "free_memory", "sync", "to_host", "xp",
    "DROPOUT_SEED", "DTYPES", "GPU_DEFAULTS", "PADDING_SPREAD", "PASSES", "SIM_DEFAULTS",
    "Point", "api_options", "defaults", "flops", "grid_points", "options_label",
    "problem_size", "record_key", "record_options",
    "CHECK_SLICE", "FACTORS", "MAX_COPIES", "MIN_COPIES", "REFERENCE_CHUNK_BYTES", "Group",
    "check", "compare", "copies_for", "make_copies", "reference_row_chunk", "slice_options",
    "slice_reference",
    "markdown_table", "print_host_overhead", "print_table",
    "default_out", "gpu_short_name", "measure_host_overhead", "run",
    "TORCH_IMPLS", "NbflashRunner", "TorchRunner", "default_impls", "exact_float32",
    "known_impls", "make_runner", "nbflash_impls",
    "StaleData", "Store", "load_json", "run_meta", "write_json",
    "SIM_HOST", "host_us", "measure_passes", "median_ms", "peak_memory", "time_ms", "time_pass",
]
