"""impl="auto" picks the fastest impl that takes the inputs (tc for float16 and bfloat16, fa2 for
float32), and bfloat16 reaches the kernels as ml_dtypes.bfloat16 arrays or uint16 bits, its
results coming back in the form that went in (torch.bfloat16 tensors: tests/test_torch.py and
test_tc.py's GPU tests). NumPy inputs here: on the GPU they take the copy-to-device path."""

import subprocess
import sys

import numpy as np
import pytest

import nbflash
from nbflash import MODE, bfloat16, impls
from nbflash.tolerance import allowed, errors
from support import assert_close, host, make_inputs, naive_bf16, reference, run

needs_kernels = pytest.mark.skipif(MODE == "compile", reason="runs kernels")


def test_auto_resolves_to_the_fastest_impl_that_takes_the_inputs():
    tc, fa2 = impls.get("tc"), impls.get("fa2")
    for d in (16, 32, 64, 128):
        assert impls.resolve("auto", "float16", d) is tc
        assert impls.resolve("auto", "bfloat16", d) is tc
        assert impls.resolve("auto", "float32", d) is fa2
    for d in range(1, 257):
        for dtype in ("float16", "bfloat16", "float32"):
            got = impls.resolve("auto", dtype, d)
            # fa1 and naive run only by name; a head dim tc does not take in float16 goes to
            # fa2; where neither takes the inputs, the one taking the dtype says why not
            if tc.takes(dtype, d) or not fa2.takes(dtype, d):
                want = tc if dtype in tc.dtypes else fa2
            else:
                want = fa2
            assert got is want, (dtype, d, got.name)
        # a deterministic backward goes to the first whose dq can be deterministic
        if fa2.takes("float16", d):
            want = tc if tc.takes("float16", d) and tc.deterministic != "never" else fa2
            assert impls.resolve("auto", "float16", d, deterministic=True) is want
    # nothing takes these: the impl whose checks say why is one that takes the dtype
    assert impls.resolve("auto", "float32", 257) is fa2
    assert impls.resolve("auto", "bfloat16", 1024) is tc
    assert impls.resolve("fa1", "float16", 64).name == "fa1"


def _forward_errors(got, base, ref, dtype):
    """{name: (max err, allowed)} of o and lse under the tolerance rule."""
    out = {}
    for name in ("o", "lse"):
        err, _ = errors(got[name], ref[name])
        nerr, _ = errors(base[name], ref[name])
        out[name] = (err, allowed(name, nerr, ref[name], np.float32 if name == "lse" else dtype))
    return out


@needs_kernels
def test_auto_float16_forward_runs_tc_and_matches_the_reference():
    rng = np.random.default_rng(0)
    q, k, v, do = make_inputs(rng, 1, 1, 29, 37, 16, np.float16)
    ref = reference(q, k, v, do, True)
    o, lse = nbflash.attention_forward(q, k, v, causal=True)
    assert o.dtype == np.float16 and lse.dtype == np.float32
    o_tc, lse_tc = nbflash.attention_forward(q, k, v, causal=True, impl="tc")
    np.testing.assert_array_equal(host(o), host(o_tc))
    np.testing.assert_array_equal(host(lse), host(lse_tc))
    o_n, lse_n = nbflash.attention_forward(q, k, v, causal=True, impl="naive")
    for name, (err, tol) in _forward_errors({"o": host(o), "lse": host(lse)},
                                            {"o": host(o_n), "lse": host(lse_n)}, ref,
                                            np.float16).items():
        print(f"{name}: max err {err:.3g}, allowed {tol:.3g}")
        assert err <= tol, name


@needs_kernels
def test_auto_deterministic_float16_backward_runs_an_impl_with_a_deterministic_dq():
    """impl="auto" with deterministic=True: the first of AUTO whose dq can be deterministic (fa2
    while tc's dq is by atomics only), bitwise as that impl asked for by name, on the forward
    of the impl auto runs there."""
    rng = np.random.default_rng(1)
    q, k, v, do = make_inputs(rng, 1, 1, 9, 11, 16, np.float16)
    chosen = next(n for n in impls.AUTO if impls.get(n).takes("float16", 16)
                  and impls.get(n).deterministic != "never")
    assert impls.resolve("auto", "float16", 16, deterministic=True).name == chosen
    o, lse = nbflash.attention_forward(q, k, v)
    auto = nbflash.attention_backward(do, q, k, v, o, lse, deterministic=True)
    direct = nbflash.attention_backward(do, q, k, v, o, lse, impl=chosen, deterministic=True)
    for a, b in zip(auto, direct):
        np.testing.assert_array_equal(host(a), host(b))


def _bf16_inputs(seed, B, H, Nq, Nk, d):
    """q, k, v, do as float32 arrays of bfloat16 values, and as their bits (NumPy)."""
    rng = np.random.default_rng(seed)
    f = [bfloat16.round_(rng.standard_normal(s)) for s in
         ((B, H, Nq, d), (B, H, Nk, d), (B, H, Nk, d), (B, H, Nq, d))]
    return f, [bfloat16.bits(x) for x in f]


@needs_kernels
def test_uint16_numpy_inputs_are_bfloat16_bits():
    f, bits = _bf16_inputs(2, 1, 1, 21, 18, 16)
    got = run("auto", *bits, False)
    for name in ("o", "dq", "dk", "dv"):
        assert got[name].dtype == np.uint16, name
    got = {n: x if n == "lse" else bfloat16.values(x) for n, x in got.items()}
    ref = reference(*f, False)
    assert_close(got, naive_bf16(*f, False, 1 / np.sqrt(16)), ref, "bfloat16", "uint16 bits")


@needs_kernels
def test_ml_dtypes_bfloat16_arrays_give_ml_dtypes_bfloat16_results():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    f, bits = _bf16_inputs(3, 1, 2, 19, 23, 16)
    arrays = [x.astype(ml_dtypes.bfloat16) for x in f]
    for a, b in zip(arrays, bits):
        np.testing.assert_array_equal(a.view(np.uint16), b)
    o, lse = nbflash.attention_forward(*arrays[:3], causal=True)
    grads = nbflash.attention_backward(arrays[3], *arrays[:3], o, lse, causal=True)
    o_b, lse_b = nbflash.attention_forward(*bits[:3], causal=True)
    grads_b = nbflash.attention_backward(bits[3], *bits[:3], o_b, lse_b, causal=True)
    assert lse.dtype == np.float32
    np.testing.assert_array_equal(lse, lse_b)
    for name, x, b in zip(("o", "dq", "dk", "dv"), (o, *grads), (o_b, *grads_b)):
        assert isinstance(x, np.ndarray) and x.dtype == np.dtype(ml_dtypes.bfloat16), name
        np.testing.assert_array_equal(x.view(np.uint16), b, err_msg=name)
    got = dict(zip(("o", "lse", "dq", "dk", "dv"),
                   (x if x.dtype == np.float32 else x.astype(np.float32)
                    for x in (o, lse, *grads))))
    ref = reference(*f, True)
    assert_close(got, naive_bf16(*f, True, 1 / np.sqrt(16)), ref, "bfloat16", "ml_dtypes")


@needs_kernels
@pytest.mark.skipif(MODE == "gpu", reason="CuPy 14 itself imports ml_dtypes")
def test_bfloat16_works_without_ml_dtypes():
    """nbflash never imports ml_dtypes: with it made unimportable, uint16 bits still run."""
    code = ("import sys; sys.modules['ml_dtypes'] = None\n"
            "import numpy as np, nbflash\n"
            "q = nbflash.bfloat16.bits(np.ones((1, 1, 3, 16)))\n"
            "o, lse = nbflash.attention_forward(q, q, q)\n"
            "assert o.dtype == np.uint16 and 'ml_dtypes' not in str(type(o))\n"
            "print(nbflash.bfloat16.values(o)[0, 0, 0, 0])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "1.0"
