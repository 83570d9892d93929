"""Hopper's wgmma from Numba (nbflash.kernels.common.wgmma), the first building block of fa3:
the shared-memory layouts' arithmetic on the host, one warpgroup's 64 x N x K product against
NumPy (in the simulator through the module's emulation; on an sm_90 GPU through the real
instruction, which is what checks the descriptors' bits), and the compile for sm_90a without a
GPU (nvJitLink; no wgmma serialisation warning, no local memory)."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from numba import float32, types, uint16, uint32

import nbflash
from nbflash._cuda import cuda
from nbflash.bfloat16 import bits as bf16_bits, values as bf16_values
from nbflash.kernels.common import wgmma as W


@pytest.mark.parametrize("rows,cols,swizzle", [(64, 64, 128), (24, 128, 128), (64, 16, 0),
                                               (16, 48, 0)])
def test_layout_is_a_bijection_onto_the_tile(rows, cols, swizzle):
    lay = W.KMajor(rows, cols, swizzle)
    offs = {lay.offset(r, k) for r in range(rows) for k in range(cols)}
    assert offs == set(range(rows * cols))


@pytest.mark.parametrize("layout", [W.KMajor(64, 128, 128), W.KMajor(24, 32, 0),
                                    W.MNMajor(32, 128, 128), W.MNMajor(16, 24, 0)],
                         ids=["K128", "K0", "MN128", "MN0"])
def test_device_offsets_are_the_layouts(layout):
    """make_offset's integer formula (what kernels fill tiles with) is the layout's offset."""
    f = W.offset_formula(layout)
    mn_extent, k_extent = (layout.rows, layout.cols) if not layout.trans else \
        (layout.cols, layout.rows)
    for mn in range(mn_extent):
        for k in range(k_extent):
            assert f(mn, k) == layout.offset(mn, k), (mn, k)


def test_swizzle_128_is_the_chunk_xor_row_rule():
    """The address-bit form of the 128-byte swizzle (bits 4-6 XOR bits 7-9, as the hardware
    applies it to a 1024-byte-aligned tile) puts row r's 16-byte chunk c at chunk c ^ (r % 8)
    of its 128-byte row, atoms of 8 rows 1024 bytes apart, K's 64-element atoms rows·128 bytes
    apart: the rule written the other way round."""
    lay = W.KMajor(32, 128, 128)
    for r in range(32):
        for k in range(128):
            c = (k % 64) // 8
            want = ((k // 64) * 32 * 128 + (r // 8) * 1024 + (r % 8) * 128
                    + 16 * (c ^ (r % 8)) + 2 * (k % 8)) // 2
            assert lay.offset(r, k) == want, (r, k)


def test_no_swizzle_core_matrices():
    """swizzle 0: each 8 x 8 core matrix is 128 contiguous bytes, row-major inside."""
    lay = W.KMajor(16, 32, 0)
    for r in range(16):
        for k in range(32):
            core = (k // 8) * 2 + r // 8
            assert lay.offset(r, k) == core * 64 + (r % 8) * 8 + k % 8


def test_layouts_refuse_what_they_cannot_hold():
    with pytest.raises(ValueError, match="multiple of 64"):
        W.KMajor(64, 32, 128)
    with pytest.raises(ValueError, match="0 or 128"):
        W.KMajor(64, 64, 64)
    with pytest.raises(ValueError, match="multiple of 8"):
        W.make_wgmma(12, False, W.KMajor(64, 64), W.KMajor(16, 64))


def _kernel(N, K, bf16, swizzle, b_major="K", a_regs=False):
    """One warpgroup: D = A Bᵀ (A 64 x K, B N x K) by K/16 wgmma, each thread's fragment out.
    B from its layout image (K- or MN-major) into a 1024-byte-aligned shared tile; A likewise
    (K-major), or with a_regs from a plain row-major array into each thread's A fragments."""
    # (A with the 128-byte swizzle where K allows it, unswizzled otherwise)
    la = W.KMajor(64, K, 128 if K % 64 == 0 else 0) if not a_regs else \
        W.KMajor(64, 16, 0)
    lb = W.KMajor(N, K, swizzle) if b_major == "K" else W.MNMajor(K, N, swizzle)
    R = N // 2
    b_off = -(-la.elements // 512) * 512 if not a_regs else 0   # B 1024-byte aligned
    size = b_off + lb.elements + 512              # (+ the alignment of the base)
    A_ELEMENTS, B_ELEMENTS = la.elements, lb.elements
    if a_regs:
        mma = W.make_wgmma_rs(N, bf16, lb, 128)
    else:
        mma = W.make_wgmma(N, bf16, la, lb)
    wait, fence_acc = W.make_wait(0), W.make_fence_acc(R)
    A_REGS = bool(a_regs)
    NA = 4 * (K // 16)
    sixteen = uint32(16)

    def k(a_src, b_img, out):
        smem = cuda.shared.array(size, uint16)
        tid = cuda.threadIdx.x
        base = W.aligned_start(smem)
        if not A_REGS:
            for i in range(tid, A_ELEMENTS, 128):
                smem[base + i] = a_src[i]
        for i in range(tid, B_ELEMENTS, 128):
            smem[base + b_off + i] = b_img[i]
        W.fence_proxy_async()
        cuda.syncthreads()
        acc = cuda.local.array(R, float32)
        for x in range(R):
            acc[x] = float32(0.0)
        # A's fragment words, every k-step's before the wgmma run (registers that change between
        # two wgmma of a run make ptxas wait for the first): pairs (row, col) as
        # mma.m16n8k16 takes them
        af = cuda.local.array(NA, uint32)
        if A_REGS:
            r0 = 16 * (tid // 32) + tid % 32 // 4
            for kk in range(K // 16):
                c = 16 * kk + 2 * (tid % 4)
                for q in range(4):
                    at = (r0 + 8 * (q % 2)) * K + c + 8 * (q // 2)
                    af[4 * kk + q] = uint32(a_src[at]) | (uint32(a_src[at + 1]) << sixteen)
        W.fence()
        for kk in range(K // 16):
            if A_REGS:
                mma(acc, 0, af[4 * kk], af[4 * kk + 1], af[4 * kk + 2], af[4 * kk + 3], smem,
                    base + b_off, 16 * kk, 1 if kk else 0)
            else:
                mma(acc, 0, smem, base, base + b_off, 16 * kk, 1 if kk else 0)
        W.commit()
        wait()
        fence_acc(acc, 0)
        for x in range(R):
            out[tid * R + x] = acc[x]

    return k, la, lb


SIG = types.void(types.uint16[::1], types.uint16[::1], types.float32[::1])


def _fragments(D):
    """D (64 x N) as the warpgroup's fragments: out[t, 4j + 2h + e] = D[16w + g + 8h,
    8j + 2(t % 4) + e]."""
    N = D.shape[1]
    out = np.zeros((128, N // 2))
    for t in range(128):
        w, g, t4 = t // 32, t % 32 // 4, t % 4
        for j in range(N // 8):
            for h in range(2):
                for e in range(2):
                    out[t, 4 * j + 2 * h + e] = D[16 * w + g + 8 * h, 8 * j + 2 * t4 + e]
    return out


def _run(N, K, bf16, swizzle, b_major="K", a_regs=False):
    rng = np.random.default_rng(N + K)
    A, B = rng.standard_normal((64, K)), rng.standard_normal((N, K))
    if bf16:
        a_bits, b_bits = bf16_bits(A), bf16_bits(B)
        A, B = bf16_values(a_bits).astype(np.float64), bf16_values(b_bits).astype(np.float64)
    else:
        A, B = A.astype(np.float16), B.astype(np.float16)
        a_bits, b_bits = A.view(np.uint16), B.view(np.uint16)
        A, B = A.astype(np.float64), B.astype(np.float64)
    k, la, lb = _kernel(N, K, bf16, swizzle, b_major, a_regs)
    a_in = np.ascontiguousarray(a_bits).reshape(-1) if a_regs else la.host_image(a_bits)
    b_img = lb.host_image(b_bits)
    out = np.zeros(128 * (N // 2), np.float32)
    if nbflash.MODE == "gpu":
        import cupy  # noqa: PLC0415
        args = [cupy.asarray(x) for x in (a_in, b_img, out)]
        cuda.jit(SIG)(k)[1, 128](*args)   # (numba-cuda picks sm_90a on an sm_90 device)
        out = args[2].get()
    else:
        cuda.jit(k)[1, 128](a_in, b_img, out)
    want = _fragments(A @ B.T)
    np.testing.assert_allclose(out.reshape(128, N // 2), want, rtol=1e-5, atol=1e-4)


# (N, K, bf16, swizzle, B's major dim, A from registers)
SIM_CASES = [(16, 64, False, 128, "K", False), (8, 32, True, 0, "K", False),
             (64, 16, False, 128, "MN", True), (16, 32, True, 0, "MN", False)]
GPU_CASES = [(64, 64, False, 128, "K", False), (64, 64, True, 128, "K", False),
             (128, 64, False, 128, "K", False), (256, 64, False, 128, "K", False),
             (64, 32, False, 0, "K", False), (24, 64, True, 128, "K", False),
             (64, 64, False, 128, "K", True), (128, 64, True, 128, "MN", True),
             (64, 32, False, 128, "MN", False), (64, 32, False, 0, "MN", True),
             (24, 32, True, 0, "MN", True)]


@pytest.mark.skipif(nbflash.MODE != "sim", reason="the simulator's emulation")
@pytest.mark.parametrize("N,K,bf16,swizzle,b_major,a_regs", SIM_CASES)
def test_wgmma_emulation_matches_numpy(N, K, bf16, swizzle, b_major, a_regs):
    _run(N, K, bf16, swizzle, b_major, a_regs)


@pytest.mark.gpu
@pytest.mark.skipif(nbflash.MODE != "gpu", reason="needs an sm_90 GPU")
@pytest.mark.parametrize("N,K,bf16,swizzle,b_major,a_regs", GPU_CASES)
def test_wgmma_on_the_gpu_matches_numpy(N, K, bf16, swizzle, b_major, a_regs):
    if cuda.get_current_device().compute_capability < (9, 0):
        pytest.skip("wgmma needs sm_90")
    _run(N, K, bf16, swizzle, b_major, a_regs)


COMPILE = r"""
import json, re, sys
sys.path.insert(0, sys.argv[1])
from nbflash._cuda import cuda
from nbflash.devtools.compilecheck import _link
import test_wgmma as t
out = []
for N, K, bf16, swizzle, b_major, a_regs in json.loads(sys.argv[2]):
    k, _, _ = t._kernel(N, K, bf16, swizzle, b_major, a_regs)
    ptx, _ = cuda.compile_ptx(k, t.SIG, cc=(9, 0, "a"))
    out.append({"case": [N, K, bf16, swizzle, b_major, a_regs], "log": _link(ptx, "sm_90a"),
                "wgmma": ptx.count(f"wgmma.mma_async.sync.aligned.m64n{N}k16")})
print(json.dumps(out))
"""


def test_wgmma_compiles_for_sm90a_without_serialisation():
    """The kernels above for sm_90a without a GPU (NVVM, then nvJitLink's ptxas): one wgmma
    per k-step in the PTX, no warning that ptxas serialised the wgmma pipeline (C7510-C7515),
    no spills or stack."""
    cases = [(64, 64, False, 128, "K", False), (256, 64, True, 128, "K", False),
             (24, 32, False, 0, "K", False), (128, 64, True, 128, "MN", True),
             (64, 32, False, 0, "MN", False)]
    env = {**os.environ, "NBFLASH_DEVICE": "compile"}
    r = subprocess.run([sys.executable, "-c", COMPILE, os.path.dirname(__file__),
                        json.dumps(cases)], capture_output=True, text=True, env=env,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    for got in json.loads(r.stdout.strip().splitlines()[-1]):
        N, K = got["case"][:2]
        log = got["log"]
        assert got["wgmma"] == K // 16, got
        assert "C751" not in log and "serializ" not in log.lower(), log
        for what in ("bytes stack frame", "bytes spill stores", "bytes spill loads"):
            m = re.search(r"(\d+) " + what, log)
            assert m is None or m.group(1) == "0", f"{got['case']}: {what}: {log}"
