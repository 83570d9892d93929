"""Softcapping (issue 17; Gemma 2's attn_logit_softcapping): with softcap > 0 the scores are
softcap·tanh(τ q·kᵀ / softcap), the masks and the softmax as before, and the backward takes the
derivative's factor 1 - tanh². naive, fa2 and tc take it; fa1 (the paper as written) refuses.

The float64 reference (nbflash.naive) is checked against torch's autograd of the formula; each
kernel impl against the reference under the tolerance rule, the naive baseline in the test's
dtype as the yardstick, with causal masking, grouped-query heads, a negative scale (tc flips
Q's sign), and with every other option.
"""

import numpy as np
import pytest

import nbflash
from nbflash import MODE, naive
from support import assert_masked_rows, assert_reference_is_autograd, check_option

runs_kernels = pytest.mark.skipif(MODE == "compile", reason="runs kernels")


def test_the_reference_is_the_formula_and_its_autograd():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    q, k, v, do = (rng.standard_normal(s) * 2 for s in ((1, 2, 9, 8), (1, 2, 13, 8),
                                                        (1, 2, 13, 8), (1, 2, 9, 8)))
    cap, tau = 3.0, 0.7

    def scores(tq, tk):
        S = cap * torch.tanh(tau * tq @ tk.transpose(-1, -2) / cap)
        return S.masked_fill(~torch.ones(9, 13, dtype=torch.bool).tril(13 - 9), float("-inf"))
    o = assert_reference_is_autograd(torch, q, k, v, do, scores, causal=True,
                                     softmax_scale=tau, softcap=cap)
    plain = naive.attention_forward(q, k, v, causal=True, softmax_scale=tau)[0]
    assert np.abs(plain - o).max() > 0.01      # the cap changes the result here


def check(impl, dtype, B, H, H_kv, Nq, Nk, d, causal, softcap, scale=None, **opts):
    got, _ = check_option(impl, dtype, B, H, H_kv, Nq, Nk, d, causal, scale, spread=2.0,
                          what=f"softcap={softcap}", softcap=softcap, **opts)
    assert_masked_rows(got, Nq, Nk, causal)


@runs_kernels
@pytest.mark.parametrize("impl,dtype,d,causal,scale", [
    ("fa2", np.float32, 16, True, None),
    ("fa2", np.float16, 8, False, 0.5),
    ("tc", np.float16, 32, True, None),
    ("tc", np.float16, 32, False, -0.3),
])
def test_softcap_matches_the_reference(impl, dtype, d, causal, scale):
    """Nq > Nk with causal (rows that see no key), grouped-query heads (H = 4, H_kv = 2)."""
    check(impl, dtype, 1, 4, 2, 21, 17, d, causal, 5.0, scale)


@runs_kernels
def test_softcap_with_every_option():
    """tc's atomic backward (d = 128 in the simulator's table) with dropout, key padding and a
    block mask."""
    B, Nq, Nk = 2, 12, 19
    check("tc", np.float16, B, 2, 2, Nq, Nk, 128, True, 2.0, dropout_p=0.2, seed=11,
          key_lengths=np.array([19, 7]), block_mask=np.array([[1, 0, 1], [1, 1, 0]], bool),
          block_size=(8, 8))


@pytest.mark.gpu
@runs_kernels
@pytest.mark.parametrize("impl,dtype,d", [("tc", np.float16, 64), ("tc", np.float16, 128),
                                          ("fa2", np.float32, 64)])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_softcap(impl, dtype, d, causal):
    check(impl, dtype, 2, 8, 2, 1000, 1337, d, causal, 30.0)


@pytest.mark.parametrize("bad", [-1.0, float("inf"), float("nan"), "30", True])
def test_bad_softcaps_are_refused(bad):
    q = np.zeros((1, 1, 4, 8), np.float32)
    with pytest.raises(nbflash.InputError, match="softcap must be 0"):
        nbflash.attention(q, q, q, impl="naive", softcap=bad)


def test_fa1_refuses_softcap():
    q = np.zeros((1, 1, 4, 8), np.float32)
    with pytest.raises(nbflash.InputError, match="impl='fa1' does not take softcap"):
        nbflash.attention(q, q, q, impl="fa1", softcap=10.0)
