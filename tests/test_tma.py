"""TMA loads and mbarriers from Numba (nbflash.kernels.common.tma), fa3's loads: one box of a
2-D float16 tensor into a 128-byte-swizzled shared tile, waited for on an mbarrier, read back
in order (rows past the tensor's end must come as zeros); then two boxes (Q_i, K_j) feeding
wgmma, S = Q_i K_jᵀ. In the simulator through the module's emulation (copy at once, counters
for the barrier); on an sm_90 GPU through the real instructions and a driver-encoded tensor
map (marked gpu); compiled for sm_90a without a GPU."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from numba import float32, types, uint16, uint64

import nbflash
from nbflash._cuda import cuda
from nbflash.kernels.common import tma as M
from nbflash.kernels.common import wgmma as W

SIG_BOX = types.void(types.uint16[::1], types.uint64[::1], types.uint16[::1], types.int64,
                     types.int64, types.int64)


def _box_kernel(rows):
    """A (rows x 64) box at (row0, 0) of an (n_rows, 64) tensor, through TMA and an mbarrier,
    written back to `out` in row-major order."""
    layout = W.KMajor(rows, 64, 128)
    offset = W.make_offset(layout)
    load = M.make_tma_load_2d(rows, 64)
    size = layout.elements + 512
    NBYTES = rows * 64 * 2

    def k(src, tmap, out, n_rows, n_cols, row0):
        smem = cuda.shared.array(size, uint16)
        bar = cuda.shared.array(4, uint64)
        tid = cuda.threadIdx.x
        base = W.aligned_start(smem)
        if tid == 0:
            M.fence_tensormap(tmap)
            M.mbar_init(bar, 0, 1)
            M.fence_barrier_init()
        cuda.syncthreads()
        if tid == 0:
            M.mbar_arrive_expect_tx(bar, 0, NBYTES)
            load(smem, base, tmap, src, n_rows, n_cols, row0, 0, bar, 0)
        while M.mbar_try_wait(bar, 0, 0) == 0:
            pass
        for i in range(tid, rows * 64, cuda.blockDim.x):
            out[i] = smem[base + offset(i // 64, i % 64)]

    return k


def _tmap(x, n_rows, box_rows):
    """The tensor map on the GPU; in the simulator a placeholder (the emulation reads `src`)."""
    if nbflash.MODE == "gpu":
        return M.device_tensor_map(x, n_rows, 64, box_rows, 64)
    return np.zeros(16, np.uint64)


def _arrays(*xs):
    if nbflash.MODE == "gpu":
        import cupy  # noqa: PLC0415
        return [cupy.asarray(x) for x in xs]
    return list(xs)


def _host(x):
    return x.get() if hasattr(x, "get") else x


def _run_box(n_rows, rows, row0):
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((n_rows, 64)).astype(np.float16).view(np.uint16)
    src, out = _arrays(x.reshape(-1), np.zeros(rows * 64, np.uint16))
    tmap = _tmap(src, n_rows, rows)
    kern = _box_kernel(rows)
    (cuda.jit(SIG_BOX)(kern) if nbflash.MODE == "gpu" else cuda.jit(kern))[1, 128](
        src, tmap, out, n_rows, 64, row0)
    want = np.zeros((rows, 64), np.uint16)
    n = max(0, min(rows, n_rows - row0))
    want[:n] = x[row0:row0 + n]
    np.testing.assert_array_equal(_host(out).reshape(rows, 64), want)


def _qk_kernel(N):
    """Q_i (64 x 64) and K_j (N x 64) by TMA into swizzled tiles, one mbarrier for both, then
    S = Q_i K_jᵀ by four wgmma (K-major A and B); each thread's fragment out."""
    lq, lk = W.KMajor(64, 64, 128), W.KMajor(N, 64, 128)
    load_q, load_k = M.make_tma_load_2d(64, 64), M.make_tma_load_2d(N, 64)
    k_off = lq.elements
    size = k_off + lk.elements + 512
    NBYTES = (64 + N) * 64 * 2
    R = N // 2
    mma = W.make_wgmma(N, False, lq, lk)
    wait, fence_acc = W.make_wait(0), W.make_fence_acc(R)

    def k(q, qmap, kk, kmap, out, nq, nk):
        smem = cuda.shared.array(size, uint16)
        bar = cuda.shared.array(4, uint64)
        tid = cuda.threadIdx.x
        base = W.aligned_start(smem)
        if tid == 0:
            M.fence_tensormap(qmap)
            M.fence_tensormap(kmap)
            M.mbar_init(bar, 0, 1)
            M.fence_barrier_init()
        cuda.syncthreads()
        if tid == 0:
            M.mbar_arrive_expect_tx(bar, 0, NBYTES)
            load_q(smem, base, qmap, q, nq, 64, 0, 0, bar, 0)
            load_k(smem, base + k_off, kmap, kk, nk, 64, 0, 0, bar, 0)
        while M.mbar_try_wait(bar, 0, 0) == 0:
            pass
        acc = cuda.local.array(R, float32)
        for x in range(R):
            acc[x] = float32(0.0)
        W.fence()
        for s in range(4):
            mma(acc, 0, smem, base, base + k_off, 16 * s, 1 if s else 0)
        W.commit()
        wait()
        fence_acc(acc, 0)
        for x in range(R):
            out[tid * R + x] = acc[x]

    return k


SIG_QK = types.void(types.uint16[::1], types.uint64[::1], types.uint16[::1], types.uint64[::1],
                    types.float32[::1], types.int64, types.int64)


def _run_qk(N):
    from test_wgmma import _fragments  # noqa: PLC0415
    rng = np.random.default_rng(N)
    q = rng.standard_normal((64, 64)).astype(np.float16)
    kk = rng.standard_normal((N, 64)).astype(np.float16)
    qd, kd, out = _arrays(q.view(np.uint16).reshape(-1), kk.view(np.uint16).reshape(-1),
                          np.zeros(128 * (N // 2), np.float32))
    qmap, kmap = _tmap(qd, 64, 64), _tmap(kd, N, N)
    kern = _qk_kernel(N)
    (cuda.jit(SIG_QK)(kern) if nbflash.MODE == "gpu" else cuda.jit(kern))[1, 128](
        qd, qmap, kd, kmap, out, 64, N)
    want = _fragments(q.astype(np.float64) @ kk.astype(np.float64).T)
    np.testing.assert_allclose(_host(out).reshape(128, N // 2), want, rtol=1e-5, atol=1e-4)


def test_tma_boxes_refuse_other_layouts():
    with pytest.raises(ValueError, match="64 16-bit columns"):
        M.make_tma_load_2d(64, 32)
    with pytest.raises(ValueError, match="64 16-bit columns"):
        M.make_tma_load_2d(64, 64, swizzle=0)


@pytest.mark.skipif(nbflash.MODE != "sim", reason="the simulator's emulation")
@pytest.mark.parametrize("n_rows,rows,row0", [(40, 16, 0), (40, 16, 32)])
def test_tma_box_emulation(n_rows, rows, row0):
    _run_box(n_rows, rows, row0)


@pytest.mark.skipif(nbflash.MODE != "sim", reason="the simulator's emulation")
def test_tma_then_wgmma_emulation():
    _run_qk(16)


def _needs_sm90():
    if cuda.get_current_device().compute_capability < (9, 0):
        pytest.skip("TMA needs sm_90")


@pytest.mark.gpu
@pytest.mark.skipif(nbflash.MODE != "gpu", reason="needs an sm_90 GPU")
@pytest.mark.parametrize("n_rows,rows,row0", [(256, 64, 0), (100, 64, 64), (300, 128, 256)])
def test_tma_box_on_the_gpu(n_rows, rows, row0):
    _needs_sm90()
    _run_box(n_rows, rows, row0)


@pytest.mark.gpu
@pytest.mark.skipif(nbflash.MODE != "gpu", reason="needs an sm_90 GPU")
@pytest.mark.parametrize("N", [64, 128])
def test_tma_then_wgmma_on_the_gpu(N):
    _needs_sm90()
    _run_qk(N)


COMPILE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from nbflash._cuda import cuda
from nbflash.devtools.compilecheck import _link
import test_tma as t
out = []
for kind, n in json.loads(sys.argv[2]):
    k, sig = (t._box_kernel(n), t.SIG_BOX) if kind == "box" else (t._qk_kernel(n), t.SIG_QK)
    ptx, _ = cuda.compile_ptx(k, sig, cc=(9, 0, "a"))
    out.append({"case": [kind, n], "log": _link(ptx, "sm_90a"),
                "tma": ptx.count("cp.async.bulk.tensor.2d"), "wgmma": ptx.count("wgmma.mma_async")})
print(json.dumps(out))
"""


def test_tma_compiles_for_sm90a():
    """The kernels above for sm_90a without a GPU: the TMA loads and wgmma in the PTX, the link
    clean (no serialisation warning, no spills or stack)."""
    env = {**os.environ, "NBFLASH_DEVICE": "compile"}
    r = subprocess.run([sys.executable, "-c", COMPILE, os.path.dirname(__file__),
                        json.dumps([["box", 64], ["qk", 128]])], capture_output=True, text=True,
                       env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    for got in json.loads(r.stdout.strip().splitlines()[-1]):
        kind, _ = got["case"]
        assert got["tma"] == (1 if kind == "box" else 2), got["case"]
        assert got["wgmma"] == (0 if kind == "box" else 4), got["case"]
        log = got["log"]
        assert "C751" not in log and "serializ" not in log.lower(), log
        for what in ("bytes stack frame", "bytes spill stores", "bytes spill loads"):
            m = re.search(r"(\d+) " + what, log)
            assert m is None or m.group(1) == "0", f"{got['case']}: {what}: {log}"
