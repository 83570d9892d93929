"""The non-finite rule (nbflash.kernels.common.softmax, nbflash.naive), in every impl and in the
float64 reference: which keys a row sees is decided by the masks alone; a row that sees none has
o = 0, lse = -inf and zero gradients; every other row gets IEEE arithmetic's softmax over its
visible keys, so that NaN and inf in any input, and scores that overflow, show as NaN (or inf)
in every output that depends on them, never as a row that "sees no key". Keys past
key_lengths[b] are never read."""

import numpy as np
import pytest

from support import host, kernel_impls, reference, run, xp

# the simulator runs the kernels' arithmetic in NumPy scalars, which warn about inf - inf
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

D = 16
B, H, NQ, NK = 2, 1, 13, 11          # ragged: neither length a multiple of a tile
OUTPUTS = ("o", "lse", "dq", "dk", "dv")


def impl_dtypes(dtypes=(np.float32, np.float16)):
    """(impl, dtype) for the naive baseline and every kernel impl taking the dtype at D."""
    return [pytest.param(i, dt, id=f"{i}-{np.dtype(dt).name}") for dt in dtypes
            for i in ["naive", *kernel_impls(dt, D)]]


def inputs(dtype, seed=0, Nq=NQ, Nk=NK):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((B, H, n, D)).astype(dtype) for n in (Nq, Nk, Nk, Nq)]


def on_device(*arrays):
    return [xp.asarray(a) for a in arrays]


def assert_same_non_finite(got, ref, names=OUTPUTS, what=""):
    """Every output is non-finite exactly where the float64 reference is."""
    for name in names:
        bad = ~np.isfinite(got[name])
        want = ~np.isfinite(ref[name])
        assert bad.any() == want.any() and np.array_equal(bad, want), (
            f"{what} {name}: non-finite at {np.argwhere(bad)[:8].tolist()} (of {bad.sum()}), "
            f"the reference at {np.argwhere(want)[:8].tolist()} (of {want.sum()})")


def assert_finite_close(got, ref, dtype, names=OUTPUTS, what=""):
    tol = 2e-2 if np.dtype(dtype).itemsize == 2 else 2e-4
    for name in names:
        ok = np.isfinite(ref[name])
        err = np.abs(got[name][ok].astype(np.float64) - ref[name][ok]).max(initial=0.0)
        assert err <= tol * max(1.0, np.abs(ref[name][ok]).max(initial=0.0)), (
            f"{what} {name}: max error {err:.3g} on the finite entries")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("which", ["q", "k", "v", "do"])
@pytest.mark.parametrize("impl, dtype", impl_dtypes())
def test_a_non_finite_input_reaches_every_output_that_depends_on_it(impl, dtype, which, value):
    """One NaN or ±inf in one element of q, k, v or dO of batch entry 0 (no mask, so that every
    row depends on every key there): o, lse, dq, dk, dv are non-finite exactly where the float64
    reference's are (never a row turned into o = 0, lse = -inf), and batch entry 1 is untouched."""
    arrays = inputs(dtype)
    at = {"q": (0, 0, 5, 3), "k": (0, 0, 7, 3), "v": (0, 0, 2, 3), "do": (0, 0, 9, 3)}[which]
    arrays["q k v do".split().index(which)][at] = value
    q, k, v, do = on_device(*arrays)
    got = run(impl, q, k, v, do, causal=False)
    ref = reference(q, k, v, do, causal=False)
    assert_same_non_finite(got, ref, what=f"{which}={value}")
    assert not np.isfinite(got["o"][0]).all() or which == "do"
    assert_finite_close(got, ref, dtype, what=f"{which}={value}")


@pytest.mark.parametrize("impl, dtype", impl_dtypes((np.float32,)))
@pytest.mark.parametrize("case", ["all_minus_inf", "plus_inf", "scale", "dot"])
def test_scores_that_overflow_make_their_rows_nan(impl, dtype, case):
    """q·kᵀ beyond float32's range: scores that are all -inf (q = 1e30, k = -1e30), +inf ones
    (k = +1e30), or softmax_scale = 1e38 give NaN rows, as IEEE softmax does, not rows that see
    no key; the backward keeps them NaN. The float64 reference applies float32's range to its
    scores (nbflash.naive), so it says NaN too."""
    q, k, v, do = inputs(dtype)
    scale = None
    if case == "scale":                 # q·kᵀ = 16, τ q·kᵀ = 1.6e39
        q[:], k[:], scale = 1.0, 1.0, 1e38
    elif case == "dot":                 # q·kᵀ = 4e38 overflows, though τ q·kᵀ = 1e38 would not
        q[:], k[:] = 5e18, 5e18
    else:
        q[:] = 1e30
        k[:] = -1e30 if case == "all_minus_inf" else 1e30
    q, k, v, do = on_device(q, k, v, do)
    got = run(impl, q, k, v, do, causal=False, scale=scale)
    ref = reference(q, k, v, do, causal=False, scale=scale)
    assert np.isnan(ref["o"]).all() and np.isnan(ref["lse"]).all()
    assert_same_non_finite(got, ref, what=case)


@pytest.mark.parametrize("impl, dtype", impl_dtypes((np.float32,)))
def test_overflow_with_masks_nan_where_keys_are_seen_and_zero_where_none(impl, dtype):
    """All scores -inf by overflow, with causal (Nq > Nk: the first rows see no key) and a
    block mask whose second row of blocks is off: the rows that see keys are NaN, the rows that
    see none keep o = 0, lse = -inf."""
    Nq, Nk = 24, 16
    q, k, v, do = inputs(dtype, Nq=Nq, Nk=Nk)
    q[:] = 1e30
    k[:] = -1e30
    mask = np.ones((3, 2), bool)
    mask[1] = False
    opts = dict(block_mask=mask, block_size=8)
    q, k, v, do = on_device(q, k, v, do)
    got = run(impl, q, k, v, do, causal=True, **opts)
    ref = reference(q, k, v, do, causal=True, **opts)
    none = np.zeros(Nq, bool)
    none[:Nq - Nk] = True                 # causal, bottom-right: rows 0..7 see no key
    none[8:16] = True                     # the block mask's second row of blocks is off
    assert np.isneginf(ref["lse"][..., none]).all() and np.isnan(ref["lse"][..., ~none]).all()
    assert np.isneginf(got["lse"][..., none]).all(), got["lse"]
    assert (got["o"][..., none, :] == 0).all() and (got["dq"][..., none, :] == 0).all()
    assert_same_non_finite(got, ref, names=("o", "lse"))


@pytest.mark.parametrize("impl, dtype", impl_dtypes())
def test_causal_forward_nan_only_in_rows_that_see_the_key(impl, dtype):
    """A NaN in key 6 with causal masking (Nq = Nk): rows 6 on are NaN, rows before it exact."""
    q, k, v, do = inputs(dtype, Nq=NK, Nk=NK)
    k[0, 0, 6, 0] = np.nan
    q, k, v, do = on_device(q, k, v, do)
    got = run(impl, q, k, v, do, causal=True)
    ref = reference(q, k, v, do, causal=True)
    assert np.isnan(got["o"][0, 0, 6:]).all() and np.isnan(got["lse"][0, 0, 6:]).all()
    assert_same_non_finite(got, ref, names=("o", "lse"))
    assert_finite_close(got, ref, dtype, names=("o", "lse"))


@pytest.mark.parametrize("impl, dtype", impl_dtypes())
def test_keys_past_key_lengths_are_never_read(impl, dtype):
    """NaN and inf stored in k and v past key_lengths[b] reach no output: the results equal
    those of the same problem with zeros there."""
    lengths = np.array([7, 0], np.int32)      # batch entry 1 sees no key at all
    q, k, v, do = inputs(dtype)
    clean = on_device(q, k, v, do)
    k[0, :, 7:] = np.nan
    v[0, :, 7:] = np.inf
    k[1], v[1] = np.nan, -np.inf
    q, k, v, do = on_device(q, k, v, do)
    got = run(impl, q, k, v, do, causal=False, key_lengths=lengths)
    for name in OUTPUTS:
        assert np.isfinite(got[name][0]).all(), name
    assert (got["o"][1] == 0).all() and np.isneginf(got["lse"][1]).all()
    for name in ("dq", "dk", "dv"):
        assert (got[name][1] == 0).all(), name
    assert (got["dk"][0, :, 7:] == 0).all() and (got["dv"][0, :, 7:] == 0).all()
    ref = reference(*clean, causal=False, key_lengths=lengths)
    assert_same_non_finite(got, ref)
    assert_finite_close(got, ref, dtype)


@pytest.mark.parametrize("impl, dtype", impl_dtypes((np.float32,)))
def test_rows_that_see_no_key_stay_zero_beside_a_nan_row(impl, dtype):
    """Causal with Nq > Nk and a NaN in the query of a row that sees keys: the rows that see no
    key keep o = 0, lse = -inf and dq = 0 exactly; the NaN row is NaN."""
    Nq, Nk = 16, 9
    q, k, v, do = inputs(dtype, Nq=Nq, Nk=Nk)
    q[0, 0, 12, 1] = np.nan
    q, k, v, do = on_device(q, k, v, do)
    got = run(impl, q, k, v, do, causal=True)
    hidden = Nq - Nk
    assert (got["o"][..., :hidden, :] == 0).all() and (got["dq"][..., :hidden, :] == 0).all()
    assert np.isneginf(got["lse"][..., :hidden]).all()
    assert np.isnan(got["o"][0, 0, 12]).all() and np.isnan(got["lse"][0, 0, 12])
    assert np.isnan(got["dq"][0, 0, 12]).all()
    assert np.isfinite(got["o"][0, 0, hidden:12]).all() and np.isfinite(got["o"][1]).all()


def test_reference_rows_that_see_no_key_have_no_nan():
    """The reference itself: a fully masked row is 0 / -inf without NaN, with finite inputs."""
    q, k, v, do = on_device(*inputs(np.float64, Nq=16, Nk=9))
    ref = reference(q, k, v, do, causal=True)
    for name in OUTPUTS:
        assert not np.isnan(host(xp.asarray(ref[name]))).any(), name


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("impl, dtype", impl_dtypes())
def test_rows_that_see_no_key_stay_zero_beside_a_non_finite_value(impl, dtype, value):
    """Causal with Nq > Nk and a NaN or inf in v at key 1 (which rows of the same tiles that
    see no key multiply by P = 0: 0 · inf is NaN): those rows keep o = 0 and lse = -inf; every
    row that sees key 1 is non-finite."""
    Nq, Nk = 12, 6
    q, k, v, do = inputs(dtype, Nq=Nq, Nk=Nk)
    v[0, 0, 1, 0] = value
    q, k, v, do = on_device(q, k, v, do)
    for name, got in (("impl", run(impl, q, k, v, do, causal=True)),
                      ("reference", reference(q, k, v, do, causal=True))):
        hidden = Nq - Nk
        assert (got["o"][..., :hidden, :] == 0).all(), f"{name}: o of rows that see no key"
        assert np.isneginf(got["lse"][..., :hidden]).all(), name
        assert not np.isfinite(got["o"][0, 0, hidden + 1:, 0]).any(), name
        assert np.isfinite(got["o"][1]).all(), name
