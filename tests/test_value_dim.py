"""A value head dim of its own (issue 17; e.g. DeepSeek's 192 / 128): q and k (..., d), v
(..., d_v), o (..., d_v), the scale 1/sqrt(d) by default. The naive baseline and the float64
reference take it as it is; fa2 and tc run at head dim max(d, d_v) on copies padded with zero
columns (nbflash.impls.ValuePadding), whose padded output columns are cut; fa1 refuses it.

The reference is checked against torch's autograd of the formula; each kernel impl against the
reference under the tolerance rule, d < d_v and d > d_v, with options, in a packed
variable-length batch, and through the torch ops (opcheck: the fakes give o d_v columns)."""

import numpy as np
import pytest

import nbflash
from nbflash import MODE, naive
from nbflash.errors import InputError
from support import assert_close, assert_reference_is_autograd, host, randn, xp

runs_kernels = pytest.mark.skipif(MODE == "compile", reason="runs kernels")


def _arrays(B, H, H_kv, Nq, Nk, d, d_v, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q = randn(rng, (B, H, Nq, d), dtype)
    k = randn(rng, (B, H_kv, Nk, d), dtype)
    v = randn(rng, (B, H_kv, Nk, d_v), dtype)
    do = randn(rng, (B, H, Nq, d_v), dtype)
    return q, k, v, do


def _run(impl, q, k, v, do, **opts):
    o, lse = nbflash.attention_forward(q, k, v, impl=impl, **opts)
    grads = nbflash.attention_backward(do, q, k, v, o, lse, impl=impl, **opts)
    return dict(zip(("o", "lse", "dq", "dk", "dv"), (host(x) for x in (o, lse, *grads))))


def test_the_reference_takes_its_own_value_dim():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)     # (host arrays: torch's autograd reads them)
    q, k, v, do = (rng.standard_normal(s) for s in ((1, 2, 7, 6), (1, 2, 9, 6), (1, 2, 9, 11),
                                                   (1, 2, 7, 11)))
    scale = 6 ** -0.5

    def scores(tq, tk):
        S = tq @ tk.transpose(-1, -2) * scale
        i, j = torch.arange(7)[:, None], torch.arange(9)
        return S.masked_fill(j > i + 2, float("-inf"))

    o = assert_reference_is_autograd(torch, q, k, v, do, scores, causal=True)
    assert o.shape == (1, 2, 7, 11)


@runs_kernels
@pytest.mark.parametrize("impl,dtype,d,d_v,opts", [
    ("fa2", np.float32, 24, 16, dict(causal=True)),
    ("fa2", np.float16, 8, 16, dict(softcap=3.0, window_size=(5, 2))),
    ("tc", np.float16, 16, 8, dict(causal=True, dropout_p=0.2, seed=3, softcap=5.0)),
    pytest.param("tc", np.float16, 192, 128, dict(causal=True), marks=pytest.mark.gpu),
    pytest.param("tc", np.float16, 64, 128, dict(window_size=(300, 0)), marks=pytest.mark.gpu),
    pytest.param("fa2", np.float32, 128, 64, dict(causal=True), marks=pytest.mark.gpu),
])
def test_value_dim_matches_the_reference(impl, dtype, d, d_v, opts):
    B, H, H_kv, Nq, Nk = (1, 2, 1, 19, 23) if MODE == "sim" else (2, 8, 2, 1000, 1337)
    q, k, v, do = _arrays(B, H, H_kv, Nq, Nk, d, d_v, dtype)
    ref_opts = dict(opts)
    if "seed" in ref_opts:
        ref_opts["keep"] = nbflash.dropout_mask(B, H, Nq, Nk, opts["dropout_p"], opts["seed"])
        del ref_opts["seed"]
    q64, k64, v64, do64 = (x.astype(xp.float64) for x in (q, k, v, do))
    o, lse = naive.attention_forward(q64, k64, v64, **ref_opts)
    ref = dict(zip(("o", "lse", "dq", "dk", "dv"), (host(x) for x in (
        o, lse, *naive.attention_backward(do64, q64, k64, v64, o, lse, **ref_opts)))))
    got = _run(impl, q, k, v, do, **opts)
    assert got["o"].shape == (B, H, Nq, d_v) and got["dv"].shape == (B, H_kv, Nk, d_v)
    assert got["dq"].shape == (B, H, Nq, d) and got["dk"].shape == (B, H_kv, Nk, d)
    assert_close(got, _run("naive", q, k, v, do, **opts), ref, dtype, f"{impl} d={d} d_v={d_v}")


@runs_kernels
def test_value_dim_in_a_packed_batch():
    """attention_varlen with v of its own head dim: each sequence as attention_forward alone
    (bitwise, fa2)."""
    rng = np.random.default_rng(1)
    q = randn(rng, (17, 2, 8), np.float32)
    k = randn(rng, (10, 1, 8), np.float32)
    v = randn(rng, (10, 1, 16), np.float32)
    cq, ck = np.array([0, 5, 17], np.int32), np.array([0, 7, 10], np.int32)
    o = host(nbflash.attention_varlen(q, k, v, cq, ck, impl="fa2", causal=True))
    assert o.shape == (17, 2, 16)
    for b in range(2):
        sq, sk = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        one = nbflash.attention(*(xp.ascontiguousarray(x[s].swapaxes(0, 1)[None])
                                  for x, s in ((q, sq), (k, sk), (v, sk))), impl="fa2",
                                causal=True)
        np.testing.assert_array_equal(o[sq], host(one)[0].swapaxes(0, 1))


def test_value_dim_is_refused_where_it_is_not_taken():
    q, k, v, do = _arrays(1, 2, 2, 8, 8, 8, 16, np.float32)
    with pytest.raises(InputError, match=r"impl='fa1' takes v with q's head_dim \(8\); got 16"):
        nbflash.attention(q, k, v, impl="fa1")
    o, lse = nbflash.attention_forward(q, k, v, impl="naive")
    with pytest.raises(InputError, match=r"do has shape \(1, 2, 8, 8\); expected o's "
                                         r"\(1, 2, 8, 16\)"):
        nbflash.attention_backward(do[..., :8], q, k, v, o, lse, impl="naive")
    with pytest.raises(InputError, match="head_dim of k is 4 but head_dim of q is 8"):
        nbflash.attention(q, k[..., :4], v, impl="naive")


@runs_kernels
def test_torch_ops_take_a_value_dim():
    """The torch op's fakes give o v's head dim (opcheck, both layouts); flash_attn_func with
    d_v is the API's, bitwise."""
    torch = pytest.importorskip("torch")
    nt = pytest.importorskip("nbflash.torch")
    dev = "cuda" if MODE == "gpu" else "cpu"
    g = torch.Generator().manual_seed(2)
    q, k = (torch.randn(1, 2, 9, 8, generator=g).to(dev) for _ in range(2))
    v = torch.randn(1, 2, 9, 16, generator=g).to(dev)
    for layout, xs in (("bhnd", (q, k, v)),
                       ("bnhd", tuple(x.transpose(1, 2).contiguous() for x in (q, k, v)))):
        args = (*xs, None, None, None, True, None, "auto", False, 0.0, 0, None, layout)
        torch.library.opcheck(nt.attention_forward_op, args)
    got = nt.flash_attn_func(*(x.transpose(1, 2) for x in (q, k, v)), causal=True)
    want = nbflash.attention(q, k, v, causal=True)
    np.testing.assert_array_equal(got.transpose(1, 2).cpu().numpy(), want.cpu().numpy())
