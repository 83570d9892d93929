"""The one timer, and the host-time and peak-memory meters, that every measurement in nbflash
uses: the benchmark, the experiments, the tuning sweeps and ``python -m nbflash check``.

Timing: a pair of CUDA events on the current CuPy stream around each timed call (torch runs on
the same stream), after `warmup` calls; the calls are queued back to back and synchronized (CuPy
and torch) once at the end, so the GPU does not idle between them waiting for the host unless
the host launches slower than the GPU runs. The median of `repeats` calls is reported. Inputs
are rotated over copies (nbflash.bench.reference) so a call never finds its inputs still in L2.
In the simulator, wall clock around each call.

Host time: time.perf_counter() around single calls, never synchronizing inside the timed region
(every `sync_every` calls outside it). Peak memory: what CuPy's pool hands out on the GPU,
tracemalloc's count in the simulator.
"""

import contextlib
import statistics
import time
import tracemalloc

from .._cuda import MODE
from .device import failure, sync
from .reference import check


def median_ms(prepare, copies, repeats, warmup):
    """Median milliseconds of `repeats` calls after `warmup` calls. Call j is prepare(j % copies)
    (untimed preparation; returns the call to time), so consecutive calls read other inputs.

    GPU: a pair of CUDA events on the current CuPy stream around each call, the calls queued
    back to back with one synchronization at the end, so that the GPU does not wait for the
    host between them (it still does if the host launches slower than the GPU runs: that cost
    is the implementation's). Simulator: wall clock around each call.
    """
    for j in range(warmup):
        prepare(j % copies)()
    sync()
    order = [j % copies for j in range(warmup, warmup + repeats)]
    if MODE != "gpu":
        times = []
        for i in order:
            call = prepare(i)
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    import cupy  # noqa: PLC0415
    events = []
    for i in order:
        call = prepare(i)
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        call()
        end.record()
        events.append((start, end))
    sync()
    return statistics.median([cupy.cuda.get_elapsed_time(s, e) for s, e in events])


def time_ms(fn, repeats=5, warmup=1):
    """Median milliseconds of fn() with the one timer (:func:`median_ms`), the same inputs at
    every call."""
    return median_ms(lambda i: fn, 1, repeats, warmup)


def measure_passes(runner, group, passes, repeats, warmup, before_timing=None):
    """Check `runner` once on `group` (the backward too when a pass needs it), then yield the
    record fields of each pass in `passes`, in order: the check's verdict, with the pass's timing
    (time_pass) when the check passed. before_timing(i): called before pass i is timed."""
    verdict = check(runner, group, backward=any(p != "fwd" for p in passes))
    for i, p in enumerate(passes):
        fields = verdict["fwd" if p == "fwd" else "bwd"]
        if fields["status"] == "ok":
            if before_timing is not None:
                before_timing(i)
            fields = {**fields, **time_pass(runner, group, p, repeats, warmup)}
        yield fields


def time_pass(runner, group, pass_, repeats, warmup):
    """The record fields of a timed pass: median_ms and tflops, or the failure."""
    try:
        ms = median_ms(lambda i: runner.timed(pass_, group.copies, i), len(group.copies),
                       repeats, warmup)
    except Exception as exc:  # noqa: BLE001
        return failure(exc, "timing: ")
    return {"status": "ok", "median_ms": ms, "tflops": group.flops[pass_] / ms / 1e9,
            "repeats": repeats, "warmup": warmup, "copies": len(group.copies)}


#: host overhead: problem (B, H, N, d), calls measured, warm-up calls (compilation), sync period
GPU_HOST = {"shape": (1, 1, 128, 64), "calls": 300, "warmup": 10, "sync_every": 50}
SIM_HOST = {"shape": (1, 1, 16, 8), "calls": 3, "warmup": 1, "sync_every": 50}


def host_config():
    """How the host time is measured in this device mode (GPU_HOST, SIM_HOST)."""
    return dict(GPU_HOST if MODE == "gpu" else SIM_HOST)


def host_us(prepare, calls, warmup, sync_every):
    """Median microseconds of host time of one call: time.perf_counter() around the call only,
    no synchronization inside; the queue is drained every `sync_every` calls, outside."""
    for _ in range(warmup):      # first calls compile kernels
        prepare()()
    sync()
    times = []
    for i in range(calls):
        if i and i % sync_every == 0:
            sync()
        call = prepare()
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    sync()
    return statistics.median(times) * 1e6


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
