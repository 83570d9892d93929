"""The dropout generator (nbflash.rng): Philox4x32-10 against its published known answers, the
kept fraction, reproducibility, and the kernels' draws against the array version."""

import numpy as np
import pytest

import nbflash
from nbflash import rng
from support import host

# Random123's known-answer vectors for philox4x32 with 10 rounds (kat_vectors):
# (counter, key, result)
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,want", KAT)
def test_philox_known_answers(counter, key, want):
    got = rng.philox4x32(*(np.array([c], dtype=np.uint64) for c in counter),
                         *(np.uint64(k) for k in key))
    assert tuple(int(w[0]) for w in got) == want


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
def test_kept_fraction_is_one_minus_p(p):
    keep = rng.keep_mask(np, 4, 8, 256, 250, p, seed=1234)     # 2M entries
    frac = keep.mean()
    print(f"p={p}: kept {frac:.5f}")
    assert abs(frac - (1 - p)) < 0.01
    # and per head, and per row position, nothing far off (a broken counter would show here)
    assert np.abs(keep.mean(axis=(2, 3)) - (1 - p)).max() < 0.02
    assert np.abs(keep.mean(axis=(0, 1, 2)) - (1 - p)).max() < 0.05


def test_threshold():
    assert rng.threshold(0) == 0
    assert rng.threshold(0.5) == 32768
    assert rng.threshold(1 - 2**-20) == 65536


def test_same_seed_reproduces_and_others_differ():
    a = rng.keep_mask(np, 2, 3, 40, 50, 0.5, seed=7)
    np.testing.assert_array_equal(a, rng.keep_mask(np, 2, 3, 40, 50, 0.5, seed=7))
    for other in (rng.keep_mask(np, 2, 3, 40, 50, 0.5, seed=8),
                  rng.keep_mask(np, 2, 3, 40, 50, 0.5, seed=7 + 2**32),   # the high word
                  rng.keep_mask(np, 2, 3, 40, 50, 0.5, seed=7, offset=1)):
        assert 0.4 < (a != other).mean() < 0.6
    # heads and batch entries draw different numbers
    assert 0.4 < (a[0, 0] != a[0, 1]).mean() < 0.6
    assert 0.4 < (a[0, 0] != a[1, 0]).mean() < 0.6


def test_a_mask_is_a_prefix_of_a_longer_one():
    """The random number of an entry depends on its coordinates only, not on the sizes."""
    small = rng.keep_mask(np, 1, 2, 9, 13, 0.3, seed=5)
    big = rng.keep_mask(np, 1, 2, 20, 40, 0.3, seed=5)
    np.testing.assert_array_equal(small, big[:, :, :9, :13])


@pytest.mark.parametrize("Nq,Nk", [(5, 19), (3, 8), (1, 1)])
def test_kernels_draw_what_the_array_version_draws(Nq, Nk):
    got = host(nbflash.dropout_mask(2, 3, Nq, Nk, 0.4, seed=2**40 + 11, offset=3))
    want = rng.keep_mask(np, 2, 3, Nq, Nk, 0.4, seed=2**40 + 11, offset=3)
    assert got.dtype == bool and got.shape == (2, 3, Nq, Nk)
    np.testing.assert_array_equal(got, want)


@pytest.mark.gpu
def test_gpu_kernel_mask_on_a_large_sample():
    got = host(nbflash.dropout_mask(4, 16, 1024, 1000, 0.2, seed=99))
    assert abs(got.mean() - 0.8) < 0.01
    np.testing.assert_array_equal(got, rng.keep_mask(np, 4, 16, 1024, 1000, 0.2, seed=99))
