"""Timing and peak memory of a call, on the GPU (CUDA events, CuPy's allocator) or in the
simulator (wall clock, tracemalloc)."""

import contextlib
import statistics
import time
import tracemalloc

from ._cuda import MODE


def sync():
    if MODE == "gpu":
        import cupy  # noqa: PLC0415
        cupy.cuda.get_current_stream().synchronize()


def time_ms(fn, repeats=5, warmup=1):
    """Median milliseconds of `fn()` over `repeats` runs after `warmup` runs.

    GPU: CUDA events on the current stream around each run. Simulator: wall clock.
    """
    for _ in range(warmup):
        fn()
    sync()
    times = []
    if MODE == "gpu":
        import cupy  # noqa: PLC0415
        for _ in range(repeats):
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _pool_hook():
    """A CuPy memory hook counting the bytes CuPy's pool hands out (what arrays hold) and their
    peak. CuPy is imported here, so the simulator never needs it."""
    import cupy  # noqa: PLC0415

    class PeakHook(cupy.cuda.MemoryHook):
        name = "nbflash-peak"

        def __init__(self):
            self.current = 0
            self.peak = 0

        def malloc_postprocess(self, device_id, size, mem_size, mem_ptr, pmem_id):
            self.current += mem_size
            self.peak = max(self.peak, self.current)

        def free_postprocess(self, device_id, mem_size, mem_ptr, pmem_id):
            self.current -= mem_size

    return PeakHook()


@contextlib.contextmanager
def peak_memory():
    """Yields a dict whose "bytes" is, on exit, the peak memory allocated inside the block
    beyond what was allocated before it (device memory through CuPy on the GPU; host memory
    through tracemalloc in the simulator, which also counts the simulator's array copies)."""
    out = {"bytes": 0}
    if MODE == "gpu":
        hook = _pool_hook()
        with hook:
            yield out
        out["bytes"] = hook.peak
        return
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    try:
        yield out
    finally:
        out["bytes"] = max(0, tracemalloc.get_traced_memory()[1] - base)
        if not was_tracing:
            tracemalloc.stop()
