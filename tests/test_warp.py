"""The tensor-core primitives (nbflash.kernels.common.warp) on one tile, against NumPy.

The same tests run on the GPU (the inline-PTX intrinsics) and in the simulator (their
shared-memory versions), so the simulator's tc kernel tests rest on primitives checked against
the hardware. A compile-only test (CI) checks that the intrinsics emit the PTX instructions; the
SASS check runs on the GPU.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from nbflash import MODE, bfloat16
from nbflash._cuda import cuda
from nbflash.kernels.common import primitives, warp

from support import host, xp

pytestmark = pytest.mark.skipif(MODE == "compile", reason="runs kernels")


def _bits(x, bf16):
    return bfloat16.bits(x) if bf16 else x.astype(np.float16).view(np.uint16)


def _values(bits, bf16):
    return bfloat16.values(bits) if bf16 else bits.view(np.float16).astype(np.float32)


def make_tile_kernel(bf16, trans):
    """One warp: D (16 x 16, float32) = A (16 x 16) @ B + C, where B is given as Bᵀ (16 x 16,
    rows = columns of B) and read with ldmatrix (trans False), or as B itself (rows = k) read
    with ldmatrix.trans; A by ldmatrix; C from `out`. Stride 24 elements: padded rows, as the
    kernels use."""
    ldsm, ldsm_t, mma, _, _ = warp.make_warp_ops(32, bf16)
    S = 24
    N = 16 * S

    def tile(a, b, out):
        sa = cuda.shared.array(N, np.uint16)
        sb = cuda.shared.array(N, np.uint16)
        lane = cuda.threadIdx.x
        for e in range(lane, 256, 32):
            sa[(e // 16) * S + e % 16] = a[e]
            sb[(e // 16) * S + e % 16] = b[e]
        cuda.syncthreads()
        mi = lane // 8
        a0, a1, a2, a3 = ldsm(sa, (lane % 8 + 8 * (mi % 2)) * S + 8 * (mi // 2))
        if trans:    # b holds B (k rows): matrices (k 0-7, n 0-7), (k 8-15, n 0-7), ...
            b0, b1, b2, b3 = ldsm_t(sb, (lane % 8 + 8 * (mi % 2)) * S + 8 * (mi // 2))
        else:        # b holds Bᵀ (n rows): matrices (n 0-7, k 0-7), (n 0-7, k 8-15), ...
            b0, b1, b2, b3 = ldsm(sb, (lane % 8 + 8 * (mi // 2)) * S + 8 * (mi % 2))
        g, t = lane // 4, lane % 4
        c = cuda.local.array(8, np.float32)
        for x in range(8):
            c[x] = out[(g + 8 * ((x // 2) % 2)) * 16 + 8 * (x // 4) + 2 * t + x % 2]
        c[0], c[1], c[2], c[3] = mma(a0, a1, a2, a3, b0, b1, c[0], c[1], c[2], c[3])
        c[4], c[5], c[6], c[7] = mma(a0, a1, a2, a3, b2, b3, c[4], c[5], c[6], c[7])
        for x in range(8):
            out[(g + 8 * ((x // 2) % 2)) * 16 + 8 * (x // 4) + 2 * t + x % 2] = c[x]

    return cuda.jit(tile)


@pytest.mark.parametrize("bf16", [False, True], ids=["f16", "bf16"])
@pytest.mark.parametrize("trans", [False, True], ids=["ldsm", "ldsm_trans"])
def test_ldmatrix_mma_tile_matches_numpy(bf16, trans):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((16, 16)).astype(np.float32)
    b = rng.standard_normal((16, 16)).astype(np.float32)      # B: k x n
    c = rng.standard_normal((16, 16)).astype(np.float32)
    a_bits, b_bits = _bits(a, bf16), _bits(b if trans else b.T, bf16)
    ref = (_values(a_bits, bf16).astype(np.float64)
           @ _values(_bits(b, bf16), bf16).astype(np.float64) + c)
    out = xp.asarray(c.reshape(-1))
    make_tile_kernel(bf16, trans)[1, 32](xp.asarray(a_bits.reshape(-1)),
                                         xp.asarray(np.ascontiguousarray(b_bits).reshape(-1)), out)
    got = host(out).reshape(16, 16)
    err = np.abs(got - ref).max()
    print(f"max |D - ref| = {err:.3g}")
    assert err < 1e-5 * max(1.0, np.abs(ref).max())


def make_pack_kernel(bf16):
    _, _, _, pack, to_f32 = warp.make_warp_ops(32, bf16)

    def k(x, packed, back):
        i = cuda.threadIdx.x
        word = pack(x[2 * i], x[2 * i + 1])
        packed[i] = word
        lo, hi = warp.split16(word)
        back[2 * i] = to_f32(lo)
        back[2 * i + 1] = to_f32(hi)

    return cuda.jit(k)


@pytest.mark.parametrize("bf16", [False, True], ids=["f16", "bf16"])
def test_pack_rounds_to_nearest_even_like_numpy(bf16):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(64) * np.logspace(-3, 3, 64)).astype(np.float32)
    x[:4] = (0.0, -0.0, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11)    # ties of float16
    if bf16:
        x[4:6] = (1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8)             # ties of bfloat16
    packed, back = xp.zeros(32, np.uint32), xp.zeros(64, np.float32)
    make_pack_kernel(bf16)[1, 32](xp.asarray(x), packed, back)
    want = _bits(x, bf16)
    got = host(packed).view(np.uint16)      # little-endian: low half first
    assert np.array_equal(got, want), np.nonzero(got != want)
    assert np.array_equal(host(back), _values(want, bf16))


def make_copy_kernel(n):
    wait = primitives.make_wait_async(0)

    def k(src, dst, nbytes_of_second):
        s = cuda.shared.array(n, np.uint16)
        i = cuda.threadIdx.x
        if i < n // 8:
            primitives.copy16_async(s, 8 * i, src, 8 * i, 16 if i != 1 else nbytes_of_second)
        primitives.commit_async()
        wait()
        cuda.syncthreads()
        for e in range(i, n, 32):
            dst[e] = s[e]

    return cuda.jit(k)


def test_copy16_async_moves_16_bit_elements_and_zero_fills():
    src = np.arange(1, 65, dtype=np.uint16)
    dst = xp.zeros(64, np.uint16)
    make_copy_kernel(64)[1, 32](xp.asarray(src), dst, 0)
    want = src.copy()
    want[8:16] = 0
    assert np.array_equal(host(dst), want)


PTX_SCRIPT = r"""
import json
from nbflash._cuda import cuda   # first: it sets the device mode before numba reads it
from numba import types
import test_warp as t
out = {}
u16 = types.Array(types.uint16, 1, "C")
f32 = types.Array(types.float32, 1, "C")
for bf16 in (False, True):
    for trans in (False, True):
        k = t.make_tile_kernel(bf16, trans)
        out[f"tile {bf16} {trans}"] = cuda.compile_ptx(k.py_func, types.void(u16, u16, f32),
                                                     cc=(9, 0))[0]
    k = t.make_pack_kernel(bf16)
    out[f"pack {bf16}"] = cuda.compile_ptx(
        k.py_func, types.void(f32, types.Array(types.uint32, 1, "C"), f32), cc=(9, 0))[0]
k = t.make_copy_kernel(64)
out["copy"] = cuda.compile_ptx(k.py_func, types.void(u16, u16, types.int64), cc=(9, 0))[0]
print(json.dumps(out))
"""


def test_intrinsics_emit_the_ptx_instructions():
    """Compile-only (runs in CI without a GPU): the PTX of the test kernels holds the
    instructions each primitive stands for."""
    env = {**os.environ, "NBFLASH_DEVICE": "compile",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__),
                                          os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", PTX_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    ptx = json.loads(done.stdout.strip().splitlines()[-1])
    for bf16, kind in ((False, "f16"), (True, "bf16")):
        for trans in (False, True):
            text = ptx[f"tile {bf16} {trans}"]
            assert f"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32" in text
            assert "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in text
            assert ("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16" in text) == trans
        assert f"cvt.rn.{kind}x2.f32" in ptx[f"pack {bf16}"]
    assert "cp.async.cg.shared.global" in ptx["copy"]
    assert "cp.async.commit_group" in ptx["copy"] and "cp.async.wait_group 0" in ptx["copy"]
