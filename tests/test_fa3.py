"""fa3's first forward (nbflash.kernels.fa3: wgmma and TMA on Hopper) against the float64
reference under the tolerance rule: in the simulator through the building blocks' emulations
(nbflash.kernels.common.wgmma, .tma) with 16-key tiles, so that small ragged shapes span
several tiles, stages and their barriers' phases; on an sm_90 GPU with the real instructions
and tiles (marked gpu; not run yet); compiled for sm_90a without a GPU (no local memory, no
wgmma serialisation)."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import nbflash
from nbflash import bfloat16
from nbflash.kernels.fa3 import plan as fa3_plan, tiles as fa3_tiles
from support import allowed, errors, host, make_inputs, naive_bf16, reference, run, xp

pytestmark = pytest.mark.skipif(nbflash.MODE == "compile", reason="runs kernels")


def _stream():
    if nbflash.MODE == "gpu":
        import cupy  # noqa: PLC0415
        return cupy.cuda.get_current_stream().ptr
    return 0


def check(B, H, Nq, Nk, d, causal, bf16=False, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v, do = make_inputs(rng, B, H, Nq, Nk, d, np.float16)
    scale = d ** -0.5
    if bf16:   # bfloat16 bits of the same values' bfloat16 roundings
        f = [bfloat16.values(bfloat16.bits(host(x).astype(np.float32))) for x in (q, k, v, do)]
        ins = [xp.asarray(bfloat16.bits(x)) for x in f[:3]]
        ref = reference(*(xp.asarray(x) for x in f), causal)
        base = naive_bf16(*f, causal, scale)
    else:
        ins = [q, k, v]
        ref = reference(q, k, v, do, causal)
        base = run("naive", q, k, v, do, causal)
    plan = fa3_plan.plan_for(B, H, Nq, Nk, d, "bfloat16" if bf16 else "float16", causal, scale)
    o, lse = plan.forward(xp, *ins, _stream())
    o = host(o)
    o = bfloat16.values(o) if bf16 else o
    got = {"o": o, "lse": host(lse)}
    dtype = "bfloat16" if bf16 else np.float16
    for name in ("o", "lse"):
        err, _ = errors(got[name], ref[name])
        nerr, _ = errors(base[name], ref[name])
        tol = allowed(name, nerr, ref[name], np.float32 if name == "lse" else dtype)
        assert err <= tol, f"fa3 {name} Nq={Nq} Nk={Nk} d={d} causal={causal}: max err " \
                           f"{err:.3g} > allowed {tol:.3g} (naive {nerr:.3g})"
    if causal and Nq > Nk:   # rows that see no key
        assert np.all(got["o"][:, :, :Nq - Nk] == 0)
        assert np.all(np.isneginf(got["lse"][:, :, :Nq - Nk]))


@pytest.mark.skipif(nbflash.MODE != "sim", reason="the simulator's sizes")
@pytest.mark.parametrize("Nq,Nk,causal,bf16", [(37, 53, True, False), (53, 37, False, False),
                                               (20, 45, False, True), (70, 19, True, False)])
def test_fa3_forward_matches_reference(Nq, Nk, causal, bf16):
    check(1, 2, Nq, Nk, 64, causal, bf16)


def test_fa3_tiles_refuse_what_they_cannot_hold():
    with pytest.raises(ValueError, match="head dims"):
        fa3_tiles.Fa3Tiles(80, 64)
    with pytest.raises(ValueError, match="cols"):
        fa3_tiles.Fa3Tiles(64, 24)
    with pytest.raises(ValueError, match="softmax_scale > 0"):
        fa3_plan.Fa3Plan(1, 1, 8, 8, 64, "float16", False, -0.1)


@pytest.mark.gpu
@pytest.mark.skipif(nbflash.MODE != "gpu", reason="needs an sm_90 GPU")
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("Nq,Nk", [(1000, 1000), (1023, 1100), (300, 129)])
def test_fa3_forward_on_the_gpu(Nq, Nk, d, causal):
    from nbflash._cuda import cuda  # noqa: PLC0415
    if cuda.get_current_device().compute_capability < (9, 0):
        pytest.skip("fa3 needs sm_90")
    check(2, 3, Nq, Nk, d, causal)
    if d == 128:
        check(1, 2, Nq, Nk, d, causal, bf16=True)


COMPILE = r"""
import json, sys
from nbflash._cuda import cuda          # (first: it picks numba-cuda's mode)
from numba import types
from nbflash.devtools.compilecheck import _link
from nbflash.kernels.fa3 import plan, tiles
out = []
for d, causal in json.loads(sys.argv[1]):
    t = tiles.tiles("forward", d)
    s = plan.spec("forward", t, causal, "float16")
    ptx, _ = cuda.compile_ptx(s.fn, types.void(*s.argtypes), cc=(9, 0, "a"),
                              launch_bounds=s.launch_bounds)
    out.append({"case": [d, causal], "log": _link(ptx, "sm_90a"),
                "wgmma": ptx.count("wgmma.mma_async"), "tma": ptx.count("cp.async.bulk.tensor")})
print(json.dumps(out))
"""


def test_fa3_compiles_for_sm90a():
    """The GPU tiles' forward for sm_90a without a GPU: wgmma and TMA in the PTX, the link
    clean: no wgmma serialisation warning, no spills, no stack."""
    env = {**os.environ, "NBFLASH_DEVICE": "compile"}
    cases = [[64, False], [128, True], [256, False]]
    r = subprocess.run([sys.executable, "-c", COMPILE, json.dumps(cases)], capture_output=True,
                       text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    for got in json.loads(r.stdout.strip().splitlines()[-1]):
        log = got["log"]
        assert got["wgmma"] > 0 and got["tma"] > 0, got["case"]
        assert "C751" not in log and "serializ" not in log.lower(), log
        for what in ("bytes stack frame", "bytes spill stores", "bytes spill loads"):
            m = re.search(r"(\d+) " + what, log)
            assert m is None or m.group(1) == "0", f"{got['case']}: {what}: {log}"
