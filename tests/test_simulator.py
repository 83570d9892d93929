"""nbflash's fix to the CUDA simulator: one shared array per call site per block, also when the
block's threads reach cuda.shared.array together (numba-cuda 0.30 looks it up without a lock)."""

import time

import numpy as np
import pytest

from nbflash import MODE
from nbflash._cuda import cuda

pytestmark = pytest.mark.skipif(MODE != "sim", reason="simulator only")


@cuda.jit
def _neighbour(out):
    a = cuda.shared.array(16, np.float32)
    t = cuda.threadIdx.x
    a[t] = t
    cuda.syncthreads()
    out[t] = a[(t + 1) % 16]


def test_threads_of_a_block_share_one_array_under_contention(monkeypatch):
    from numba.cuda.simulator import kernelapi

    real_empty = np.empty

    def slow_empty(*args, **kwargs):  # hold the race window open: every thread gets in
        time.sleep(0.01)
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(kernelapi.np, "empty", slow_empty)
    for _ in range(3):
        out = np.full(16, -1.0, np.float32)
        _neighbour[1, 16](out)
        np.testing.assert_array_equal(out, (np.arange(16) + 1) % 16)
