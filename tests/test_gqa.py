"""Grouped-query and multi-query heads (issue 17): k and v with H_kv heads, H_kv dividing H;
query head h reads key/value head h // (H / H_kv), and dk, dv come back with H_kv heads, summed
over each group. naive, fa2 and tc take them (fa1 refuses), with every option.

Each impl runs against the float64 reference (nbflash.naive, which repeats K and V over the
groups and sums dK, dV back; checked here against that repeat done by hand) under the tolerance
rule, the naive baseline in the test's dtype as the yardstick. In the simulator the shapes are
tiny (several ragged tiles of the simulator tile tables); the `gpu` tests run realistic ones.
"""

import numpy as np
import pytest

import nbflash
from nbflash import MODE, bfloat16, naive
from nbflash.kernels.fa2 import plan as fa2_plan
from nbflash.kernels.fa2.tiles import RegTiles
from nbflash.kernels.tc import plan as tc_plan
from support import (assert_close, assert_masked_rows, host, naive_bf16, randn, reference,
                     reference_options, run, xp)

runs_kernels = pytest.mark.skipif(MODE == "compile", reason="runs kernels")


def inputs(seed, B, H, H_kv, Nq, Nk, d, dtype):
    """q, k, v, do with k and v of H_kv heads."""
    rng = np.random.default_rng(seed)
    return (randn(rng, (B, H, Nq, d), dtype), randn(rng, (B, H_kv, Nk, d), dtype),
            randn(rng, (B, H_kv, Nk, d), dtype), randn(rng, (B, H, Nq, d), dtype))


def check(impl, dtype, B, H, H_kv, Nq, Nk, d, causal, data_seed=0, deterministic=False,
          **opts):
    q, k, v, do = inputs(data_seed, B, H, H_kv, Nq, Nk, d, dtype)
    ref = reference(q, k, v, do, causal, **reference_options(opts, B, H, Nq, Nk))
    got = run(impl, q, k, v, do, causal, deterministic=deterministic, **opts)
    base = run("naive", q, k, v, do, causal, **opts)
    assert got["o"].shape == (B, H, Nq, d) and got["lse"].shape == (B, H, Nq)
    assert got["dq"].shape == (B, H, Nq, d)
    assert got["dk"].shape == got["dv"].shape == (B, H_kv, Nk, d)
    for name in ("o", "dq", "dk", "dv"):
        assert got[name].dtype == dtype, name
    if not opts:
        assert_masked_rows(got, Nq, Nk, causal)
    assert_close(got, base, ref, dtype, f"{impl} {np.dtype(dtype).name} B={B} H={H} "
                                        f"H_kv={H_kv} Nq={Nq} Nk={Nk} d={d} causal={causal} "
                                        f"deterministic={deterministic} {sorted(opts)}")


def options(B, H, Nq, Nk, bs=16, seed=1):
    """Dropout, key padding and a block mask that differs between query heads (leading axes
    (B, H)), so that a kernel reading the mask of the key/value head would fail."""
    rng = np.random.default_rng(seed)
    mask = rng.random((B, H, -(-Nq // bs), -(-Nk // bs))) < 0.6
    mask[..., 0, 0] = True
    lengths = np.array([Nk - 7 * b for b in range(B)])
    return dict(dropout_p=0.25, seed=7, offset=3, key_lengths=lengths, block_mask=mask,
                block_size=bs)


def test_reference_is_the_repeated_heads():
    """The float64 reference (naive) with H_kv heads equals MHA on K and V repeated by hand
    over each group, with dK and dV summed back over the group; row chunks too."""
    rng = np.random.default_rng(0)
    B, H, H_kv, Nq, Nk, d = 2, 6, 2, 7, 11, 4
    q, do = (rng.standard_normal((B, H, Nq, d)) for _ in range(2))
    k, v = (rng.standard_normal((B, H_kv, Nk, d)) for _ in range(2))
    kr, vr = (np.repeat(x, H // H_kv, axis=1) for x in (k, v))
    opts = dict(causal=True, key_lengths=np.array([9, 11]), dropout_p=0.2, seed=5)
    o, lse = naive.attention_forward(q, k, v, **opts)
    o_r, lse_r = naive.attention_forward(q, kr, vr, **opts)
    np.testing.assert_array_equal(o, o_r)
    np.testing.assert_array_equal(lse, lse_r)
    dq, dk, dv = naive.attention_backward(do, q, k, v, o, lse, **opts)
    dq_r, dk_r, dv_r = naive.attention_backward(do, q, kr, vr, o, lse, **opts)
    np.testing.assert_array_equal(dq, dq_r)
    for got, full in ((dk, dk_r), (dv, dv_r)):
        assert got.shape == (B, H_kv, Nk, d)
        np.testing.assert_allclose(got, full.reshape(B, H_kv, H // H_kv, Nk, d).sum(2),
                                   rtol=1e-13, atol=1e-14)
    for a, b in zip((dq, dk, dv), naive.attention_backward(do, q, k, v, o, lse, row_chunk=3,
                                                           **opts)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


# (impl, dtype, B, H, H_kv, Nq, Nk, causal): groups of 1 (MHA), 2 and 4, and multi-query
# (H_kv = 1), ragged both ways (the simulator's fa2 tiles are 8 x 8), causal with Nq > Nk (rows
# that see no key) and not
CASES = [("fa2", np.float32, 1, 2, 2, 13, 11, True), ("fa2", np.float32, 1, 4, 2, 11, 19, False),
         ("fa2", np.float32, 2, 4, 1, 17, 9, True), ("fa2", np.float16, 1, 4, 2, 19, 13, True),
         ("fa2", np.float16, 1, 3, 1, 9, 17, False)] + [
    ("naive", np.float16, 2, H, H_kv, Nq, Nk, causal) for H, H_kv in ((2, 2), (4, 2), (4, 1))
    for Nq, Nk, causal in ((19, 13, True), (11, 21, False))]


@runs_kernels
@pytest.mark.parametrize("impl,dtype,B,H,H_kv,Nq,Nk,causal", CASES,
                         ids=[f"{c[0]}-{np.dtype(c[1]).name}-{c[3]}-{c[4]}-{c[5]}-{c[6]}"
                              f"{'-causal' if c[7] else ''}" for c in CASES])
def test_gqa_fa2_and_naive(impl, dtype, B, H, H_kv, Nq, Nk, causal):
    check(impl, dtype, B, H, H_kv, Nq, Nk, 8, causal)


@runs_kernels
@pytest.mark.parametrize("H,H_kv,Nq,Nk,causal", [(4, 2, 33, 19, True), (4, 1, 17, 37, False)])
def test_gqa_tc(H, H_kv, Nq, Nk, causal):
    # the simulator's tc tiles at d = 16: 2 warps, 32 rows per block, 16-column steps
    check("tc", np.float16, 1, H, H_kv, Nq, Nk, 16, causal)


@runs_kernels
@pytest.mark.parametrize("impl,deterministic", [("fa2", False), ("fa2", True), ("tc", True)])
def test_gqa_every_option(impl, deterministic):
    """Dropout (the mask is the query head's), key_lengths, a per-(batch, query head) block
    mask; fa2's atomic dq and its dQ pass; tc's dQ pass (its default at this head dim in the
    simulator; the atomic one is test_gqa_tc_atomic_dq's)."""
    B, H, H_kv = 2, 2, 1
    Nq, Nk, d, bs = (21, 27, 8, 8) if impl == "fa2" else (20, 35, 16, 16)
    check(impl, np.float16, B, H, H_kv, Nq, Nk, d, True, deterministic=deterministic,
          **options(B, H, Nq, Nk, bs=bs))


@runs_kernels
def test_gqa_block_mask_per_query_head():
    """A mask with leading axes (H,) that gives each query head of a group different blocks."""
    B, H, H_kv, Nq, Nk = 1, 4, 1, 24, 24
    mask = np.ones((H, 3, 3), bool)
    for h in range(H):
        mask[h, :, (h + 1) % 3] = False
    check("fa2", np.float32, B, H, H_kv, Nq, Nk, 8, False, block_mask=mask, block_size=8)


def _plan_check(plan, dtype, B, H, H_kv, Nq, Nk, d, causal, what):
    q, k, v, do = inputs(2, B, H, H_kv, Nq, Nk, d, dtype)
    o, lse = plan.forward(xp, q, k, v, 0)
    got = dict(zip(("o", "lse", "dq", "dk", "dv"),
                   (host(x) for x in (o, lse, *plan.backward(xp, do, q, k, v, o, lse, 0)))))
    ref = reference(q, k, v, do, causal)
    assert_close(got, run("naive", q, k, v, do, causal), ref, dtype, what)


@runs_kernels
def test_gqa_tc_atomic_dq():
    """tc's dK/dV pass with dQ added atomically (dq_pass=False): each group member's dQ goes to
    its own query head."""
    B, H, H_kv, Nq, Nk, d = 1, 3, 1, 20, 35, 16
    plan = tc_plan.plan_for(B, H, Nq, Nk, d, "float16", True, d ** -0.5, dq_pass=False,
                            kv_heads=H_kv)
    assert plan.atomic
    _plan_check(plan, np.float16, B, H, H_kv, Nq, Nk, d, True, "tc atomic dq")


@runs_kernels
def test_gqa_fa2_double_buffered_dkdv():
    """fa2's dK/dV pass with two stages (Q_i, dO_i of the next step loaded ahead): each query
    head of the group starts its pipeline anew."""
    B, H, H_kv, Nq, Nk, d = 1, 4, 2, 27, 19, 8
    tiles = (("dkdv", RegTiles(8, 8, 8, 2, 2, stages=2)),)
    plan = fa2_plan.plan_for(B, H, Nq, Nk, d, "float32", True, d ** -0.5, False, tiles,
                             kv_heads=H_kv)
    _plan_check(plan, np.float32, B, H, H_kv, Nq, Nk, d, True, "fa2 2-stage dkdv")


@runs_kernels
def test_gqa_tc_bfloat16_bits():
    rng = np.random.default_rng(3)
    B, H, H_kv, Nq, Nk, d = 1, 2, 1, 21, 27, 16
    f = [bfloat16.values(bfloat16.bits(rng.standard_normal(s)))
         for s in ((B, H, Nq, d), (B, H_kv, Nk, d), (B, H_kv, Nk, d), (B, H, Nq, d))]
    bits = [xp.asarray(bfloat16.bits(x)) for x in f]
    scale = 1 / np.sqrt(d)
    plan = tc_plan.plan_for(B, H, Nq, Nk, d, "bfloat16", False, scale, kv_heads=H_kv)
    o, lse = plan.forward(xp, *bits[:3], 0)
    grads = plan.backward(xp, bits[3], *bits[:3], o, lse, 0)
    got = {n: host(x) if n == "lse" else bfloat16.values(host(x))
           for n, x in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, *grads))}
    assert got["dk"].shape == (B, H_kv, Nk, d)
    ref = reference(*(xp.asarray(x) for x in f), False)
    kr, vr = (np.repeat(x, H // H_kv, axis=1) for x in f[1:3])
    base = naive_bf16(f[0], kr, vr, f[3], False, scale)
    for name in ("dk", "dv"):   # (the baseline's MHA gradients, summed over each group)
        base[name] = bfloat16.values(bfloat16.bits(
            base[name].reshape(B, H_kv, H // H_kv, Nk, d).sum(2)))
    assert_close(got, base, ref, "bfloat16", "tc bfloat16 bits, grouped-query")


def test_gqa_refused():
    rng = np.random.default_rng(0)
    q, k, v, do = inputs(0, 1, 4, 2, 8, 8, 8, np.float32)
    with pytest.raises(nbflash.InputError, match=r"impl='fa1' takes k and v with as many "
                                                 r"heads as q \(4\); got 2"):
        nbflash.attention(q, k, v, impl="fa1")
    with pytest.raises(nbflash.InputError, match=r"impl='fa1' takes k and v"):
        nbflash.attention_backward(do, q, k, v, do, xp.zeros((1, 4, 8), xp.float32),
                                   impl="fa1")
    q3 = randn(rng, (1, 3, 8, 8), np.float32)
    with pytest.raises(nbflash.InputError, match=r"heads of k and v \(2\) must divide heads "
                                                 r"of q \(3\)"):
        nbflash.attention(q3, k, v, impl="naive")
    with pytest.raises(nbflash.InputError, match=r"k and v must have the same number of "
                                                 r"heads; got 2 and 1"):
        nbflash.attention(q, k, v[:, :1], impl="naive")
    with pytest.raises(nbflash.InputError, match=r"do has shape \(1, 2, 8, 8\); expected o's"):
        nbflash.attention_backward(do[:, :2], q, k, v, do, xp.zeros((1, 4, 8), xp.float32),
                                   impl="naive")
    with pytest.raises(nbflash.InputError, match=r"lse has shape \(1, 2, 8\)"):
        nbflash.attention_backward(do, q, k, v, do, xp.zeros((1, 2, 8), xp.float32),
                                   impl="naive")


@runs_kernels
def test_grid_limit_refused():
    """fa2's and tc's forward grids have B·H_kv blocks along z (at most 65535)."""
    q = xp.zeros((65536, 2, 1, 8), np.float32)
    kv = xp.zeros((65536, 1, 1, 8), np.float32)
    with pytest.raises(nbflash.InputError, match=r"65536 x 1 = 65536, above the 65535 that "
                                                 r"fa2's grids take"):
        nbflash.attention(q, kv, kv, impl="fa2")


# ------------------------------------------------------------------------------ GPU sizes

@pytest.mark.gpu
@pytest.mark.parametrize("impl,dtype", [("tc", np.float16), ("fa2", np.float16),
                                        ("fa2", np.float32)])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("H,H_kv", [(8, 2), (8, 1), (6, 6)])
def test_gqa_realistic_sizes(impl, dtype, d, H, H_kv):
    check(impl, dtype, 2, H, H_kv, 1023, 1100, d, True)
    check(impl, dtype, 2, H, H_kv, 777, 513, d, False, deterministic=True,
          **options(2, H, 777, 513, bs=64))


@pytest.mark.gpu
def test_gqa_tc_head_dim_256_and_atomic():
    check("tc", np.float16, 1, 8, 2, 700, 900, 256, True)
    B, H, H_kv, N, d = 2, 8, 2, 513, 128
    plan = tc_plan.plan_for(B, H, N, N, d, "float16", True, d ** -0.5, dq_pass=False,
                            kv_heads=H_kv)
    _plan_check(plan, np.float16, B, H, H_kv, N, N, d, True, "tc atomic dq, GPU")
