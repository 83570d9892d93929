"""nbflash's torch custom ops (nbflash::attention_forward, nbflash::attention_backward): torch's
own op checks (opcheck), fake tensors, torch.compile(fullgraph=True) against eager, and the
shims with torch SDPA's and FlashAttention's signatures against torch's
scaled_dot_product_attention and the float64 reference, and what they refuse. Needs torch (CPU
tensors in the simulator, CUDA tensors on the GPU)."""

import subprocess
import sys

import numpy as np
import pytest

import nbflash
from nbflash import tolerance
from support import reference

torch = pytest.importorskip("torch")
F = torch.nn.functional
nt = pytest.importorskip("nbflash.torch")
DEVICE = "cuda" if nbflash.MODE == "gpu" else "cpu"
pytestmark = pytest.mark.skipif(nbflash.MODE == "compile", reason="runs kernels")
#: tiny shapes in the simulator (a Python thread per CUDA thread), larger ones on the GPU
N, D = (200, 64) if DEVICE == "cuda" else (11, 8)


def _randn(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


def _np(x):
    return x.detach().cpu().double().numpy()


def _forward_args(q, k, v, **over):
    """The forward op's arguments after q, k, v (defaults, `over` replacing some)."""
    args = dict(key_lengths=None, block_mask=None, seed=None, causal=False, softmax_scale=None,
                impl="auto", deterministic=False, dropout_p=0.0, offset=0, block_size=None,
                layout="bhnd")
    args.update(over)
    return (q, k, v, *args.values())


def _grads(fn, q, k, v, do):
    """(o, dq, dk, dv) of fn(q, k, v) for upstream gradient do."""
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    o = fn(*leaves)
    o.backward(do)
    return (o, *(x.grad for x in leaves))


def _assert_as_torch(fn, q, k, v, do, **sdpa_kwargs):
    """fn's o, dq, dk, dv against torch SDPA's on the same inputs: each max error against SDPA in
    float64 (the reference) within nbflash's tolerance rule, with torch's float32 SDPA as the
    baseline (in place of the naive impl)."""
    def sdpa(*x):
        return F.scaled_dot_product_attention(*x, **sdpa_kwargs)
    got = _grads(fn, q, k, v, do)
    base = _grads(sdpa, q, k, v, do)
    ref = _grads(sdpa, *(x.double() for x in (q, k, v, do)))
    failures = []
    for name, g, b, r in zip(("o", "dq", "dk", "dv"), got, base, ref):
        assert g.shape == r.shape and g.dtype == q.dtype, (name, g.shape, g.dtype)
        r = _np(r)
        err, _ = tolerance.errors(_np(g), r)
        berr, _ = tolerance.errors(_np(b), r)
        tol = tolerance.allowed(name, berr, r, np.float32)
        print(f"{name}: max err {err:.3g}, torch float32 {berr:.3g}, allowed {tol:.3g}")
        if not err <= tol:
            failures.append(f"{name}: {err:.3g} > {tol:.3g}")
    assert not failures, failures


# -- the ops --------------------------------------------------------------------------------

def test_opcheck_forward_and_backward():
    """torch.library.opcheck: schema, autograd registration, fake tensors against the real op
    (shapes, dtypes, strides), and AOT dispatch with dynamic shapes, for both layouts with
    options (causal, key_lengths, dropout with a seed of 64 bits, deterministic dq, softcap, a
    window, ALiBi slopes)."""
    q, k, v = (_randn(1, 2, N, D, seed=i) for i in range(3))
    seed = torch.tensor(-5, dtype=torch.int64)      # the uint64 seed 2**64 - 5
    cases = [_forward_args(q, k, v, causal=True),
             _forward_args(*(x.transpose(1, 2).contiguous() for x in (q, k, v)),
                           key_lengths=torch.tensor([N - 3]), seed=seed, dropout_p=0.2,
                           offset=3, deterministic=True, layout="bnhd", softcap=2.0,
                           window_size=[3, 1], alibi_slopes=torch.tensor([0.5, 0.25]))]
    for args in cases:
        torch.library.opcheck(nt.attention_forward_op, args)
    o, lse = nt.attention_forward_op(*cases[0])
    torch.library.opcheck(nt.attention_backward_op, (_randn(1, 2, N, D, seed=9), q, k, v, o,
                                                     lse, *cases[0][3:]))


def test_fake_tensors_give_the_shapes():
    """Under FakeTensorMode (what torch.compile traces with) no kernel runs: o has q's shape and
    dtype (bfloat16 for uint16 bits), lse is float32 (B, H, Nq); in the (B, N, H, d) layout
    o is a contiguous (B, N, H, d) tensor, as the real op returns it (tests/test_layouts.py
    compares the fakes' strides with the real ops')."""
    from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: PLC0415
    with FakeTensorMode():
        q = torch.empty(3, 5, 7, 16, dtype=torch.float16)
        k = v = torch.empty(3, 5, 9, 16, dtype=torch.float16)
        o, lse = nt.attention(q, k, v, causal=True, return_lse=True)
        assert o.shape == q.shape and o.dtype == torch.float16
        assert lse.shape == (3, 5, 7) and lse.dtype == torch.float32
        o, lse = nt.attention_forward_op(*_forward_args(q.view(torch.uint16), k, v))
        assert o.dtype == torch.bfloat16
        qn = torch.empty(3, 7, 5, 16)
        o = nt.flash_attn_func(qn, torch.empty(3, 9, 5, 16), torch.empty(3, 9, 5, 16))
        assert o.shape == (3, 7, 5, 16) and o.is_contiguous()
        dq, dk, dv = nt.attention_backward_op(o, qn, qn, qn, o, lse, *_forward_args(
            qn, qn, qn, layout="bnhd")[3:])
        assert dq.shape == qn.shape and dq.stride() == o.stride()


def test_compile_fullgraph_matches_eager():
    """torch.compile(fullgraph=True) with AOT autograd (backend aot_eager: no C++ compiler
    needed) through attention (dropout with a seed drawn in the graph, lse returned) and
    flash_attn_func (the (B, N, H, d) layout, GQA): the same outputs and gradients as eager,
    bitwise (the same kernels run on the same inputs; deterministic=True, since on the GPU
    fa2's atomic dQ may add in another order from one run to the next)."""
    q = _randn(2, 4, N, D, seed=1)
    kv = [_randn(2, 2, N, D, seed=s) for s in (2, 3)]

    def fn(q, k, v):
        o, lse = nt.attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                              causal=True, dropout_p=0.25, return_lse=True, deterministic=True)
        o2 = nt.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                softmax_scale=0.3, deterministic=True)
        return (o * o2.transpose(1, 2)).sum() + lse.sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    results = []
    for f in (fn, compiled):
        leaves = [x.clone().requires_grad_(True) for x in (q, *kv)]
        torch.manual_seed(7)
        loss = f(*leaves)
        loss.backward()
        results.append([loss] + [x.grad for x in leaves])
    for name, a, b in zip(("loss", "dq", "dk", "dv"), *results):
        np.testing.assert_array_equal(_np(b), _np(a), err_msg=name)
    assert results[0][1].abs().sum() > 0


def test_return_lse_is_the_apis_and_carries_no_gradient():
    q, k, v = (_randn(1, 2, N, D + 1, seed=i) for i in range(3))   # (head dim not a power of 2)
    o, lse = nt.attention(q.requires_grad_(), k, v, causal=True, return_lse=True)
    o_api, lse_api = nbflash.attention_forward(q, k, v, causal=True)
    np.testing.assert_array_equal(_np(lse), _np(lse_api))
    np.testing.assert_array_equal(_np(o), _np(o_api))
    assert o.requires_grad and not lse.requires_grad


def test_attention_matches_the_float64_reference():
    """nbflash.torch.attention (the ops) against nbflash's float64 reference, causal with
    Nq < Nk, by the tolerance rule with the naive baseline."""
    from support import assert_close  # noqa: PLC0415
    q, k, v, do = (_randn(2, 3, n, D, seed=i) for i, n in enumerate((N, N + 4, N + 4, N)))
    o, dq, dk, dv = _grads(lambda *x: nt.attention(*x, causal=True), q, k, v, do)
    _, lse = nt.attention(q, k, v, causal=True, return_lse=True)
    arrays = [x.detach().cpu().numpy() for x in (q, k, v, do)]
    if DEVICE == "cuda":
        import cupy  # noqa: PLC0415
        arrays = [cupy.asarray(a) for a in arrays]
    o_n, lse_n = nbflash.attention_forward(*arrays[:3], causal=True, impl="naive")
    grads = nbflash.attention_backward(arrays[3], *arrays[:3], o_n, lse_n, causal=True,
                                       impl="naive")
    host = [x.get() if hasattr(x, "get") else x for x in (o_n, lse_n, *grads)]
    got = {n: _np(x) for n, x in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, dq, dk, dv))}
    assert_close(got, dict(zip(("o", "lse", "dq", "dk", "dv"), host)),
                 reference(*arrays, True), np.float32, "nbflash.torch.attention")


# -- the shims against torch SDPA -----------------------------------------------------------

def test_sdpa_causal_and_gqa_as_torch():
    """sdpa(is_causal=True, enable_gqa=True) with 4 query heads and 2 key/value heads, as
    torch's (dk and dv summed over each group inside the kernels)."""
    q, do = _randn(2, 4, N, D, seed=1), _randn(2, 4, N, D, seed=4)
    k, v = _randn(2, 2, N, D, seed=2), _randn(2, 2, N, D, seed=3)
    _assert_as_torch(lambda *x: nt.sdpa(*x, is_causal=True, enable_gqa=True), q, k, v, do,
                     is_causal=True, enable_gqa=True)


def test_attention_takes_fewer_key_value_heads():
    """nbflash.torch.attention with 2 key/value heads for 4 query heads, read in place (with or
    without enable_gqa): the same o as with K and V repeated by hand (each query head's
    computation is the same, bitwise), and gradients, dk and dv with 2 heads, as torch's SDPA
    (enable_gqa=True) under the tolerance rule."""
    q, do = _randn(2, 4, N, D, seed=1), _randn(2, 4, N, D, seed=4)
    k, v = _randn(2, 2, N, D, seed=2), _randn(2, 2, N, D, seed=3)
    o = nt.attention(q, k, v, causal=True)
    want = nt.attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), causal=True)
    np.testing.assert_array_equal(o.cpu().numpy(), want.cpu().numpy())
    _assert_as_torch(lambda *x: nt.attention(*x, causal=True, enable_gqa=True), q, k, v, do,
                     is_causal=True, enable_gqa=True)


@pytest.mark.parametrize("causal", [False, True], ids=["padding", "padding+causal"])
def test_sdpa_boolean_padding_mask_as_torch(causal):
    """A boolean right-padding key mask, broadcast over heads and queries (alone), or combined
    with the causal mask as transformers builds it, becomes key_lengths; the result is torch's
    with the mask itself (scale given, Nq != Nk when not causal)."""
    Nq, Nk = (N, N) if causal else (N, N + 5)
    lengths = torch.tensor([Nk, Nk - 6], device=DEVICE)
    mask = torch.arange(Nk, device=DEVICE) < lengths[:, None, None, None]
    if causal:
        mask = mask & torch.ones(Nq, Nk, dtype=torch.bool, device=DEVICE).tril()
    q, do = _randn(2, 3, Nq, D, seed=5), _randn(2, 3, Nq, D, seed=6)
    k, v = _randn(2, 3, Nk, D, seed=7), _randn(2, 3, Nk, D, seed=8)
    assert nt.mask_options(mask, 2, Nq, Nk)[0] == causal
    _assert_as_torch(lambda *x: nt.sdpa(*x, attn_mask=mask, scale=0.2), q, k, v, do,
                     attn_mask=mask, scale=0.2)


def test_sdpa_causal_with_fewer_queries_is_torchs_top_left():
    """torch's is_causal is top-left aligned: with Nq < Nk the shim cuts the keys no query sees
    (their gradients 0), so the result is torch's, not nbflash's bottom-right causal."""
    q, do = _randn(1, 2, N, D, seed=1), _randn(1, 2, N, D, seed=2)
    k, v = _randn(1, 2, N + 6, D, seed=3), _randn(1, 2, N + 6, D, seed=4)
    _assert_as_torch(lambda *x: nt.sdpa(*x, is_causal=True), q, k, v, do, is_causal=True)


def test_flash_attn_func_layout_and_gqa_as_torch():
    """flash_attn_func: (B, N, H, d) in and out, 4 query heads and 1 key/value head (MQA),
    causal bottom-right aligned (Nq < Nk), as torch's SDPA with the same layout change."""
    Nq, Nk = N, N + 3
    q, do = _randn(2, Nq, 4, D, seed=1), _randn(2, Nq, 4, D, seed=2)
    k, v = _randn(2, Nk, 1, D, seed=3), _randn(2, Nk, 1, D, seed=4)
    visible = torch.ones(Nq, Nk, dtype=torch.bool, device=DEVICE).tril(Nk - Nq)

    def as_sdpa(q, k, v):   # torch SDPA in FlashAttention's layout, the causal mask explicit
        o = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)),
                                           attn_mask=visible, enable_gqa=True)
        return o.transpose(1, 2)

    got = _grads(lambda *x: nt.flash_attn_func(*x, causal=True, deterministic=True),
                 q, k, v, do)
    assert got[0].shape == q.shape and got[2].shape == k.shape
    ref = _grads(as_sdpa, *(x.double() for x in (q, k, v, do)))
    base = _grads(as_sdpa, q, k, v, do)
    for name, g, b, r in zip(("o", "dq", "dk", "dv"), got, base, ref):
        r = _np(r)
        err, berr = tolerance.errors(_np(g), r)[0], tolerance.errors(_np(b), r)[0]
        tol = tolerance.allowed(name, berr, r, np.float32)
        print(f"{name}: max err {err:.3g}, torch float32 {berr:.3g}, allowed {tol:.3g}")
        assert err <= tol, name


# -- what the shims refuse ------------------------------------------------------------------

def _qkv(Nq=4, Nk=4, H=2, Hkv=2):
    return _randn(1, H, Nq, 8, seed=1), _randn(1, Hkv, Nk, 8, seed=2), \
        _randn(1, Hkv, Nk, 8, seed=3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(attn_mask=torch.zeros(4, 4)), "float mask adds a bias"),
    (dict(attn_mask=torch.ones(4, 4, dtype=torch.bool).triu()), "neither a right-padding"),
    (dict(attn_mask=torch.tensor([False, True, True, True])), "neither a right-padding"),
    (dict(attn_mask=torch.ones(2, 1, 4, 4, dtype=torch.bool)), "broadcastable"),
    (dict(attn_mask=torch.ones(1, 2, 4, 4, dtype=torch.bool).index_put_(
        (torch.tensor(0), torch.tensor(1), torch.tensor(3), torch.tensor(3)),
        torch.tensor(False))), "differs between heads"),
    (dict(attn_mask=torch.ones(4, 4, dtype=torch.bool), is_causal=True), "both given"),
    (dict(dropout_p=1.0), "dropout_p must be in"),
], ids=["float", "upper", "left-pad", "batch", "heads", "mask+causal", "dropout"])
def test_sdpa_refuses(kwargs, match):
    kwargs = {n: x.to(DEVICE) if isinstance(x, torch.Tensor) else x for n, x in kwargs.items()}
    with pytest.raises(nbflash.InputError, match=match):
        nt.sdpa(*_qkv(), **kwargs)


def test_sdpa_refuses_top_left_causal_with_more_queries_and_bad_groups():
    with pytest.raises(nbflash.InputError, match="top-left"):
        nt.sdpa(*_qkv(Nq=6, Nk=4), is_causal=True)
    with pytest.raises(nbflash.InputError, match=r"heads of k and v \(2\) must divide"):
        nt.sdpa(*_qkv(H=3, Hkv=2), enable_gqa=True)
    with pytest.raises(nbflash.InputError, match="need enable_gqa=True"):   # as torch's
        nt.sdpa(*_qkv(H=4, Hkv=2))


@pytest.mark.parametrize("kwargs, match", [
    (dict(window_size=(8, -2)), r"window_size must be a pair \(left, right\)"),
    (dict(softcap=-1.0), r"softcap must be 0 \(off\) or a positive"),
    (dict(alibi_slopes=torch.ones(3)), r"alibi_slopes has shape \(3,\); expected \(H,\)"),
    (dict(return_attn_probs=True), "return_lse=True"),
])
def test_flash_attn_func_refuses(kwargs, match):
    q, k, v = (x.transpose(1, 2) for x in _qkv())
    with pytest.raises(nbflash.InputError, match=match):
        nt.flash_attn_func(q, k, v, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_size="8", block_mask=np.ones((1, 1), bool)), "block_size must be"),
    (dict(dropout_p=0.1, seed=2**64), "seed must be"),
    (dict(dropout_p=0.1, seed=1, offset=-1), "offset must be"),
    (dict(softmax_scale="0.1"), "softmax_scale"),
    (dict(impl=None), "impl must be"),
    (dict(key_lengths=[object()]), "key_lengths"),
])
def test_attention_refuses_options_before_any_kernel(kwargs, match):
    with pytest.raises(nbflash.InputError, match=match):
        nt.attention(*_qkv(), **kwargs)


def test_seed_of_64_bits_is_the_apis():
    """A seed at or above 2**63 (carried as the int64 of its bits) draws the API's mask."""
    q, k, v = _qkv(Nq=5, Nk=7)
    got = nt.attention(q, k, v, dropout_p=0.5, seed=2**64 - 3, offset=2)
    want, _ = nbflash.attention_forward(q, k, v, dropout_p=0.5, seed=2**64 - 3, offset=2)
    np.testing.assert_array_equal(_np(got), _np(want))


def test_importing_nbflash_imports_neither_torch_nor_transformers():
    code = ("import sys, nbflash; bad = [m for m in ('torch', 'transformers') if m in "
            "sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_eager_calls_skip_the_dispatcher(monkeypatch):
    """Eager calls on plain tensors take nbflash.torch._Eager (the ops' autograd formula without
    the dispatcher, for host time): with the ops made to fail they still run, forward and
    backward, and give bitwise what the ops give (the same kernels on the same arguments);
    under torch.compile the ops run (test_compile_fullgraph_matches_eager)."""
    q, k, v, do = (_randn(2, 2, N, D, seed=s) for s in range(4))
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    o, lse = nt.attention_forward_op(*_forward_args(*leaves, causal=True, deterministic=True))
    o.backward(do)
    want = [o, lse] + [x.grad for x in leaves]

    def fail(*args):
        raise AssertionError("the custom op was called")
    monkeypatch.setattr(nt, "attention_forward_op", fail)
    monkeypatch.setattr(nt, "attention_backward_op", fail)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    o, lse = nt.attention(*leaves, causal=True, deterministic=True, return_lse=True)
    o.backward(do)
    got = [o, lse] + [x.grad for x in leaves]
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), want, got):
        np.testing.assert_array_equal(_np(b), _np(a), err_msg=name)
    with torch.no_grad():      # no graph to record: the forward alone
        np.testing.assert_array_equal(_np(nt.attention(q, k, v, causal=True)), _np(want[0]))


def test_the_eager_path_keeps_the_ops_semantics():
    """What the ops do, _Eager does too: a double backward raises (no second-order formula,
    not a silently missing term), and under a dispatch mode (make_fx's tracing) the op is
    what the trace records, not a constant computed on the way."""
    from torch.fx.experimental.proxy_tensor import make_fx  # noqa: PLC0415
    q, k, v = (_randn(1, 2, N, D, seed=s).requires_grad_(True) for s in range(3))
    o = nt.attention(q, k, v, causal=True)
    (dq,) = torch.autograd.grad(o.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError):
        (dq.square().sum() + o.sum()).backward()
    traced = make_fx(lambda q, k, v: nt.attention(q, k, v, causal=True))(
        *(x.detach() for x in (q, k, v)))
    assert any("nbflash.attention_forward" in str(n.target) for n in traced.graph.nodes)


def test_flash_attn_func_softcap_is_the_apis():
    """flash_attn_func's softcap is nbflash's (the same kernels: bitwise), differentiable."""
    q, k, v = (_randn(1, 2, N, D, seed=s) * 3 for s in range(3))
    leaves = [x.transpose(1, 2).clone().requires_grad_(True) for x in (q, k, v)]
    got = nt.flash_attn_func(*leaves, causal=True, softcap=2.0, deterministic=True)
    got.sum().backward()
    o, lse = nbflash.attention_forward(q, k, v, causal=True, softcap=2.0)
    grads = nbflash.attention_backward(torch.ones_like(o), q, k, v, o, lse, causal=True,
                                       softcap=2.0, deterministic=True)
    np.testing.assert_array_equal(_np(got.transpose(1, 2)), _np(o))
    for x, g in zip(leaves, grads):
        np.testing.assert_array_equal(_np(x.grad.transpose(1, 2)), _np(g))


def test_flash_attn_func_window_is_the_apis():
    """flash_attn_func's window_size is nbflash's (the same kernels: bitwise), differentiable;
    nbflash.torch.attention takes it too."""
    q, k, v = (_randn(1, 2, N, D, seed=s) for s in range(3))
    leaves = [x.transpose(1, 2).clone().requires_grad_(True) for x in (q, k, v)]
    got = nt.flash_attn_func(*leaves, causal=True, window_size=(3, 0), deterministic=True)
    got.sum().backward()
    o, lse = nbflash.attention_forward(q, k, v, causal=True, window_size=(3, 0))
    grads = nbflash.attention_backward(torch.ones_like(o), q, k, v, o, lse, causal=True,
                                       window_size=(3, 0), deterministic=True)
    np.testing.assert_array_equal(_np(got.transpose(1, 2)), _np(o))
    for x, g in zip(leaves, grads):
        np.testing.assert_array_equal(_np(x.grad.transpose(1, 2)), _np(g))
    np.testing.assert_array_equal(_np(nt.attention(q, k, v, window_size=(2, 1))),
                                  _np(nbflash.attention(q, k, v, window_size=(2, 1))))


def test_flash_attn_func_alibi_is_the_apis():
    """flash_attn_func's alibi_slopes (H,) and (B, H) are nbflash's (bitwise), differentiable
    (the slopes saved for the backward)."""
    q, k, v = (_randn(2, 2, N, D, seed=s) for s in range(3))
    for slopes in (torch.tensor([0.5, 0.25]), torch.tensor([[0.5, 0.25], [0.1, 1.0]])):
        leaves = [x.transpose(1, 2).clone().requires_grad_(True) for x in (q, k, v)]
        got = nt.flash_attn_func(*leaves, causal=True, alibi_slopes=slopes, deterministic=True)
        got.sum().backward()
        o, lse = nbflash.attention_forward(q, k, v, causal=True, alibi_slopes=slopes)
        grads = nbflash.attention_backward(torch.ones_like(o), q, k, v, o, lse, causal=True,
                                           alibi_slopes=slopes, deterministic=True)
        np.testing.assert_array_equal(_np(got.transpose(1, 2)), _np(o))
        for x, g in zip(leaves, grads):
            np.testing.assert_array_equal(_np(x.grad.transpose(1, 2)), _np(g))


def test_mask_options_find_a_sliding_window():
    """A right-padding mask inside a sliding window, causal or not, is that window's
    (causal, key_lengths); without the window it is refused, naming the window."""
    B, Nq, Nk = 2, 6, 9
    i, j = torch.arange(Nq)[:, None], torch.arange(Nk)
    lengths = torch.tensor([9, 5])
    pad = j < lengths[:, None, None]
    window = (j >= i + Nk - Nq - 2) & (j <= i + Nk - Nq + 1)
    for causal in (False, True):
        mask = pad & window & ((j <= i + Nk - Nq) | (not causal))
        got_causal, kl = nt.mask_options(mask[:, None], B, Nq, Nk, window_size=(2, 1))
        assert got_causal == causal and kl.tolist() == [9, 5]
    with pytest.raises(nbflash.InputError, match=r"inside the sliding window \(2, 2\)"):
        nt.mask_options((pad & window)[:, None], B, Nq, Nk, window_size=(2, 2))
