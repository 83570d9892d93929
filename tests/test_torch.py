"""torch tensors through nbflash: the public functions (DLPack, no copy) and nbflash.torch's
autograd path (the custom ops of nbflash.torch). Needs torch: on the GPU with CUDA tensors; in
the simulator with CPU tensors (torch is not a dependency of nbflash; the torch extra, which CI
installs, brings it)."""

import numpy as np
import pytest

import nbflash
from support import assert_close, reference

torch = pytest.importorskip("torch")
DEVICE = "cuda" if nbflash.MODE == "gpu" else "cpu"
pytestmark = pytest.mark.skipif(nbflash.MODE == "compile", reason="runs kernels")


def _inputs(B, H, Nq, Nk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Nq, d, generator=g).to(DEVICE, dtype)
    k = torch.randn(B, H, Nk, d, generator=g).to(DEVICE, dtype)
    v = torch.randn(B, H, Nk, d, generator=g).to(DEVICE, dtype)
    do = torch.randn(B, H, Nq, d, generator=g).to(DEVICE, dtype)
    return q, k, v, do


def _np(x):
    return x.detach().cpu().numpy()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_autograd_matches_reference(dtype, causal):
    N = 200 if DEVICE == "cuda" else 13
    q, k, v, do = _inputs(2, 3, N, N + 7, 64 if DEVICE == "cuda" else 8, dtype)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    from nbflash.torch import attention  # noqa: PLC0415
    o = attention(*leaves, causal=causal)
    assert isinstance(o, torch.Tensor) and o.device.type == DEVICE and o.dtype == dtype
    o.backward(do)
    got = {"o": _np(o), "dq": _np(leaves[0].grad), "dk": _np(leaves[1].grad),
           "dv": _np(leaves[2].grad)}
    arrays = [_np(x) for x in (q, k, v, do)]
    if DEVICE == "cuda":
        import cupy  # noqa: PLC0415
        arrays = [cupy.asarray(a) for a in arrays]
    ref = reference(*arrays, causal)
    o_n, lse_n = nbflash.attention_forward(*arrays[:3], causal=causal, impl="naive")
    grads = nbflash.attention_backward(arrays[3], *arrays[:3], o_n, lse_n, causal=causal,
                                       impl="naive")
    base = {n: (x.get() if hasattr(x, "get") else x) for n, x in
            zip(("o", "dq", "dk", "dv"), (o_n, *grads))}
    o_f, lse = nbflash.attention_forward(q, k, v, causal=causal)
    got["lse"], base["lse"] = _np(lse), (lse_n.get() if hasattr(lse_n, "get") else lse_n)
    assert_close(got, base, ref, np.dtype(str(dtype).split(".")[-1]).type, f"torch {dtype}")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_autograd_bfloat16_by_default(causal):
    """bfloat16 tensors with the default impl (auto: tc), as a model trains: outputs and
    gradients bfloat16, within the tolerance rule of the bfloat16 naive baseline."""
    from nbflash.torch import attention  # noqa: PLC0415
    from support import naive_bf16  # noqa: PLC0415
    N, d = (300, 64) if DEVICE == "cuda" else (19, 16)
    q, k, v, do = _inputs(1, 2, N, N + 5, d, torch.bfloat16, seed=3)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    o = attention(*leaves, causal=causal)
    assert o.dtype == torch.bfloat16
    o.backward(do)
    assert all(x.grad.dtype == torch.bfloat16 for x in leaves)
    _, lse = nbflash.attention_forward(q, k, v, causal=causal)
    got = {"o": o, "lse": lse, "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}
    got = {n: _np(x.float()) for n, x in got.items()}
    f = [_np(x.float()) for x in (q, k, v, do)]
    arrays = f
    if DEVICE == "cuda":
        import cupy  # noqa: PLC0415
        arrays = [cupy.asarray(a) for a in f]
    ref = reference(*arrays, causal)
    assert_close(got, naive_bf16(*f, causal, 1 / np.sqrt(d)), ref, "bfloat16",
                 f"torch bfloat16 causal={causal}")


def test_functions_return_torch_and_share_memory():
    q, k, v, do = _inputs(1, 2, 9, 9, 8, torch.float32)
    o, lse = nbflash.attention_forward(q, k, v)
    assert isinstance(o, torch.Tensor) and isinstance(lse, torch.Tensor)
    dq, dk, dv = nbflash.attention_backward(do, q, k, v, o, lse)
    assert all(isinstance(x, torch.Tensor) and x.shape == q.shape for x in (dq, dk, dv))


@pytest.mark.parametrize("impl", ["naive", "fa1", "fa2", "tc"])
def test_repeated_calls_with_torch_tensors(impl):
    """The second call with the same shapes goes straight to the cached plan (fa2, tc: their
    own torch path; fa1, naive: the checks again) and gives the same results as the first."""
    dtype = torch.float16
    q, k, v, do = _inputs(1, 2, 21, 33, 16, dtype)
    first = nbflash.attention_forward(q, k, v, causal=True, impl=impl)
    again = nbflash.attention_forward(q, k, v, causal=True, impl=impl)
    grads = [nbflash.attention_backward(do, q, k, v, *first, causal=True, impl=impl)
             for _ in range(2)]
    for a, b in zip(first + tuple(grads[0]), again + tuple(grads[1])):
        assert isinstance(b, torch.Tensor) and b.dtype == a.dtype and b.shape == a.shape
        np.testing.assert_allclose(_np(b).astype(np.float32), _np(a).astype(np.float32),
                                   atol=2e-3)


def test_mixed_kinds_are_refused():
    q, k, v, _ = _inputs(1, 1, 4, 4, 8, torch.float32)
    with pytest.raises(nbflash.InputError, match="one kind"):
        nbflash.attention_forward(q, np.asarray(_np(k)), v)


def test_autograd_with_dropout_padding_and_block_mask_is_the_api():
    """nbflash.torch.attention with every option gives what the API gives with the same options
    (bitwise, with the deterministic dq pass); without a seed it draws one from torch's
    generator, so torch.manual_seed repeats the dropout mask."""
    from nbflash import sparsity  # noqa: PLC0415
    from nbflash.torch import attention  # noqa: PLC0415
    N, d = (300, 64) if DEVICE == "cuda" else (13, 8)
    q, k, v, do = _inputs(2, 2, N, N, d, torch.float32, seed=3)
    bs = 64 if DEVICE == "cuda" else 4
    n = sparsity.n_blocks(N, bs)
    opts = dict(dropout_p=0.2, key_lengths=torch.tensor([N, N - 5]),
                block_mask=torch.from_numpy(sparsity.random_blocks(n, n, 0.6, 2)),
                block_size=bs)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    o = attention(*leaves, causal=True, deterministic=True, seed=11, **opts)
    o.backward(do)
    o_api, lse = nbflash.attention_forward(q, k, v, causal=True, seed=11, **opts)
    grads = nbflash.attention_backward(do, q, k, v, o_api, lse, causal=True, seed=11,
                                       deterministic=True, **opts)
    for got, want in zip((o, *(x.grad for x in leaves)), (o_api, *grads)):
        np.testing.assert_array_equal(_np(got), _np(want))
    torch.manual_seed(5)
    a = attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(5)
    np.testing.assert_array_equal(_np(attention(q, k, v, dropout_p=0.5)), _np(a))
