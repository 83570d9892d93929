"""nbflash.iomodel: the HBM model against the bytes the kernels move in the simulator (exactly,
kernel by kernel and array by array), the counter's rule on a probe kernel, and the model's
structure against hand-derived formulas (no kernels run)."""

import numpy as np
import pytest

import nbflash
from numba import float32
from nbflash import iomodel
from nbflash.kernels.fa1 import plan as fa1_plan, tiles as fa1_tiles
from nbflash.kernels.fa2 import plan as fa2_plan, tiles as fa2_tiles
from nbflash._cuda import SIMULATOR, cuda

needs_sim = pytest.mark.skipif(not SIMULATOR, reason="the counter runs in the simulator")


def _inputs(B, H, Nq, Nk, d, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q, do = (rng.standard_normal((B, H, Nq, d)).astype(dtype) for _ in range(2))
    k, v = (rng.standard_normal((B, H, Nk, d)).astype(dtype) for _ in range(2))
    return q, k, v, do


def _check(impl, B, H, Nq, Nk, d, dtype, causal, **opts):
    """Forward, then backward (both dQ modes for fa2): counted == modelled, exactly."""
    q, k, v, do = _inputs(B, H, Nq, Nk, d, dtype)
    shape = (impl, B, H, Nq, Nk, d, dtype)
    with iomodel.count() as c:
        o, lse = nbflash.attention_forward(q, k, v, causal=causal, impl=impl, **opts)
    assert c.traffic == iomodel.hbm_bytes(impl, "fwd", *shape[1:], causal=causal, **opts)
    assert not c.merged   # the kernels load no element twice between barriers
    for det in ((False, True) if impl == "fa2" else (False,)):
        extra = {"deterministic": det} if impl == "fa2" else {}
        with iomodel.count() as c:
            nbflash.attention_backward(do, q, k, v, o, lse, causal=causal, impl=impl, **opts,
                                       **extra)
        model = iomodel.hbm_bytes(impl, "bwd", *shape[1:], causal=causal, **opts, **extra)
        assert c.traffic == model.kernels_only(), (det, c.traffic, model)
        assert (c.read, c.write, c.atomic) == (model.kernels_only().read,
                                               model.kernels_only().write,
                                               model.kernels_only().atomic)
        assert not c.merged


# (B, H, Nq, Nk, d, dtype, causal, fa1 options): ragged lengths both ways, several blocks
FA1_CASES = [
    (1, 2, 17, 17, 8, np.float32, False, {"M": 128}),                       # Br = Bc = 4
    (2, 1, 33, 20, 16, np.float16, True, {"M": 256}),                       # Br = Bc = 4
    (1, 1, 20, 33, 8, np.float16, True, {"M": 200, "block_rule": "seed"}),  # Br 7, Bc 7
    (1, 1, 20, 33, 16, np.float32, False, {}),                              # default M
]
FA2_CASES = [   # the simulator's tiles: 8 x 8 blocks
    (1, 2, 17, 17, 8, np.float32, False),
    (2, 1, 33, 20, 16, np.float16, True),
    (1, 1, 20, 33, 8, np.float16, True),
    (2, 1, 20, 33, 16, np.float32, True),
]


@needs_sim
@pytest.mark.parametrize("B,H,Nq,Nk,d,dtype,causal,opts", FA1_CASES)
def test_fa1_counted_equals_model(B, H, Nq, Nk, d, dtype, causal, opts):
    _check("fa1", B, H, Nq, Nk, d, dtype, causal, **opts)


@needs_sim
@pytest.mark.parametrize("B,H,Nq,Nk,d,dtype,causal", FA2_CASES)
def test_fa2_counted_equals_model(B, H, Nq, Nk, d, dtype, causal):
    _check("fa2", B, H, Nq, Nk, d, dtype, causal)


@needs_sim
def test_fa2_double_buffered_tiles():
    # stages = 2 with float32 and d % 4 == 0: K, V come through cp.async's simulator fallback
    t = fa2_tiles.RegTiles(8, 8, 8, 2, 2, stages=2)
    q, k, v, _ = _inputs(1, 2, 19, 27, 8, np.float32)
    with iomodel.count() as c:
        fa2_plan.run_forward(np, q, k, v, causal=True, scale=0.3, tiles=t)
    assert c.traffic == iomodel.hbm_bytes("fa2", "fwd", 1, 2, 19, 27, 8, "float32",
                                          causal=True, tiles={"forward": t})


@needs_sim
def test_broadcast_loads_are_merged():
    # with key padding every thread reads key_lengths[b]: one load per block
    q, k, v, _ = _inputs(2, 1, 9, 9, 8, np.float32)
    with iomodel.count() as c:
        nbflash.attention_forward(q, k, v, impl="fa1", M=128,
                                  key_lengths=np.array([5, 9], np.int32))
    threads = fa1_tiles.tiles_for(128, 8, "paper", 16).threads
    assert c.traffic.parts["fa1_forward"]["key_lengths"] == iomodel.IO(read=2 * 4)
    assert c.merged == {("fa1_forward", "key_lengths"): 2 * (threads - 1) * 4}


T = 4   # the probe's threads


def probe(x, y, z):
    tid = cuda.threadIdx.x
    row = x[1]                       # a view: nothing moves
    a = row[tid]                     # 4 bytes per thread
    b = x[0, 0]                      # the same element in every thread: counted once
    sh = cuda.shared.array(T, float32)
    sh[tid] = a + b                  # shared memory: not counted
    y[tid] = sh[tid]                 # 4 bytes per thread
    cuda.atomic.add(z, 0, a)         # 4 bytes per thread, as atomic
    if tid == 0:
        y[T:T + 4] = 0               # a slice store: 16 bytes
        u, w = x[2, 0:2]             # a slice load: 8 bytes
    if tid == 1:
        u = np.add(x[2, 2:4], 1)     # a slice into a ufunc: 8 bytes
    cuda.syncthreads()
    b = x[0, 0]                      # after a barrier: counted once more


def uncountable(x):
    x.sum()


@needs_sim
def test_counting_rule_on_a_probe_kernel():
    kernel = cuda.jit(probe)
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    y, z = np.zeros(2 * T, np.float32), np.zeros(1, np.float32)
    with iomodel.count() as c:
        kernel[1, T](x, y, z)
    expected = {"probe": {"x": iomodel.IO(read=4 * T + 4 + 8 + 8 + 4),
                          "y": iomodel.IO(write=4 * T + 16), "z": iomodel.IO(atomic=4 * T)}}
    assert c.traffic == iomodel.Traffic(expected)
    assert c.merged == {("probe", "x"): 2 * (T - 1) * 4}
    assert z[0] == 4 + 5 + 6 + 7 and list(y[:T]) == [4, 5, 6, 7]   # results unchanged
    with pytest.raises(RuntimeError):
        with iomodel.count():
            with iomodel.count():
                pass
    kernel[1, T](x, y, z)                # outside the block: nothing is counted
    assert c.traffic == iomodel.Traffic(expected)
    with pytest.raises(RuntimeError, match="counts element and slice accesses only"):
        with iomodel.count():
            cuda.jit(uncountable)[1, 1](x)


@needs_sim
def test_counting_leaves_results_bitwise_equal():
    q, k, v, _ = _inputs(1, 1, 13, 11, 8, np.float16)
    plain = nbflash.attention_forward(q, k, v, causal=True, impl="fa1", M=128)
    with iomodel.count():
        counted = nbflash.attention_forward(q, k, v, causal=True, impl="fa1", M=128)
    for a, b in zip(plain, counted):
        assert np.array_equal(a, b)


# ------------------------------------------------------------- the model's structure (no kernels)

def test_fa1_forward_matches_algorithm_1_by_hand():
    # exact multiples, float32: K, V read once; Q_i, O_i, ℓ_i, m_i read and O_i, ℓ_i, m_i
    # written once per (i, j), i.e. Tc times per row; O, ℓ, m initialised; lse = m + log ℓ
    B, H, N, d, M = 2, 3, 64, 16, 256
    Br, Bc = fa1_tiles.block_sizes(M, d)
    assert (Br, Bc) == (4, 4)
    Tc, s, BH = N // Bc, 4, 6
    read = 2 * N * d * s + Tc * N * d * (s + 4) + 2 * Tc * N * 4 + 2 * N * 4
    write = N * d * 4 + 2 * N * 4 + Tc * N * (d + 2) * 4 + N * 4
    t = iomodel.hbm_bytes("fa1", "fwd", B, H, N, N, d, np.float32, M=M)
    assert (t.read, t.write, t.atomic) == (BH * read, BH * write, 0)
    # float16: q, k, v read in 2 bytes, and the float32 O converted into o at the end
    t16 = iomodel.hbm_bytes("fa1", "fwd", B, H, N, N, d, np.float16, M=M)
    read16 = read - (2 * N * d + Tc * N * d) * 2 + N * d * 4
    assert (t16.read, t16.write) == (BH * read16, BH * (write + N * d * 2))


def test_fa1_backward_matches_algorithm_4_by_hand():
    B, H, N, d, M = 1, 1, 60, 8, 240   # Br = Bc = 8, N ragged: 7 full blocks and one of 4
    Br, Bc = fa1_tiles.block_sizes(M, d)
    assert (Br, Bc) == (8, 8)
    Tc, s = -(-N // Bc), 4
    t = iomodel.hbm_bytes("fa1", "bwd", B, H, N, N, d, "float32", M=M)
    assert t.read == 2 * N * d * s + Tc * N * (3 * d * s + 4 + d * 4)
    assert t.write == N * d * 4 + Tc * N * d * 4 + 2 * N * d * s


def test_fa2_reads_kv_once_per_query_block():
    B, H, N, d = 1, 2, 256, 64
    t = fa2_tiles.RegTiles(64, 32, d, 8, 4)
    parts = iomodel.hbm_bytes("fa2", "fwd", B, H, N, N, d, "float16",
                              tiles={"forward": t}).parts["fa2_forward"]
    assert parts["q"].read == parts["o"].write == B * H * N * d * 2
    assert parts["k"].read == parts["v"].read == (N // t.R) * B * H * N * d * 2
    # the dK/dV pass reads Q, dO once per key block; the dQ pass K, V once per query block
    tiles = {"dkdv": fa2_tiles.RegTiles(32, 64, d, 4, 8), "dq": fa2_tiles.RegTiles(64, 32, d, 8, 4)}
    bwd = iomodel.hbm_bytes("fa2", "bwd", B, H, N, N, d, "float32", tiles=tiles,
                            deterministic=True).parts
    assert bwd["fa2_dkdv"]["q"].read == (N // 32) * B * H * N * d * 4
    assert bwd["fa2_dq"]["k"].read == (N // 64) * B * H * N * d * 4
    atomic = iomodel.hbm_bytes("fa2", "bwd", B, H, N, N, d, "float32", tiles=tiles)
    assert atomic.atomic == (N // 32) * B * H * N * d * 4 and "fa2_dq" not in atomic.parts


@pytest.mark.parametrize("impl,opts", [("fa1", {"M": 4096}), ("fa2", {})])
def test_causal_roughly_halves_the_quadratic_traffic(impl, opts):
    N, d = 2048, 64
    full, causal = (iomodel.hbm_bytes(impl, "fwdbwd", 1, 1, N, N, d, "float32", causal=c,
                                      tiles=fa2_tiles.GPU_TILES, **opts) for c in (0, 1))
    quadratic = {"fa1": ("fa1_forward", "q"), "fa2": ("fa2_forward", "k")}[impl]
    ratio = causal.parts[quadratic[0]][quadratic[1]].read / \
        full.parts[quadratic[0]][quadratic[1]].read
    assert 0.5 < ratio < 0.56
    assert 0.5 < causal.total / full.total < 0.7


def test_naive_is_quadratic_in_N():
    def total(N):
        return iomodel.hbm_bytes("naive", "fwdbwd", 2, 4, N, N, 64, "float16", causal=True).total

    # an exact quadratic polynomial in N: third finite differences vanish
    f = [total(n) for n in (256, 512, 768, 1024)]
    assert f[3] - 3 * f[2] + 3 * f[1] - f[0] == 0
    assert 3.9 < total(8192) / total(4096) < 4.0
    # and of Theorem 2's form: bytes / (Nd + N²) tends to a constant
    r = [total(n) / iomodel.theorem2_standard(n, 64) for n in (4096, 8192)]
    assert abs(r[1] / r[0] - 1) < 0.02


def test_fa1_follows_theorem_2():
    # HBM bytes / (N²d²/M) tends to a constant as N grows, the same for every M
    d = 64
    r = [iomodel.hbm_bytes("fa1", "fwd", 1, 1, N, N, d, "float32", M=M).total
         / iomodel.theorem2_flash(N, d, M) for N in (8192, 16384) for M in (4096, 8192)]
    assert max(r) / min(r) < 1.03


def test_default_blocks_are_the_kernels():
    for d in (8, 64, 128):
        for pass_ in ("forward", "backward"):
            t = fa1_plan.check(d, pass_)
            assert iomodel.fa1_blocks(d, pass_) == (t.Br, t.Bc)


def test_fwdbwd_is_fwd_plus_bwd_and_options_are_refused():
    args = ("fa2", 2, 2, 40, 30, 16, "float16")
    both = iomodel.hbm_bytes(args[0], "fwdbwd", *args[1:], causal=True)
    assert both == iomodel.hbm_bytes(args[0], "fwd", *args[1:], causal=True) + \
        iomodel.hbm_bytes(args[0], "bwd", *args[1:], causal=True)
    # float16 with atomic dQ: the float32 accumulator is converted by an array operation
    assert any(n.startswith(iomodel.ARRAY_OP) for n in both.parts)
    with pytest.raises(NotImplementedError):
        iomodel.hbm_bytes(args[0], "fwd", *args[1:], dropout_p=0.1)
    with pytest.raises(ValueError):
        iomodel.hbm_bytes("fa1", "fwd", 1, 1, 8, 8, 8, "float64")
