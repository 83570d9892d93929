"""Synchronisation below the block (nbflash.kernels.common.groups), for warp-specialised fa3:
two warpgroups of one block that run different code meet only on named barriers of their own;
quad reductions; one elected lane per warp; setmaxnreg compiled for sm_90a."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import nbflash
from nbflash._cuda import cuda
from nbflash.kernels.common import groups as G

pytestmark = pytest.mark.skipif(nbflash.MODE == "compile", reason="runs kernels")


def _kernel():
    """256 threads: warpgroup 0 writes a value per thread and meets warpgroup 1's threads on
    barrier 1 (256 threads); warpgroup 1 reads it; each warpgroup then sums over quads and
    meets on its own barrier (2, 3; 128 threads each) only. elect_one marks one lane per warp."""
    quad_max, quad_sum = G.make_quad_reduce()

    def k(vals, got, maxes, sums, elected):
        tid = cuda.threadIdx.x
        buf = cuda.shared.array(128, np.float32)
        if tid < 128:            # warpgroup 0: the producer
            buf[tid] = vals[tid]
            G.named_barrier(1, 256)
            G.named_barrier(2, 128)
        else:                    # warpgroup 1: the consumer
            G.named_barrier(1, 256)
            got[tid - 128] = buf[tid - 128]
            G.named_barrier(3, 128)
        x = vals[tid]
        maxes[tid] = quad_max(x, tid)
        sums[tid] = quad_sum(x, tid)
        elected[tid] = G.elect_one()

    return k


def test_warpgroups_meet_on_their_own_barriers():
    rng = np.random.default_rng(0)
    vals = rng.standard_normal(256).astype(np.float32)
    outs = [np.zeros(128, np.float32), np.zeros(256, np.float32), np.zeros(256, np.float32),
            np.zeros(256, np.uint32)]
    args = [vals, *outs]
    if nbflash.MODE == "gpu":
        import cupy  # noqa: PLC0415
        args = [cupy.asarray(a) for a in args]
    cuda.jit(_kernel())[1, 256](*args)
    got, maxes, sums, elected = (a.get() if hasattr(a, "get") else a for a in args[1:])
    np.testing.assert_array_equal(got, vals[:128])
    quads = vals.reshape(64, 4)
    np.testing.assert_array_equal(maxes, np.repeat(quads.max(1), 4))
    f = np.float32
    want = (f(quads[:, 0] + quads[:, 1]) + f(quads[:, 2] + quads[:, 3])).astype(f)
    np.testing.assert_allclose(sums, np.repeat(want, 4), rtol=1e-6)
    assert elected.reshape(8, 32).sum(1).tolist() == [1] * 8


def test_setmaxnreg_refuses_bad_counts():
    with pytest.raises(ValueError, match="24 to 256"):
        G.make_setmaxnreg(20, False)
    with pytest.raises(ValueError, match="multiple of 8"):
        G.make_setmaxnreg(100, True)


COMPILE = r"""
import json
from nbflash._cuda import cuda          # (first: it picks numba-cuda's mode)
from numba import types
from nbflash.devtools.compilecheck import _link
from nbflash.kernels.common import groups as G
dec, inc = G.make_setmaxnreg(40, False), G.make_setmaxnreg(232, True)

def k(out):
    wg = cuda.threadIdx.x // 128
    if wg == 0:
        dec()
        if G.elect_one():
            out[0] = 1.0
        G.named_barrier(1, 384)
    else:
        inc()
        G.named_barrier(1, 384)
        out[cuda.threadIdx.x] = 2.0

ptx, _ = cuda.compile_ptx(k, types.void(types.float32[::1]), cc=(9, 0, "a"),
                          launch_bounds=(384, 1))
print(json.dumps({"log": _link(ptx, "sm_90a"), "ptx": [l.strip() for l in ptx.splitlines()
                  if "setmaxnreg" in l or "elect" in l or "bar.sync" in l]}))
"""


def test_setmaxnreg_and_named_barriers_compile_for_sm90a():
    env = {**os.environ, "NBFLASH_DEVICE": "compile"}
    r = subprocess.run([sys.executable, "-c", COMPILE], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    text = " ".join(got["ptx"])
    for want in ("setmaxnreg.dec.sync.aligned.u32 40", "setmaxnreg.inc.sync.aligned.u32 232",
                 "elect.sync", "bar.sync"):
        assert want in text, (want, got["ptx"])
    m = re.search(r"(\d+) bytes spill stores", got["log"])
    assert m is None or m.group(1) == "0", got["log"]
