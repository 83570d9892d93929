"""The memory layouts fa2 and tc read and write in place (nbflash.kernels.common.layouts):
contiguous (B, H, N, d), and the (B, H, N, d) view of a contiguous (B, N, H, d) array, the
layout of FlashAttention's and Hugging Face's tensors (issue 18: no copy for them).

Each case runs the forward and the backward against the float64 reference under the tolerance
rule, with the query side and the key side in their own layouts (and grouped-query heads, so
that the two sides' head strides differ), and checks that nothing was copied: the checks hand
the arrays to the plan as they are, and the outputs come back in their side's layout (o and dq
in q's, dk and dv in k's). Layouts the kernels cannot take are copied, and still correct; the
torch ops' fake implementations give the strides the real ones return.
"""

import numpy as np
import pytest

import nbflash
from nbflash import MODE, inputs
from nbflash.kernels.common.layouts import BHND, BNHD, kernel_strides, layout_of
from support import assert_close, host, randn, reference, run, xp

runs_kernels = pytest.mark.skipif(MODE == "compile", reason="runs kernels")


def laid_out(rng, layout, B, H, N, d, dtype):
    """Normal samples as a (B, H, N, d) device array lying in memory in `layout`."""
    if layout == BNHD:
        return randn(rng, (B, N, H, d), dtype).swapaxes(1, 2)
    return randn(rng, (B, H, N, d), dtype)


def check(impl, dtype, lq, lk, B, H, H_kv, Nq, Nk, d, causal, ldo=None, deterministic=False,
          expect=None):
    """impl with q, o, do in layout lq (do in ldo if given) and k, v in lk, against the
    reference; the outputs' layouts must be `expect` ((query side, key side); default
    (lq, lk): read in place)."""
    rng = np.random.default_rng(7)
    q = laid_out(rng, lq, B, H, Nq, d, dtype)
    k = laid_out(rng, lk, B, H_kv, Nk, d, dtype)
    v = laid_out(rng, lk, B, H_kv, Nk, d, dtype)
    do = laid_out(rng, ldo or lq, B, H, Nq, d, dtype)
    expect = expect or (lq, lk)
    o, lse = nbflash.attention_forward(q, k, v, causal=causal, impl=impl)
    grads = nbflash.attention_backward(do, q, k, v, o, lse, causal=causal, impl=impl,
                                       deterministic=deterministic)
    assert layout_of(o) == expect[0] and layout_of(grads[0]) == expect[0]
    assert layout_of(grads[1]) == layout_of(grads[2]) == expect[1]
    got = dict(zip(("o", "lse", "dq", "dk", "dv"), (host(x) for x in (o, lse, *grads))))
    contiguous = [xp.ascontiguousarray(x) for x in (q, k, v, do)]
    ref = reference(*contiguous, causal)
    base = run("naive", *contiguous, causal)
    assert_close(got, base, ref, dtype, f"{impl} q {lq} k {lk}")


def test_kernel_strides_address_every_element():
    """b·sb + (b·H + h)·sh + n·sn + c is each layout's element (b, h, n, c)."""
    B, H, N, d = 2, 3, 5, 4
    for lay in (BHND, BNHD):
        x = np.arange(B * H * N * d).reshape(B, N, H, d).swapaxes(1, 2) if lay == BNHD else \
            np.arange(B * H * N * d).reshape(B, H, N, d)
        assert layout_of(x) == lay
        sb, sh, sn = kernel_strides(lay, H, N, d)
        flat = (x.swapaxes(1, 2) if lay == BNHD else x).reshape(-1)
        for b, h, n, c in np.ndindex(B, H, N, d):
            assert flat[b * sb + (b * H + h) * sh + n * sn + c] == x[b, h, n, c]


def test_layout_of_refuses_other_orders():
    x = np.zeros((2, 3, 5, 8))
    assert layout_of(x.transpose(1, 0, 2, 3)) is None       # heads outermost
    assert layout_of(x[..., ::2]) is None                    # columns with a stride
    assert layout_of(np.zeros((2, 1, 5, 8)).swapaxes(1, 2)) == BHND   # one head: both


@runs_kernels
def test_the_checks_hand_the_arrays_over_as_they_are():
    """No copy: (B, N, H, d) views reach the plan as the caller's own arrays; k and v in another
    layout than q's keep theirs; a key side whose k and v differ is copied."""
    rng = np.random.default_rng(0)
    q = laid_out(rng, BNHD, 1, 4, 9, 16, np.float16)
    k, v = (laid_out(rng, BHND, 1, 2, 7, 16, np.float16) for _ in range(2))
    prob, (q2, k2, v2) = inputs.check_forward(q, k, v, causal=False, softmax_scale=None,
                                              impl="tc")
    assert prob.layouts == (BNHD, BHND) and q2 is q and k2 is k and v2 is v
    prob, (q2, k2, v2) = inputs.check_forward(q, k.repeat(2, 1), v.repeat(2, 1), impl="fa1",
                                              causal=False, softmax_scale=None)
    assert prob.layouts == (BHND, BHND) and q2 is not q and q2.flags.c_contiguous
    v = laid_out(rng, BNHD, 1, 2, 7, 16, np.float16)
    prob, (_, k2, v2) = inputs.check_forward(q, k, v, causal=False, softmax_scale=None,
                                             impl="fa2")
    assert prob.layouts == (BNHD, BHND) and k2 is k and v2.flags.c_contiguous


@runs_kernels
@pytest.mark.parametrize("impl,dtype,lq,lk,causal", [
    ("tc", np.float16, BNHD, BNHD, True),
    ("tc", np.float16, BNHD, BHND, False),
    ("fa2", np.float32, BHND, BNHD, True),
    ("fa2", np.float16, BNHD, BNHD, False),
])
def test_read_and_written_in_place(impl, dtype, lq, lk, causal):
    """Grouped-query heads (H = 4, H_kv = 2), ragged tiles: tc at d = 32 takes the dQ pass in
    the simulator, fa2 its atomic dQ (into a float32 accumulator in q's layout)."""
    check(impl, dtype, lq, lk, 2, 4, 2, 13, 17, 32 if impl == "tc" else 16, causal)


@runs_kernels
def test_the_atomic_backward_and_a_gradient_in_another_layout():
    """tc's atomic backward (FA2 Algorithm 2: the D kernel, dQ added into a float32 buffer in
    q's layout and converted) with (B, N, H, d) inputs, and an upstream gradient in the other
    layout than q's (copied into q's)."""
    check("tc", np.float16, BNHD, BNHD, 1, 2, 2, 9, 40, 128, True, ldo=BHND)


@runs_kernels
def test_layouts_the_kernels_cannot_take_are_copied():
    """(B, N, H, d) rows of 24 bytes (d = 12 in float16: tc pads the head dim, fa2 reads rows
    16 bytes at a time) go through contiguous copies, and the outputs are contiguous."""
    check("tc", np.float16, BNHD, BNHD, 1, 2, 2, 11, 13, 12, False, expect=(BHND, BHND))


@pytest.mark.gpu
@runs_kernels
@pytest.mark.parametrize("impl,dtype,d", [("tc", np.float16, 64), ("tc", np.float16, 128),
                                          ("fa2", np.float32, 64)])
@pytest.mark.parametrize("lq,lk", [(BNHD, BNHD), (BNHD, BHND)])
def test_gpu_layouts(impl, dtype, d, lq, lk):
    check(impl, dtype, lq, lk, 2, 8, 2, 1000, 1337, d, True)
    check(impl, dtype, lq, lk, 2, 8, 2, 1000, 1337, d, False, deterministic=True)


@runs_kernels
def test_the_torch_ops_fakes_give_the_real_strides():
    """The ops' fake implementations (what torch.compile traces with) return the strides the
    real ones do, for each memory layout with each dimension order."""
    torch = pytest.importorskip("torch")
    from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: PLC0415

    import nbflash.torch as nt  # noqa: PLC0415
    dev = "cuda" if MODE == "gpu" else "cpu"
    B, H, H_kv, N, d = 1, 4, 2, 9, 16

    def tensors(memory, heads, order):
        x = torch.randn(B, N, heads, d, dtype=torch.float16, device=dev)
        x = x.transpose(1, 2) if memory == BNHD else x.transpose(1, 2).contiguous()
        return x.transpose(1, 2) if order == "bnhd" else x     # x: (B, H, N, d)

    def ops(q, k, v, order):
        args = (None, None, None, True, None, "auto", False, 0.0, 0, None, order)
        o, lse = nt.attention_forward_op(q, k, v, *args)
        return (o, *nt.attention_backward_op(o, q, k, v, o, lse, *args))

    for lq, lk in ((BNHD, BHND), (BHND, BNHD)):
        for order in ("bhnd", "bnhd"):
            q, k, v = tensors(lq, H, order), tensors(lk, H_kv, order), tensors(lk, H_kv, order)
            real = ops(q, k, v, order)
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                fake = ops(*(mode.from_tensor(x) for x in (q, k, v)), order)
            assert [x.stride() for x in fake] == [x.stride() for x in real], (lq, lk, order)
