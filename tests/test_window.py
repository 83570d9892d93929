"""Sliding-window attention (issue 17; Mistral's, Gemma's and FlashAttention's window_size):
query i sees key j only when i + Nk - Nq - left <= j <= i + Nk - Nq + right, a side of -1
unbounded, combined with the causal mask by intersection. naive, fa2 and tc take it; fa1 (the
paper as written) refuses a window that hides anything.

The float64 reference's window is checked against the definition and against the same pattern
as a block mask of 1 x 1 blocks; each kernel impl against the reference under the tolerance
rule, alone and with every other option; rows whose window holds no key; and that the kernels
skip the tiles outside every row's window (NaN keys there would reach the outputs otherwise).
"""

import numpy as np
import pytest

import nbflash
from nbflash import MODE, naive
from support import check_option, randn, reference, run

runs_kernels = pytest.mark.skipif(MODE == "compile", reason="runs kernels")


def _definition(Nq, Nk, causal, left, right):
    vis = np.zeros((Nq, Nk), bool)
    for i in range(Nq):
        for j in range(Nk):
            d = i + Nk - Nq
            vis[i, j] = (left < 0 or j >= d - left) and (right < 0 or j <= d + right) \
                and (not causal or j <= d)
    return vis


@pytest.mark.parametrize("Nq,Nk", [(9, 9), (5, 12), (12, 5)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [(0, 0), (2, 1), (-1, 3), (4, -1), (30, 30)])
def test_the_reference_window_is_the_definition(Nq, Nk, causal, window):
    got = naive.visible(1, 1, Nq, Nk, causal=causal, window_size=window)
    want = _definition(Nq, Nk, causal, *window)
    np.testing.assert_array_equal(np.broadcast_to(got, (Nq, Nk)), want)


def test_the_reference_window_is_a_block_mask_of_single_entries():
    """The float64 reference with a window and with the same pattern as a block mask of
    1 x 1 blocks: the same bits (both hide the same scores before the same softmax)."""
    rng = np.random.default_rng(1)
    q, do = (rng.standard_normal((1, 2, 11, 8)) for _ in range(2))
    k, v = (rng.standard_normal((1, 2, 14, 8)) for _ in range(2))
    bm = _definition(11, 14, True, 3, -1)
    a = reference(q, k, v, do, True, window_size=(3, -1))
    b = reference(q, k, v, do, True, block_mask=bm, block_size=1)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    c = reference(q, k, v, do, True)
    assert np.abs(a["o"] - c["o"]).max() > 0.01      # the window changes the result here


def check(impl, dtype, B, H, H_kv, Nq, Nk, d, causal, window, scale=None, **opts):
    got, ref = check_option(impl, dtype, B, H, H_kv, Nq, Nk, d, causal, scale,
                            what=f"window={window}", window_size=window, **opts)
    assert_rows_without_keys(got, ref)
    return got, ref


def assert_rows_without_keys(got, ref):
    """Rows that see no key (the reference's lse is -inf there): o and dq exactly 0, lse -inf;
    every other row's lse finite; no NaN anywhere."""
    for name, x in got.items():
        assert not np.isnan(x).any(), f"NaN in {name}"
    none = np.isneginf(ref["lse"])
    assert np.array_equal(np.isneginf(got["lse"]), none), "rows with lse = -inf differ"
    assert np.all(got["o"][none] == 0) and np.all(got["dq"][none] == 0), \
        "o or dq of rows that see no key is not 0"


@runs_kernels
@pytest.mark.parametrize("impl,dtype,d,Nq,Nk,causal,window", [
    ("fa2", np.float32, 16, 37, 45, False, (5, 3)),     # both sides, H_kv < H
    ("fa2", np.float16, 8, 40, 29, True, (7, -1)),      # Mistral's: causal, a left bound
    ("fa2", np.float32, 8, 21, 50, False, (-1, 2)),     # a right bound only
    ("tc", np.float16, 16, 48, 48, True, (6, 9)),       # causal folds right to 0; the second
                                                        # query tile skips the first key tile
])
def test_window_matches_the_reference(impl, dtype, d, Nq, Nk, causal, window):
    check(impl, dtype, 1, 4, 2, Nq, Nk, d, causal, window)


@runs_kernels
def test_window_with_every_option():
    """tc's dQ pass (d = 32 in the simulator's table; its atomic backward with a window:
    tests/test_alibi.py) with dropout, key padding, a block mask and softcapping; fa2's
    deterministic backward with key padding."""
    kl, bm = np.array([19, 7]), np.array([[1, 0, 1], [1, 1, 1]], bool)
    check("tc", np.float16, 2, 2, 2, 12, 19, 32, True, (6, -1), dropout_p=0.2, seed=11,
          key_lengths=kl, block_mask=bm, block_size=(8, 8), softcap=3.0)
    check("fa2", np.float32, 2, 2, 1, 12, 19, 16, False, (3, 4), key_lengths=kl,
          deterministic=True)


@runs_kernels
@pytest.mark.parametrize("impl,dtype", [("fa2", np.float32), ("tc", np.float16)])
def test_rows_whose_window_holds_no_key(impl, dtype):
    """window (0, 1) with Nq > Nk: the first Nq - Nk - 1 rows' windows lie before the first
    key; with key_lengths [.., 3] the later rows' windows lie past batch entry 1's keys."""
    got, ref = check(impl, dtype, 2, 2, 2, 30, 12, 16 if impl == "fa2" else 32, False, (0, 1),
                     key_lengths=np.array([12, 3]))
    assert np.isneginf(ref["lse"][0, :, :17]).all() and np.isfinite(ref["lse"][0, :, 17:]).all()
    assert np.isneginf(ref["lse"][1, :, 21:]).all()


@pytest.mark.skipif(MODE != "sim", reason="the simulator's tiles (the GPU's: test_gpu_window_"
                                          "deterministic_and_skipping)")
@pytest.mark.parametrize("impl,dtype,d", [("fa2", np.float32, 16), ("tc", np.float16, 16)])
def test_tiles_outside_every_window_are_skipped(impl, dtype, d):
    """NaN in keys 0 and 1 (k and v), window (3, 0) with causal masking at Nq = Nk = 64: rows
    from 32 on see none of them, and their query tiles (32 rows at most in the simulator's
    tables) lie beyond the reach of the keys' tile (16 keys at most), which the kernels skip; a
    kernel that computed it masked would still take 0 · NaN into o. So rows from 32 on are
    finite in o and lse, those from 48 on in dq (the dK/dV pass's atomic dQ visits the query
    tiles that keys 0..31 reach), keys from 32 on in dk and dv; the rows that see key 0 or 1
    are NaN."""
    rng = np.random.default_rng(2)
    q, do = (randn(rng, (1, 2, 64, d), dtype) for _ in range(2))
    k, v = (randn(rng, (1, 2, 64, d), dtype) for _ in range(2))
    k[..., :2, :] = np.nan
    v[..., :2, :] = np.nan
    got = run(impl, q, k, v, do, True, window_size=(3, 0))
    assert np.isnan(got["o"][:, :, :5]).all(), "rows that see a NaN key are not NaN"
    for name, rows in (("o", 32), ("lse", 32), ("dq", 48), ("dk", 32), ("dv", 32)):
        assert np.isfinite(got[name][:, :, rows:]).all(), f"{name} from row {rows} on"


@pytest.mark.gpu
@runs_kernels
@pytest.mark.parametrize("impl,dtype,d", [("tc", np.float16, 64), ("tc", np.float16, 128),
                                          ("fa2", np.float32, 64)])
@pytest.mark.parametrize("causal,window", [(True, (256, -1)), (False, (100, 37)),
                                           (False, (-1, 64))])
def test_gpu_window(impl, dtype, d, causal, window):
    check(impl, dtype, 2, 8, 2, 1000, 1337, d, causal, window)


@pytest.mark.gpu
@runs_kernels
def test_gpu_window_deterministic_and_skipping():
    """The deterministic dQ pass with a window, and the NaN check of tile skipping at the
    GPU's tiles (key tiles of 64 to 128: NaN in keys 0, 1; rows and keys from 512 on)."""
    check("tc", np.float16, 1, 4, 4, 700, 700, 128, True, (64, -1), deterministic=True)
    check("fa2", np.float32, 1, 4, 4, 700, 700, 64, True, (64, -1), deterministic=True)
    rng = np.random.default_rng(2)
    for impl, dtype in (("tc", np.float16), ("fa2", np.float32)):
        q, k, v, do = (randn(rng, (1, 2, 1024, 64), dtype) for _ in range(4))
        k[..., :2, :] = np.nan
        v[..., :2, :] = np.nan
        got = run(impl, q, k, v, do, True, window_size=(3, 0))
        assert np.isnan(got["o"][:, :, :5]).all()
        for name in ("o", "lse", "dq", "dk", "dv"):
            assert np.isfinite(got[name][:, :, 512:]).all(), (impl, name)


@pytest.mark.parametrize("bad", [(-2, 0), (1.5, 0), (1, 2, 3), "ab", 4, None, (True, 0)])
def test_bad_windows_are_refused(bad):
    q = np.zeros((1, 1, 4, 8), np.float32)
    with pytest.raises(nbflash.InputError, match="window_size must be a pair"):
        nbflash.attention(q, q, q, impl="naive", window_size=bad)


def test_fa1_refuses_a_window_that_hides_keys():
    q = np.zeros((1, 1, 4, 8), np.float32)
    with pytest.raises(nbflash.InputError, match=r"impl='fa1' does not take window_size"):
        nbflash.attention(q, q, q, impl="fa1", window_size=(2, 0))
    with pytest.raises(nbflash.InputError, match=r"impl='fa1' does not take window_size"):
        nbflash.attention(q, q, q, impl="fa1", causal=True, window_size=(1, -1))


@runs_kernels
def test_a_window_that_hides_nothing_is_no_window():
    """(-1, -1), and with causal masking any window without a left bound, hide nothing more:
    fa1 takes them, and they give fa2 the same bits as no window."""
    rng = np.random.default_rng(3)
    q, k, v = (randn(rng, (1, 1, 9, 8), np.float32) for _ in range(3))
    plain = nbflash.attention(q, k, v, impl="fa2", causal=True)
    for window in ((-1, -1), (-1, 0), (-1, 5)):
        np.testing.assert_array_equal(
            nbflash.attention(q, k, v, impl="fa2", causal=True, window_size=window), plain)
    nbflash.attention(q, k, v, impl="fa1", causal=True, window_size=(-1, 2))
