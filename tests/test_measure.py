"""Timing and peak-memory helpers used by `nbflash check` (and the benchmarks)."""

import numpy as np

from nbflash.bench import peak_memory, time_ms
from support import xp


def test_peak_memory_counts_what_a_block_allocates_and_frees():
    n = 4 << 20
    with peak_memory() as mem:
        a = xp.ones(n, dtype=np.uint8)
        b = xp.ones(n, dtype=np.uint8)
        del a, b
    assert 2 * n <= mem["bytes"] < 3 * n, mem


def test_time_ms_is_a_positive_median():
    assert time_ms(lambda: xp.ones(1000).sum(), repeats=3) > 0
