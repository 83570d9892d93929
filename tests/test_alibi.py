"""ALiBi (issue 17; Press et al., FlashAttention's alibi_slopes): the bias
-slope[b, h]·|i + Nk - Nq - j| is added to the scores after the softcap, before the masks and
the softmax; slopes of shape (H,) or (B, H). naive, fa2 and tc take it; fa1 (the paper as
written) refuses.

The float64 reference is checked against torch's autograd of the formula; each kernel impl
against the reference under the tolerance rule, alone and with the other options.
"""

import numpy as np
import pytest

import nbflash
from nbflash import MODE, naive
from support import assert_reference_is_autograd, check_option

runs_kernels = pytest.mark.skipif(MODE == "compile", reason="runs kernels")


def slopes_of(H):
    """The ALiBi paper's slopes, 2^(-8 (h + 1) / H)."""
    return 2.0 ** (-8.0 * (np.arange(H) + 1) / H)


def test_the_reference_is_the_formula_and_its_autograd():
    """softcap, then the bias, then the causal mask (bottom-right, Nq < Nk) and the softmax;
    per-batch slopes (B, H)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    B, H, Nq, Nk, d = 2, 2, 7, 11, 8
    q, do = (rng.standard_normal((B, H, Nq, d)) * 2 for _ in range(2))
    k, v = (rng.standard_normal((B, H, Nk, d)) * 2 for _ in range(2))
    slopes = rng.uniform(0.05, 1.0, (B, H))
    cap, tau = 4.0, 0.6
    i, j = torch.arange(Nq)[:, None], torch.arange(Nk)[None, :]

    def scores(tq, tk):
        S = cap * torch.tanh(tau * tq @ tk.transpose(-1, -2) / cap)
        S = S - torch.tensor(slopes)[..., None, None] * (i + Nk - Nq - j).abs()
        return S.masked_fill(j > i + Nk - Nq, float("-inf"))
    o = assert_reference_is_autograd(torch, q, k, v, do, scores, causal=True,
                                     softmax_scale=tau, softcap=cap, alibi_slopes=slopes)
    plain = naive.attention_forward(q, k, v, causal=True, softmax_scale=tau, softcap=cap)[0]
    assert np.abs(plain - o).max() > 0.01      # the bias changes the result here


def check(impl, dtype, B, H, H_kv, Nq, Nk, d, causal, slopes, scale=None, **opts):
    got, _ = check_option(impl, dtype, B, H, H_kv, Nq, Nk, d, causal, scale, data_seed=7,
                          what="alibi", alibi_slopes=np.asarray(slopes, np.float32), **opts)
    for name, x in got.items():
        assert not np.isnan(x).any(), f"NaN in {name}"


@runs_kernels
@pytest.mark.parametrize("impl,dtype,d,Nq,Nk,causal,per_batch,scale", [
    ("fa2", np.float32, 16, 21, 30, False, False, None),   # Nq < Nk, both sides of the diagonal
    ("fa2", np.float16, 8, 30, 21, True, True, 0.5),       # rows that see no key, slopes (B, H)
    ("tc", np.float16, 16, 36, 20, True, True, -0.4),      # tc flips Q's sign for τ < 0
])
def test_alibi_matches_the_reference(impl, dtype, d, Nq, Nk, causal, per_batch, scale):
    B, H = 2, 4
    slopes = np.stack([slopes_of(H), slopes_of(H)[::-1]]) if per_batch else slopes_of(H)
    check(impl, dtype, B, H, 2, Nq, Nk, d, causal, slopes, scale)


@runs_kernels
def test_alibi_with_every_option():
    """tc's atomic backward (d = 128 in the simulator's table) with dropout, key padding, a
    block mask, softcapping and a window; fa2's deterministic backward with softcapping."""
    B, H, Nq, Nk = 2, 2, 12, 19
    check("tc", np.float16, B, H, H, Nq, Nk, 128, True, [0.5, 0.125], dropout_p=0.2, seed=3,
          key_lengths=np.array([19, 7]), block_mask=np.array([[1, 0, 1], [1, 1, 1]], bool),
          block_size=(8, 8), softcap=3.0, window_size=(9, -1))
    check("fa2", np.float32, B, H, 1, Nq, Nk, 16, False, [[0.3, 0.2], [0.1, 0.0]],
          softcap=2.0, deterministic=True)


@pytest.mark.gpu
@runs_kernels
@pytest.mark.parametrize("impl,dtype,d", [("tc", np.float16, 64), ("tc", np.float16, 128),
                                          ("fa2", np.float32, 64)])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_alibi(impl, dtype, d, causal):
    check(impl, dtype, 2, 8, 2, 1000, 1337, d, causal, slopes_of(8))


@pytest.mark.parametrize("bad, match", [
    (np.ones(3), r"alibi_slopes has shape \(3,\); expected \(H,\) = \(2,\) or \(B, H\)"),
    (np.ones((2, 2)), r"alibi_slopes has shape \(2, 2\)"),
    (np.array([1.0, np.nan]), "alibi_slopes must be finite"),
    (np.array(["a", "b"]), "alibi_slopes must be numbers"),
])
def test_bad_slopes_are_refused(bad, match):
    q = np.zeros((1, 2, 4, 8), np.float32)
    with pytest.raises(nbflash.InputError, match=match):
        nbflash.attention(q, q, q, impl="naive", alibi_slopes=bad)


def test_fa1_refuses_alibi():
    q = np.zeros((1, 2, 4, 8), np.float32)
    with pytest.raises(nbflash.InputError, match="impl='fa1' does not take alibi_slopes"):
        nbflash.attention(q, q, q, impl="fa1", alibi_slopes=[0.5, 0.25])
