"""Bad input raises nbflash.InputError naming the problem, before any kernel runs."""

import numpy as np
import pytest

import nbflash
from nbflash import impls
from nbflash.kernels.common import factory, fastlaunch
from support import host, randn, xp


@pytest.fixture(autouse=True)
def no_kernel_may_run(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a kernel was launched for bad input")
    monkeypatch.setattr(factory, "launch", refuse)   # fa1
    monkeypatch.setattr(fastlaunch.Bound, "__call__", refuse)    # fa2, tc (every launch)


def arrays(B=1, H=2, Nq=5, Nk=6, d=8, dtype=np.float32):
    rng = np.random.default_rng(0)
    q = randn(rng, (B, H, Nq, d), dtype)
    k = randn(rng, (B, H, Nk, d), dtype)
    v = randn(rng, (B, H, Nk, d), dtype)
    return q, k, v


def fwd(q, k, v, **kw):
    return nbflash.attention_forward(q, k, v, **kw)


def bits(*arrays, d=None):
    """uint16 arrays (bfloat16 bits) of the arrays' shapes (head dim d if given)."""
    out = [xp.zeros(x.shape[:3] + (d or x.shape[3],), xp.uint16) for x in arrays]
    return out[0] if len(out) == 1 else out


CASES = {
    "q ndim": (lambda q, k, v: fwd(q[0], k, v), r"q has 3 dimensions"),
    "k ndim": (lambda q, k, v: fwd(q, k[None], v), r"k has 5 dimensions"),
    "batch": (lambda q, k, v: fwd(q, xp.concatenate([k, k]), v), r"batch of k is 2 but .* q is 1"),
    "heads": (lambda q, k, v: fwd(q, k, v[:, :1]),
              r"k and v must have the same number of heads; got 2 and 1"),
    "heads not dividing": (lambda q, k, v: fwd(q[:, :1], k, v),
                           r"heads of k and v \(2\) must divide heads of q \(1\)"),
    "gqa for fa1": (lambda q, k, v: fwd(q, k[:, :1], v[:, :1], impl="fa1"),
                    r"impl='fa1' takes k and v with as many heads as q \(2\); got 1"),
    "head_dim": (lambda q, k, v: fwd(q, k[..., :4], v), r"head_dim of k is 4"),
    "k v seqlen": (lambda q, k, v: fwd(q, k, v[:, :, :3]), r"k and v must have the same seqlen"),
    "Nq 0": (lambda q, k, v: fwd(q[:, :, :0], k, v), r"seqlen of q \(Nq\) is 0"),
    "Nk 0": (lambda q, k, v: fwd(q, k[:, :, :0], v[:, :, :0]), r"seqlen of k and v \(Nk\) is 0"),
    "dtype": (lambda q, k, v: fwd(q.astype(xp.float64), k, v),
              r"q has dtype float64, which nbflash does not support; use float16, float32 or "
              r"bfloat16 \(torch.bfloat16 tensors, ml_dtypes.bfloat16 arrays, or uint16 arrays "
              r"of bfloat16 bits\); bfloat16 runs with impl='tc'"),
    "int dtype": (lambda q, k, v: fwd(q, k.astype(xp.int32), v), r"k has dtype int32"),
    "int16 dtype": (lambda q, k, v: fwd(q, k, v.astype(xp.int16)),
                    r"v has dtype int16, which .* uint16 arrays of bfloat16 bits"),
    "bfloat16 and float32": (lambda q, k, v: fwd(bits(q), k, v),
                             r"share one dtype; got bfloat16, float32, float32"),
    "bfloat16 for fa2": (lambda q, k, v: fwd(*bits(q, k, v, d=16), impl="fa2"),
                         r"impl='fa2' takes float32 or float16 inputs; got bfloat16 "
                         r"\(impl='tc' takes bfloat16\)"),
    "bfloat16 for fa1": (lambda q, k, v: fwd(*bits(q, k, v, d=16), impl="fa1"),
                         r"impl='fa1' takes float32 or float16 inputs; got bfloat16 "
                         r"\(impl='tc' takes bfloat16\)"),
    "bfloat16 for naive": (lambda q, k, v: fwd(*bits(q, k, v, d=16), impl="naive"),
                           r"impl='naive' takes float32 or float16 inputs; got bfloat16 "
                           r"\(impl='tc' takes bfloat16\)"),
    "float16 head_dim for auto": (
        lambda q, k, v: fwd(*(xp.zeros((1, 1, 2, 1000), xp.float16),) * 3),
        r"(head_dim 1000 is above tc's limit|impl='tc' takes head_dim .* got 1000)"),
    "mixed dtype": (lambda q, k, v: fwd(q, k.astype(xp.float16), v),
                    r"share one dtype; got float32, float16, float32"),
    "head_dim limit": (lambda q, k, v: fwd(*(xp.zeros((1, 1, 2, 257), xp.float32),) * 3),
                       r"head_dim 257 is above fa2's limit of 256"),
    "fa1 head_dim limit": (lambda q, k, v: fwd(*(xp.zeros((1, 1, 2, 129), xp.float32),) * 3,
                                               impl="fa1"),
                           r"head_dim 129 is above fa1's limit of 128"),
    "M for fa2": (lambda q, k, v: fwd(q, k, v, impl="fa2", M=64), r"M only apply to impl='fa1'"),
    "impl": (lambda q, k, v: fwd(q, k, v, impl="fa9"), r"impl='fa9' is not an implementation"),
    "causal": (lambda q, k, v: fwd(q, k, v, causal="yes"), r"causal must be True or False"),
    "scale nan": (lambda q, k, v: fwd(q, k, v, softmax_scale=float("nan")),
                  r"softmax_scale must be finite"),
    "scale overflows": (lambda q, k, v: fwd(q, k, v, softmax_scale=1e39),
                        r"softmax_scale 1e\+39 overflows float32"),
    "scale str": (lambda q, k, v: fwd(q, k, v, softmax_scale="0.1"),
                  r"softmax_scale must be a number"),
    "M too big": (lambda q, k, v: fwd(q, k, v, impl="fa1", M=100000), r"M=100000 gives Br=8, Bc=3125 .* bytes"),
    "M zero": (lambda q, k, v: fwd(q, k, v, impl="fa1", M=0), r"M \(on-chip memory in elements\)"),
    "rule": (lambda q, k, v: fwd(q, k, v, impl="fa1", block_rule="mine"), r"block_rule='mine' is not a rule"),
    "M for naive": (lambda q, k, v: fwd(q, k, v, impl="naive", M=64),
                    r"M only apply to impl='fa1'"),
    "list": (lambda q, k, v: fwd(q.tolist(), k, v), r"q is a builtins.list"),
}


@pytest.mark.parametrize("case", CASES)
def test_forward_rejects(case):
    call, message = CASES[case]
    with pytest.raises(nbflash.InputError, match=message):
        call(*arrays())


def test_backward_rejects_a_deterministic_that_is_not_a_bool():
    q, k, v = arrays()
    with pytest.raises(nbflash.InputError, match=r"deterministic must be True or False"):
        nbflash.attention_backward(q, q, k, v, q, xp.zeros(q.shape[:3], xp.float32),
                                   deterministic="yes")


def test_backward_rejects_mismatched_do_o_lse():
    q, k, v = arrays()
    o = xp.zeros_like(q)
    lse = xp.zeros(q.shape[:3], xp.float32)
    bwd = nbflash.attention_backward
    with pytest.raises(nbflash.InputError, match=r"do has shape \(1, 2, 4, 8\)"):
        bwd(q[:, :, :4], q, k, v, o, lse)
    with pytest.raises(nbflash.InputError, match=r"o has dtype float16"):
        bwd(q, q, k, v, o.astype(xp.float16), lse)
    with pytest.raises(nbflash.InputError, match=r"lse has shape \(1, 2\)"):
        bwd(q, q, k, v, o, lse[..., 0])
    with pytest.raises(nbflash.InputError, match=r"lse has dtype float64"):
        bwd(q, q, k, v, o, lse.astype(xp.float64))
    with pytest.raises(nbflash.InputError, match=r"M=100000 gives .* backward kernel"):
        bwd(q, q, k, v, o, lse, impl="fa1", M=100000)


def test_wrong_array_kind_for_the_device_mode():
    q, k, v = arrays()
    if nbflash.MODE == "gpu":
        with pytest.raises(nbflash.InputError, match=r"arrays must all be of one kind"):
            fwd(xp.asnumpy(q), k, v)
    else:
        class FakeCupy:  # an object whose type says it comes from cupy
            __module__ = "cupy"
            ndim, shape, dtype = 4, q.shape, q.dtype
        with pytest.raises(nbflash.InputError, match=r"simulator .* takes NumPy arrays"):
            fwd(FakeCupy(), FakeCupy(), FakeCupy())


def test_input_error_is_a_value_error():
    assert issubclass(nbflash.InputError, ValueError)


def test_unhashable_options_still_get_their_message():
    q, k, v = arrays()
    with pytest.raises(nbflash.InputError, match=r"softmax_scale must be a number"):
        fwd(q, k, v, softmax_scale=[0.1])


def test_bfloat16_backward_without_a_deterministic_dq():
    if any(i.deterministic != "never" for i in impls.REGISTRY.values()
           if i.takes("bfloat16", 16)):
        pytest.skip("an impl taking bfloat16 has a deterministic dq")
    q, k, v = bits(*arrays(d=16))
    o, lse = xp.zeros_like(q), xp.zeros(q.shape[:3], xp.float32)
    with pytest.raises(nbflash.InputError, match=r"impl='tc' adds dq with atomics .* a "
                       r"deterministic dq needs impl='fa2' \(float16 or float32 inputs\); "
                       r"got bfloat16"):
        nbflash.attention_backward(q, q, k, v, o, lse, deterministic=True)


def test_ml_dtypes_bfloat16_refusals():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    q, k, v = (host(x).astype(ml_dtypes.bfloat16) for x in arrays(d=16))  # NumPy on the GPU too
    with pytest.raises(nbflash.InputError, match=r"impl='fa2' takes float32 or float16 inputs; "
                       r"got bfloat16 \(impl='tc' takes bfloat16\)"):
        fwd(q, k, v, impl="fa2")
    with pytest.raises(nbflash.InputError, match=r"q, v have dtype bfloat16 but k has uint16 "
                       r"\(bfloat16 bits\); pass bfloat16 arrays or their uint16 bits, not both"):
        fwd(q, k.view(np.uint16), v)
    o, lse = np.zeros_like(q), np.zeros(q.shape[:3], np.float32)
    with pytest.raises(nbflash.InputError, match=r"lse has dtype bfloat16; expected float32"):
        nbflash.attention_backward(q, q, k, v, o, lse.astype(ml_dtypes.bfloat16))
    with pytest.raises(nbflash.InputError, match=r"o has dtype float16; expected q's bfloat16"):
        nbflash.attention_backward(q, q, k, v, o.astype(np.float16), lse)
