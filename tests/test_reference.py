"""The float64 reference backward (nbflash.naive) is itself checked by finite differences, so
the reference every kernel is tested against cannot drift."""

import numpy as np
import pytest

from nbflash import naive


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Nq,Nk", [(3, 4), (4, 2)])
def test_reference_backward_matches_finite_differences(Nq, Nk, causal):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, n, 3)) for n in (Nq, Nk, Nk))
    do = rng.standard_normal((1, 2, Nq, 3))
    scale = 0.7

    def loss(q, k, v):
        return float((naive.attention(q, k, v, causal=causal, softmax_scale=scale) * do).sum())

    o, lse = naive.attention_forward(q, k, v, causal=causal, softmax_scale=scale)
    grads = naive.attention_backward(do, q, k, v, o, lse, causal=causal, softmax_scale=scale)
    eps = 1e-6
    for name, x, g in zip("qkv", (q, k, v), grads):
        num = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            args = {"q": q, "k": k, "v": v}
            plus, minus = x.copy(), x.copy()
            plus[idx] += eps
            minus[idx] -= eps
            num[idx] = (loss(**{**args, name: plus}) - loss(**{**args, name: minus})) / (2 * eps)
        np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-8, err_msg=f"d{name}")
    if causal and Nq > Nk:  # rows that see no key
        assert np.all(o[:, :, : Nq - Nk] == 0) and np.all(np.isneginf(lse[:, :, : Nq - Nk]))
        assert np.all(grads[0][:, :, : Nq - Nk] == 0)


def test_causal_mask_is_bottom_right_aligned():
    vis = naive.causal_visible(2, 4)
    # query 0 sees keys 0..2, query 1 (the last) sees every key
    assert vis.tolist() == [[True, True, True, False], [True, True, True, True]]
    vis = naive.causal_visible(4, 2)
    assert vis.tolist() == [[False, False], [False, False], [True, False], [True, True]]
