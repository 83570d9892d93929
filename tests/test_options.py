"""Dropout (Algorithms 2 and 4), key-padding masks and block-sparse attention (Algorithm 5) in
every impl (the registered ones with kernels that take each test's dtype and head dim, and the
naive baseline), against the float64 reference run with the same masks: for dropout the mask the
kernels exported (nbflash.dropout_mask), for padding and block masks the explicit element mask.
Shapes are ragged against the simulator's 8 x 8 fa2 tiles and fa1's M = 128 blocks (4 x 4)."""

import numpy as np
import pytest

import nbflash
from nbflash import impls, naive, sparsity
from nbflash.kernels.fa2 import plan as fa2_plan, tiles as fa2_tiles
from support import (assert_close, assert_masked_rows, host, kernel_impls, make_inputs, pairs,
                     reference, reference_options, run, small_block_options as fa, xp)

#: the impls with kernels taking the tests' default float32 inputs at head dim 8
KERNELS = kernel_impls(np.float32, 8)
#: those with a deterministic dQ pass
DETERMINISTIC = [i for i in KERNELS if impls.get(i).deterministic == "optional"]


def check(impl, opts, B=2, H=2, Nq=19, Nk=27, d=8, dtype=np.float32, causal=False, seed=0,
          deterministic=False):
    """impl with `opts` against the float64 reference (dropout: with the exported mask) under
    the tolerance rule, the naive baseline in the same dtype with the same options as the
    yardstick. Returns the outputs."""
    rng = np.random.default_rng(seed)
    q, k, v, do = make_inputs(rng, B, H, Nq, Nk, d, dtype)
    ref = reference(q, k, v, do, causal, **reference_options(opts, B, H, Nq, Nk))
    extra = {"deterministic": True} if deterministic else {}
    got = run(impl, q, k, v, do, causal, **opts, **extra, **fa(impl))
    base = run("naive", q, k, v, do, causal, **opts)
    for name, x in got.items():
        assert not np.isnan(x).any(), f"NaN in {name}"
    assert_close(got, base, ref, dtype, f"{impl} {sorted(opts)} causal={causal} {dtype}")
    return got


# ---------------------------------------------------------------------------------- dropout

@pytest.mark.parametrize("impl,dtype", pairs([np.float32, np.float16], 8)
                         + [("naive", np.float32), ("naive", np.float16)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dropout_matches_the_reference_with_the_exported_mask(impl, causal, dtype):
    check(impl, {"dropout_p": 0.3, "seed": 2**33 + 5, "offset": 7}, causal=causal, dtype=dtype)


@pytest.mark.parametrize("impl", DETERMINISTIC)
def test_dropout_deterministic_dq_pass(impl):
    check(impl, {"dropout_p": 0.5, "seed": 3}, causal=True, deterministic=True)


@pytest.mark.parametrize("impl", KERNELS)
def test_dropout_zero_is_the_plain_path_exactly(impl):
    rng = np.random.default_rng(1)
    q, k, v, do = make_inputs(rng, 1, 2, 13, 21, 8, np.float32)
    plain = run(impl, q, k, v, do, True, **fa(impl))
    zero = run(impl, q, k, v, do, True, dropout_p=0.0, seed=5, **fa(impl))
    for name in plain:
        np.testing.assert_array_equal(zero[name], plain[name], err_msg=name)


@pytest.mark.parametrize("impl", KERNELS)
def test_dropout_same_seed_reproduces_other_seed_differs(impl):
    rng = np.random.default_rng(2)
    q, k, v, do = make_inputs(rng, 1, 2, 13, 21, 8, np.float32)
    opts = dict(dropout_p=0.5, deterministic=impl in DETERMINISTIC, **fa(impl))
    a = run(impl, q, k, v, do, False, seed=1, **opts)
    b = run(impl, q, k, v, do, False, seed=1, **opts)
    c = run(impl, q, k, v, do, False, seed=2, **opts)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert not np.array_equal(a["o"], c["o"])
    np.testing.assert_array_equal(a["lse"], c["lse"])   # lse is the softmax's, before dropout


# ------------------------------------------------------------------------------ key padding

@pytest.mark.parametrize("impl", KERNELS + ["naive"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_key_lengths(impl, causal):
    # lengths: inside a block, on a block edge, the whole sequence, and 0 (rows see nothing)
    lengths = np.array([5, 8, 27, 0])
    got = check(impl, {"key_lengths": lengths}, B=4, H=1, causal=causal)
    assert np.all(got["o"][3] == 0) and np.all(np.isneginf(got["lse"][3]))
    for b, n in enumerate(lengths):   # keys no query sees get exactly zero gradients
        assert np.all(got["dk"][b, :, n:] == 0) and np.all(got["dv"][b, :, n:] == 0)


@pytest.mark.parametrize("impl", kernel_impls(np.float16, 8))
def test_key_lengths_with_dropout_and_causal(impl):
    check(impl, {"key_lengths": [11, 20], "dropout_p": 0.2, "seed": 9}, causal=True,
          dtype=np.float16)


@pytest.mark.parametrize("impl", KERNELS)
def test_key_lengths_as_the_paper_draws_them(impl):
    """Lengths from U[N - 20, N], as in the paper's benchmarks."""
    N = 40
    lengths = np.random.default_rng(0).integers(N - 20, N + 1, size=3)
    check(impl, {"key_lengths": lengths}, B=3, H=2, Nq=N, Nk=N)


# ----------------------------------------------------------------------------- block sparse

@pytest.mark.parametrize("impl", KERNELS + ["naive"])
@pytest.mark.parametrize("block_size", [8, (4, 16), (5, 7)], ids=["8", "4x16", "5x7"])
def test_block_sparse(impl, block_size):
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
    nbq, nbk = sparsity.n_blocks(19, bq), sparsity.n_blocks(27, bk)
    mask = sparsity.random_blocks(nbq, nbk, 0.5, seed=3)
    check(impl, {"block_mask": mask, "block_size": block_size})


@pytest.mark.parametrize("impl", KERNELS)
def test_block_sparse_per_head_with_rows_that_see_nothing(impl):
    """A mask per head; in head 0 the first query block is masked entirely: o = 0, lse -inf,
    dq = 0, no NaN; with causal, padding and dropout on top."""
    mask = np.stack([sparsity.butterfly(3, 4), sparsity.local_global(3, 4, window=0)])
    mask[0, 0] = False
    opts = {"block_mask": mask, "block_size": 8, "key_lengths": [26, 17],
            "dropout_p": 0.25, "seed": 4}
    got = check(impl, opts, causal=True)
    assert np.all(got["o"][:, 0, :8] == 0) and np.all(got["dq"][:, 0, :8] == 0)
    assert np.all(np.isneginf(got["lse"][:, 0, :8]))


@pytest.mark.parametrize("impl", DETERMINISTIC)
def test_block_sparse_deterministic_dq_pass(impl):
    mask = sparsity.random_blocks(3, 4, 0.4, seed=1)
    check(impl, {"block_mask": mask, "block_size": 8, "key_lengths": [27, 9]},
          causal=True, deterministic=True)


@pytest.mark.parametrize("impl", KERNELS)
def test_all_blocks_masked(impl):
    got = check(impl, {"block_mask": np.zeros((3, 4), bool), "block_size": 8})
    assert_masked_rows(got, 19, 27, False)
    assert np.all(got["o"] == 0) and np.all(np.isneginf(got["lse"]))
    for name in ("dq", "dk", "dv"):
        assert np.all(got[name] == 0), name


@pytest.mark.skipif(xp is not np, reason="host functions take the simulator's NumPy arrays")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fa2_double_buffered_tiles_skip_masked_blocks(causal):
    """With stages = 2 the next *unmasked* block is prefetched while one is computed: a mask
    that skips blocks between unmasked ones, with padding and dropout."""
    tiles = fa2_tiles.RegTiles(8, 8, 16, 2, 2, 2)
    rng = np.random.default_rng(8)
    B, H, Nq, Nk, d = 2, 1, 21, 45, 16
    q, k, v, do = make_inputs(rng, B, H, Nq, Nk, d, np.float32)
    mask = np.array([[1, 0, 0, 1, 0, 1], [0, 1, 1, 0, 0, 1], [1, 0, 0, 0, 0, 0]], bool)
    masking = dict(dropout_p=0.3, seed=6, offset=0, key_lengths=np.array([45, 30], np.int32),
                   block_mask=mask.reshape(1, 1, 3, 6).astype(np.uint8), block_size=(8, 8))
    scale = 1.0 / np.sqrt(d)
    o, lse = fa2_plan.run_forward(xp, q, k, v, causal=causal, scale=scale, tiles=tiles,
                                  masking=masking)
    grads = fa2_plan.run_backward(xp, do, q, k, v, o, lse, causal=causal, scale=scale,
                                  tiles={"dkdv": tiles, "dq": tiles}, masking=masking)
    got = dict(zip(("o", "lse", "dq", "dk", "dv"), (host(x) for x in (o, lse, *grads))))
    keep = nbflash.dropout_mask(B, H, Nq, Nk, 0.3, 6)
    ref_opts = dict(dropout_p=0.3, keep=keep, key_lengths=masking["key_lengths"],
                    block_mask=mask, block_size=(8, 8))
    ref = reference(q, k, v, do, causal, **ref_opts)
    o_n, lse_n = naive.attention_forward(q, k, v, causal=causal, **ref_opts)
    base = dict(zip(("o", "lse", "dq", "dk", "dv"),
                    (o_n, lse_n, *naive.attention_backward(do, q, k, v, o_n, lse_n,
                                                           causal=causal, **ref_opts))))
    assert_close(got, base, ref, np.float32, f"stages=2 causal={causal}")


# ---------------------------------------------------------------------------------- helpers

def test_sparsity_patterns():
    bf = sparsity.butterfly(16)
    assert bf.shape == (16, 16) and bf.diagonal().all() and (bf == bf.T).all()
    assert sparsity.density(bf) == pytest.approx((1 + 4) / 16)
    assert bf[0, 1] and bf[0, 2] and bf[0, 8] and not bf[0, 3]
    lg = sparsity.local_global(6, window=1, n_global=1)
    assert lg[0].all() and lg[:, 0].all() and lg[3, 4] and not lg[2, 5]
    for density in (0.1, 0.2, 0.5, 1.0):
        m = sparsity.random_blocks(64, 64, density, seed=2)
        assert m.sum() == round(density * 64 * 64)
    el = sparsity.expand(np.array([[1, 0], [0, 1]], bool), (3, 2), 5, 4)
    assert el.shape == (5, 4) and el[:3, :2].all() and not el[:3, 2:].any() and el[3:, 2:].all()
    with pytest.raises(ValueError):
        sparsity.random_blocks(2, 2, 1.5)


# ------------------------------------------------------------------------------- bad input

def _qkv():
    rng = np.random.default_rng(0)
    return make_inputs(rng, 2, 2, 9, 11, 8, np.float32)[:3]


@pytest.mark.parametrize("opts,words", [
    ({"dropout_p": 1.0, "seed": 1}, "dropout_p must be in [0, 1)"),
    ({"dropout_p": -0.1, "seed": 1}, "dropout_p must be in [0, 1)"),
    ({"dropout_p": "0.1", "seed": 1}, "dropout_p must be a number"),
    ({"dropout_p": 0.1}, "needs a seed"),
    ({"dropout_p": 0.1, "seed": -1}, "seed must be an integer"),
    ({"dropout_p": 0.1, "seed": 2**64}, "seed must be an integer"),
    ({"dropout_p": 0.1, "seed": 1.5}, "seed must be an integer"),
    ({"dropout_p": 0.1, "seed": 1, "offset": 2**32}, "offset must be an integer"),
    ({"key_lengths": [3]}, "key_lengths has shape (1,); expected (B,) = (2,)"),
    ({"key_lengths": [3.0, 4.0]}, "key_lengths must be integers"),
    ({"key_lengths": [3, 12]}, "key_lengths must be in [0, Nk] = [0, 11]"),
    ({"key_lengths": [-1, 2]}, "key_lengths must be in [0, Nk]"),
    ({"block_mask": np.ones((2, 2), bool)}, "block_mask needs block_size"),
    ({"block_size": 8}, "block_size is given without block_mask"),
    ({"block_mask": np.ones((2, 2), bool), "block_size": 0}, "block_size must be a positive"),
    ({"block_mask": np.ones((2, 2), bool), "block_size": (8, 8, 8)}, "block_size must be"),
    ({"block_mask": np.ones((2, 3), bool), "block_size": 8}, "expected (..., 2, 2)"),
    ({"block_mask": np.ones((3, 2, 2), bool), "block_size": 8}, "do not match (B, H)"),
    ({"block_mask": np.ones((2, 2), np.float32), "block_size": 8}, "must be boolean"),
])
@pytest.mark.parametrize("impl", ["naive"] + KERNELS)
def test_bad_options_are_refused_before_any_kernel(opts, words, impl):
    q, k, v = _qkv()
    with pytest.raises(nbflash.InputError) as exc:
        nbflash.attention_forward(q, k, v, impl=impl, **opts)
    assert words in str(exc.value)


def test_bad_dropout_mask_arguments():
    with pytest.raises(nbflash.InputError, match="Nk must be a positive integer"):
        nbflash.dropout_mask(1, 1, 4, 0, 0.1, 1)
    with pytest.raises(nbflash.InputError, match="needs a seed"):
        nbflash.dropout_mask(1, 1, 4, 4, 0.1, None)


# ------------------------------------------------------------------------------- GPU sizes

@pytest.mark.gpu
@pytest.mark.parametrize("impl", kernel_impls(np.float16, 64))
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gpu_all_options(impl, d, causal):
    N = 1000
    lengths = np.random.default_rng(0).integers(N - 20, N + 1, size=2)
    mask = sparsity.random_blocks(sparsity.n_blocks(N, 64), sparsity.n_blocks(N, 64), 0.5, 1)
    check(impl, {"dropout_p": 0.1, "seed": 12345, "key_lengths": lengths,
                 "block_mask": mask, "block_size": 64}, B=2, H=4, Nq=N, Nk=N, d=d,
          dtype=np.float16, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("opts", [{"dropout_p": 0.2, "seed": 1}, {"key_lengths": [900, 1000]},
                                  {"block_mask": sparsity.butterfly(16), "block_size": 64}],
                         ids=["dropout", "padding", "sparse"])
@pytest.mark.parametrize("impl", [i for i in kernel_impls(np.float32, 64)
                                  if impls.get(i).at_scale])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_each_option_float32(opts, d, impl):
    check(impl, opts, B=2, H=4, Nq=1000, Nk=1000, d=d, dtype=np.float32, causal=True)
    if impls.get(impl).deterministic == "optional":
        check(impl, opts, B=2, H=4, Nq=1000, Nk=1000, d=d, dtype=np.float32, deterministic=True)
