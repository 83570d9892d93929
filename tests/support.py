"""Helpers shared by the tests: the impls to test (from the registry, nbflash.impls), inputs,
the fp64 reference, and the tolerance rule (nbflash.tolerance, which the benchmark applies too)."""

import numpy as np

import nbflash
from nbflash import impls, naive
from nbflash.tolerance import FACTORS, allowed, errors

if nbflash.MODE == "gpu":
    import cupy as xp
else:
    xp = np

def kernel_impls(dtype, d):
    """The registered impls with kernels that take `dtype` at head dim d: a test matrix over
    them picks up every newly registered family."""
    return [i.name for i in impls.kernels() if i.takes(np.dtype(dtype).name, d)]


def pairs(dtypes, d, ids=True):
    """pytest params (impl, dtype) for every dtype of `dtypes` and every kernel impl taking it
    at head dim d."""
    import pytest  # noqa: PLC0415
    return [pytest.param(i, dt, id=f"{i}-{np.dtype(dt).name}") for dt in dtypes
            for i in kernel_impls(dt, d)]


def small_block_options(impl):
    """Options that give `impl` blocks small enough for the simulator's tiny shapes to span
    several: M = 128 elements of on-chip memory for impls that take M (fa1: Br = Bc = 4 at
    d = 8); nothing for the others, whose simulator tile tables are small already."""
    return {"M": 128} if "M" in impls.get(impl).own_options else {}


def host(x):
    return xp.asnumpy(x) if xp is not np else np.asarray(x)


def randn(rng, shape, dtype, scale=1.0):
    """Device array of normal samples in `dtype`."""
    return xp.asarray((rng.standard_normal(shape) * scale).astype(dtype))


def make_inputs(rng, B, H, Nq, Nk, d, dtype, noncontiguous=False, scales=(1.0, 1.0, 1.0)):
    """q, k, v, do as device arrays. noncontiguous: each is a (B, N, H, d) array transposed to
    (B, H, N, d), as a model that keeps heads innermost would pass them."""
    def one(N, scale):
        if noncontiguous:
            return randn(rng, (B, N, H, d), dtype, scale).transpose(0, 2, 1, 3)
        return randn(rng, (B, H, N, d), dtype, scale)
    q, k, v = one(Nq, scales[0]), one(Nk, scales[1]), one(Nk, scales[2])
    do = one(Nq, 1.0)
    return q, k, v, do


def reference(q, k, v, do, causal, scale=None, **masking):
    """float64 (o, lse, dq, dk, dv) on the host. `masking`: nbflash.naive's mask and dropout
    options (keep: an explicit dropout mask, with dropout_p)."""
    q64, k64, v64, do64 = (x.astype(xp.float64) for x in (q, k, v, do))
    o, lse = naive.attention_forward(q64, k64, v64, causal=causal, softmax_scale=scale,
                                     **masking)
    grads = naive.attention_backward(do64, q64, k64, v64, o, lse, causal=causal,
                                     softmax_scale=scale, **masking)
    return dict(zip(("o", "lse", "dq", "dk", "dv"), (host(x) for x in (o, lse, *grads))))


def reference_options(opts, B, H, Nq, Nk):
    """The API options `opts` as the reference takes them: with dropout, the mask the kernels
    draw (nbflash.dropout_mask) as `keep` instead of seed and offset."""
    if opts.get("dropout_p", 0) <= 0:
        return dict(opts)
    ref = {k: v for k, v in opts.items() if k not in ("seed", "offset")}
    ref["keep"] = nbflash.dropout_mask(B, H, Nq, Nk, opts["dropout_p"], opts["seed"],
                                       opts.get("offset", 0))
    return ref


def run(impl, q, k, v, do, causal, scale=None, deterministic=False, **opts):
    """(o, lse, dq, dk, dv) of `impl` through the public API, on the host."""
    o, lse = nbflash.attention_forward(q, k, v, causal=causal, softmax_scale=scale, impl=impl,
                                       **opts)
    grads = nbflash.attention_backward(do, q, k, v, o, lse, causal=causal, softmax_scale=scale,
                                       impl=impl, deterministic=deterministic, **opts)
    return dict(zip(("o", "lse", "dq", "dk", "dv"), (host(x) for x in (o, lse, *grads))))


def assert_close(got, naive_out, ref, dtype, what=""):
    """Apply the tolerance rule to each of o, lse, dq, dk, dv; print the errors first."""
    failures = []
    for name in FACTORS:
        out_dtype = np.float32 if name == "lse" else dtype
        err, mean = errors(got[name], ref[name])
        nerr, _ = errors(naive_out[name], ref[name])
        tol = allowed(name, nerr, ref[name], out_dtype)
        print(f"{what} {name}: max err {err:.3g} (mean {mean:.3g}), naive {nerr:.3g}, "
              f"allowed {tol:.3g}")
        if not err <= tol:
            failures.append(f"{name}: max err {err:.3g} > allowed {tol:.3g} (naive {nerr:.3g})")
    assert not failures, f"{what}: " + "; ".join(failures)


def assert_masked_rows(got, Nq, Nk, causal):
    """Rows that see no key (causal, Nq > Nk): o and dq exactly 0, lse -inf. No NaN anywhere."""
    for name, x in got.items():
        assert not np.isnan(x).any(), f"NaN in {name}"
    if not causal or Nq <= Nk:
        return
    hidden = Nq - Nk
    assert np.all(got["o"][:, :, :hidden] == 0), "o of rows that see no key is not 0"
    assert np.all(got["dq"][:, :, :hidden] == 0), "dq of rows that see no key is not 0"
    assert np.all(np.isneginf(got["lse"][:, :, :hidden])), "lse of rows that see no key"
    assert np.all(np.isfinite(got["lse"][:, :, hidden:])), "lse of rows that see keys"


def naive_bf16(q, k, v, do, causal, scale):
    """The naive baseline in bfloat16 on the host (NumPy has no bfloat16): nbflash.naive's
    float16 recipe with bfloat16 roundings. Inputs: float32 arrays of bfloat16 values. Each
    product accumulates in float32 and is rounded to bfloat16 (S, O, dV, dP, dQ, dK), softmax
    is computed in float32 and P rounded to bfloat16, dS rounded to bfloat16; lse float32."""
    from nbflash.bfloat16 import round_
    f32 = np.float32
    Nq, Nk = q.shape[2], k.shape[2]
    s = round_(q @ k.swapaxes(-1, -2)) * f32(scale)
    if causal:
        s = np.where(naive.causal_visible(Nq, Nk), s, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    e = np.exp(s - m)
    l = e.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = round_(np.where(l > 0, e / l, 0))
        lse = np.where(l[..., 0] > 0, (m + np.log(l))[..., 0], -np.inf).astype(f32)
    o = round_(p @ v)
    dv = round_(p.swapaxes(-1, -2) @ do)
    dp = round_(do @ v.swapaxes(-1, -2))
    delta = (do * o).sum(-1, keepdims=True)
    ds = round_(p * (dp - delta))
    dq = round_(f32(scale) * (ds @ k))
    dk = round_(f32(scale) * (ds.swapaxes(-1, -2) @ q))
    return {"o": o, "lse": lse, "dq": dq, "dk": dk, "dv": dv}


def assert_reference_is_autograd(torch, q, k, v, do, scores, **options):
    """The float64 reference (nbflash.naive with `options`) against torch's autograd of the
    formula: scores(tq, tk) -> S (torch, masked entries -inf), then softmax(S) v; o and lse to
    1e-13, the gradients to 1e-12. Returns the reference's o."""
    o, lse = naive.attention_forward(q, k, v, **options)
    grads = naive.attention_backward(do, q, k, v, o, lse, **options)
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    S = scores(tq, tk)
    want = torch.softmax(S, -1) @ tv
    want.backward(torch.tensor(do))
    np.testing.assert_allclose(o, want.detach().numpy(), rtol=0, atol=1e-13)
    np.testing.assert_allclose(lse, torch.logsumexp(S, -1).detach().numpy(), rtol=0, atol=1e-13)
    for got, x in zip(grads, (tq, tk, tv)):
        np.testing.assert_allclose(got, x.grad.numpy(), rtol=0, atol=1e-12)
    return o


def check_option(impl, dtype, B, H, H_kv, Nq, Nk, d, causal, scale=None, data_seed=5,
                 spread=1.0, what="", deterministic=False, **opts):
    """An impl with the API options `opts` against the float64 reference under the tolerance
    rule, the naive baseline in the test's dtype as the yardstick (inputs from
    default_rng(data_seed), standard deviation `spread`); returns (got, ref)."""
    rng = np.random.default_rng(data_seed)
    q, do = (randn(rng, (B, H, Nq, d), dtype, spread) for _ in range(2))
    k, v = (randn(rng, (B, H_kv, Nk, d), dtype, spread) for _ in range(2))
    ref = reference(q, k, v, do, causal, scale, **reference_options(opts, B, H, Nq, Nk))
    got = run(impl, q, k, v, do, causal, scale, deterministic, **opts)
    base = run("naive", q, k, v, do, causal, scale, **opts)
    assert_close(got, base, ref, dtype, f"{impl} {what}")
    return got, ref
