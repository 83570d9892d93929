"""nbflash.naive in chunks of query rows (row_chunk) gives the unchunked results, with every
mask applied to each chunk's rows as to the whole problem; and the benchmark's reference, when
it is chunked (REFERENCE_CHUNK_BYTES), still checks its points.

Tolerances for chunked against unchunked, relative to the output's largest magnitude:
- float64 and float32: 16 eps. o, lse and dq are computed row by row with the same operations,
  but BLAS chooses its kernel, and so the order of a dot product's sum, by the matrices' shapes
  (a chunk of 1 or 7 rows is a different GEMM than one of 50): a few roundings at the output's
  magnitude, a little more in dq through the cancellation in dP - D (up to ~5 eps seen). dk and
  dv are sums over the rows, accumulated chunk by chunk: the same sum in another grouping.
- float16: one float16 ulp (eps16) for o, dq, dk and dv: the differences are float32 ones,
  and at most move the final rounding to float16 by one step; lse is float32 (16 eps32).
- one chunk of all rows: bitwise equal (same operations on the same shapes), but for float16
  dk and dv, which the chunked code rounds once at the end instead of after the product.
"""

import numpy as np
import pytest

import nbflash
from nbflash import bench, naive, rng, sparsity, tolerance

NAMES = ("o", "lse", "dq", "dk", "dv")
D = 8


def inputs(Nq, Nk, dtype, B=2, H=3, seed=0):
    r = np.random.default_rng(seed)
    q = r.standard_normal((B, H, Nq, D)).astype(dtype)
    k, v = (r.standard_normal((B, H, Nk, D)).astype(dtype) for _ in range(2))
    do = r.standard_normal((B, H, Nq, D)).astype(dtype)
    return q, k, v, do


def options(case, Nq, Nk, B=2, H=3):
    """naive's options for one test case (causal on in all of them but "plain")."""
    if case == "plain":
        return {}
    opts = {"causal": True}
    if case in ("masks", "dropout", "keep", "keep-fn"):
        # a key length that hides keys from every row, and one that hides none
        opts["key_lengths"] = np.array([max(1, Nk - 9), Nk])[:B]
        bq, bk = 6, 5                      # divide neither 37 nor 50
        opts["block_mask"] = sparsity.random_blocks(sparsity.n_blocks(Nq, bq),
                                                    sparsity.n_blocks(Nk, bk), 0.6, seed=3)
        opts["block_size"] = (bq, bk)
    if case == "dropout":
        opts.update(dropout_p=0.3, seed=2**33 + 5, offset=4)
    if case in ("keep", "keep-fn"):
        keep = np.random.default_rng(9).random((B, H, Nq, Nk)) > 0.25
        opts.update(dropout_p=0.25,
                    keep=keep if case == "keep" else (lambda rows: keep[..., rows, :]))
    return opts


def run(q, k, v, do, row_chunk, **opts):
    o, lse = naive.attention_forward(q, k, v, row_chunk=row_chunk, **opts)
    grads = naive.attention_backward(do, q, k, v, o, lse, row_chunk=row_chunk, **opts)
    return dict(zip(NAMES, (o, lse, *grads)))


def rel_diff(a, b):
    """max |a - b| / max |a| over finite entries (infinities must coincide)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    assert np.array_equal(np.isinf(a), np.isinf(b)) and not np.isnan(b).any()
    fin = np.isfinite(a)
    scale = np.abs(a[fin]).max() if fin.any() else 1.0
    return float(np.abs(a[fin] - b[fin]).max() / scale) if fin.any() else 0.0


def allowed(name, dtype):
    if np.dtype(dtype) == np.float16:
        return float(np.finfo(np.float32 if name == "lse" else np.float16).eps) * (
            16 if name == "lse" else 1)
    return 16 * float(np.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("Nq,Nk", [(37, 50), (50, 37)])
@pytest.mark.parametrize("case", ["plain", "causal", "masks", "dropout", "keep", "keep-fn"])
def test_chunked_equals_unchunked(case, Nq, Nk, dtype):
    q, k, v, do = inputs(Nq, Nk, dtype)
    opts = options(case, Nq, Nk)
    want = run(q, k, v, do, None, **opts)
    if case != "plain" and Nq > Nk:     # causal: the first Nq - Nk rows see no key at all
        assert np.isinf(want["lse"][:, :, :Nq - Nk]).all()
    for row_chunk in (1, 7, Nq, Nq + 5):
        got = run(q, k, v, do, row_chunk, **opts)
        for name in NAMES:
            assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
            diff = rel_diff(want[name], got[name])
            print(f"{np.dtype(dtype).name} {case} {Nq}x{Nk} R={row_chunk} {name}: {diff:.3g}")
            if row_chunk >= Nq and not (dtype == np.float16 and name in ("dk", "dv")):
                assert diff == 0, (name, row_chunk)
            else:
                assert diff <= allowed(name, dtype), (name, row_chunk, diff)


def test_a_wrong_chunk_mask_would_be_seen():
    """The comparison above can fail: the causal mask at rows relative to the chunk (the bug
    row chunks invite) changes the results far beyond the tolerances."""
    q, k, v, do = inputs(37, 50, np.float64)
    want = run(q, k, v, do, None, causal=True)
    real = naive.causal_visible
    try:
        naive.causal_visible = lambda Nq, Nk, xp=np, rows=None: real(
            Nq, Nk, xp, None if rows is None else slice(0, rows.stop - rows.start))
        got = run(q, k, v, do, 7, causal=True)
    finally:
        naive.causal_visible = real
    assert rel_diff(want["o"], got["o"]) > 1e-3


@pytest.mark.parametrize("Nq,Nk", [(37, 50), (50, 37)])
def test_row_masks_are_the_rows_of_the_whole_masks(Nq, Nk):
    B, H = 2, 3
    opts = options("masks", Nq, Nk, B, H)
    opts.pop("causal")
    bm = np.random.default_rng(1).random((H, sparsity.n_blocks(Nq, 4), 3)) > 0.4  # per head
    for rows in (slice(0, 1), slice(5, 12), slice(Nq - 3, Nq), slice(0, Nq)):
        whole = naive.visible(B, H, Nq, Nk, np, True, **opts)
        part = naive.visible(B, H, Nq, Nk, np, True, rows=rows, **opts)
        np.testing.assert_array_equal(part, whole[..., rows, :])
        np.testing.assert_array_equal(naive.causal_visible(Nq, Nk, rows=rows),
                                      naive.causal_visible(Nq, Nk)[rows])
        np.testing.assert_array_equal(
            sparsity.expand(bm, (4, -(-Nk // 3)), Nq, Nk, rows=rows),
            sparsity.expand(bm, (4, -(-Nk // 3)), Nq, Nk)[..., rows, :])


def test_keep_mask_draws_any_part_of_the_whole():
    whole = rng.keep_mask(np, 3, 4, 21, 19, 0.4, seed=2**40 + 3, offset=2)
    for rows, batches, heads in ((slice(0, 21), None, None), (slice(7, 8), None, None),
                                 (slice(5, 17), slice(1, 2), slice(1, 3)),
                                 (None, slice(2, 3), slice(3, 4))):
        part = rng.keep_mask(np, 3, 4, 21, 19, 0.4, seed=2**40 + 3, offset=2, rows=rows,
                             batches=batches, heads=heads)
        sel = tuple(slice(None) if s is None else s for s in (batches, heads, rows))
        np.testing.assert_array_equal(part, whole[sel])
    # and the whole is what the kernels draw
    np.testing.assert_array_equal(
        whole, bench.to_host(nbflash.dropout_mask(3, 4, 21, 19, 0.4, seed=2**40 + 3, offset=2)))


def test_row_chunk_must_be_a_positive_integer():
    q, k, v, _ = inputs(5, 5, np.float32)
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="row_chunk"):
            naive.attention_forward(q, k, v, row_chunk=bad)


# -- the benchmark's reference ----------------------------------------------------------------

def test_reference_row_chunk_rule():
    rows = bench.reference_row_chunk
    # the GPU grid: B = 16k tokens // N (at least 1), H = 2048 // d; the slice has 2 heads
    assert rows(4, 32, 4096, 4096) is None
    assert rows(2, 32, 8192, 8192) is None            # 2 x 8192² x 8 B = 1 GiB exactly
    assert rows(1, 32, 16384, 16384) == 4096
    assert rows(1, 32, 32768, 32768) == 2048
    assert rows(1, 16, 65536, 65536) == 1024
    # a slice of one head, and chunks made equal: 3 rows fit, 8 rows -> 3 chunks of 3, 3, 2
    assert rows(1, 1, 8, 8, limit=3 * 8 * 8) == 3
    assert rows(1, 2, 10, 10, limit=4 * 2 * 10 * 8) == 4      # 10 rows: 4, 4, 2
    assert rows(1, 2, 9, 10, limit=4 * 2 * 10 * 8) == 3       # 9 rows: 3 chunks of 3
    assert rows(1, 2, 9, 10, limit=1) == 1


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_chunked_slice_reference_equals_the_whole(dropout):
    B, H, N = 2, 3, 13
    xp = bench.xp()
    opts = bench.api_options(B, N, dropout, True, 0.5, 4, xp)
    copy = bench.make_copies(xp, (B, H, N, D), np.dtype(np.float32), 1, seed=5)[0]
    ref, nerr = bench.slice_reference(copy, True, bench.slice_options(opts, B, H, N))
    for row_chunk in (1, 5):
        sl = bench.slice_options(opts, B, H, N, row_chunk)
        assert callable(sl["keep"]) if dropout else "keep" not in sl
        ref2, nerr2 = bench.slice_reference(copy, True, sl, row_chunk)
        for name in ref:
            assert rel_diff(ref[name], ref2[name]) <= 16 * np.finfo(np.float64).eps, name
            # the baseline's errors are a few roundings either way (BLAS's summation order
            # depends on the chunk's shape): each passes the rule against the other
            for a, b in ((nerr, nerr2), (nerr2, nerr)):
                assert a[name] <= tolerance.allowed(name, b[name], ref[name], np.float32), name


TINY = {"dtypes": ("float32",), "Ns": (8,), "ds": (8,), "tokens": 16, "hidden": 32,
        "repeats": 1, "warmup": 0, "host_overhead": False, "progress": False,
        "causal": (True,), "passes": ("fwd", "bwd"), "block_size": 3}


@pytest.fixture
def forced_chunks(monkeypatch):
    """The reference in chunks of 3 rows of 8 (3, 3, 2), on a slice that is neither the first
    batch entry nor the first head (B=2, H=4: the dropout counter's b·H + h is 5 and 6)."""
    monkeypatch.setattr(bench.reference, "CHECK_SLICE", (slice(1, 2), slice(1, 3)))
    monkeypatch.setattr(bench.reference, "REFERENCE_CHUNK_BYTES", 3 * 2 * 8 * 8)
    chunks = []
    real = naive.attention_backward

    def spy(*args, row_chunk=None, **kw):
        chunks.append(row_chunk)
        return real(*args, row_chunk=row_chunk, **kw)
    monkeypatch.setattr(naive, "attention_backward", spy)
    return chunks


def test_points_pass_their_check_against_a_chunked_reference(forced_chunks):
    impls = ("fa2", "naive") if "fa2" in bench.nbflash_impls() else ("naive",)
    doc = bench.run(impls=impls, dropout=0.3, padding=True, densities=(0.5,), **TINY)
    assert 3 in forced_chunks                     # the reference was chunked
    params = doc["meta"]["params"]
    assert params["reference_row_chunk"] == {"N=8 d=8": 3}
    assert params["reference_chunk_bytes"] == 3 * 2 * 8 * 8 and "chunks" in params["reference"]
    assert len(doc["records"]) == 2 * len(impls)
    for r in doc["records"]:
        assert (r["B"], r["H"]) == (2, 4)
        assert r["status"] == "ok" and "check_skipped" not in r, r
        assert set(r["max_err"]) == ({"o"} if r["pass"] == "fwd" else {"o", "dq", "dk", "dv"})


def test_a_chunked_reference_still_sees_a_wrong_dropout_mask(forced_chunks, monkeypatch):
    real = nbflash.attention_forward

    def other_head(q, k, v, **kw):     # the mask of other heads: as if b·H + h were wrong
        flip = naive.array_module(q).ascontiguousarray
        o, lse = real(*(flip(x[:, ::-1]) for x in (q, k, v)), **kw)
        return flip(o[:, ::-1]), flip(lse[:, ::-1])
    monkeypatch.setattr(nbflash, "attention_forward", other_head)
    doc = bench.run(impls=("naive",), dropout=0.5, **{**TINY, "passes": ("fwd",)})
    (r,) = doc["records"]
    assert 3 in forced_chunks                     # the reference (with its backward) was chunked
    assert r["status"] == "error" and "correctness check failed" in r["error"], r
