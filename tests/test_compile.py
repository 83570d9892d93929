"""Compile-only: every fa1 variant the tests use, fa2 with the simulator's tiles, and the GPU's
default tiles of every registered kernel family (nbflash.devtools.compilecheck.variants: as the
benchmark runs them, tc in float16 only; fa1 and fa2 also with dropout, key padding and a block
mask; the simulator's fa2 and tc also with softcap, window and ALiBi), compiled for
sm_90 without a GPU (NVVM -> PTX -> nvJitLink), with the compiler's resource report checked: no
stack frame, no spills, no local memory, exactly the static shared memory fa1's shared-memory
plan counts (fa2, tc: none; their dynamic shared memory within what an sm_90 block may opt in
to).

Runs in a subprocess because the device mode (simulator or real target) is fixed at import.
"""

import json
import re
import os
import subprocess
import sys

import pytest

from nbflash.kernels.fa1 import tiles as fa1_tiles
from nbflash.kernels.fa2 import tiles as fa2_tiles
from nbflash.kernels.tc import tiles as tc_tiles

# (M, d, rule, causal, dtype) of the kernels tests/test_attention.py builds in the simulator;
# M None is the default M of each pass
SIM_CASES = sorted({
    *[(128, 8, "paper", c, t) for c in (False, True) for t in ("float32", "float16")],
    *[(12 * d, d, "paper", c, "float32") for d in (1, 3, 24, 40) for c in (False, True)],
    (64, 4, "paper", True, "float16"),
    (64, 4, "paper", True, "float32"),
    *[(128, 4, r, True, "float32") for r in ("paper", "seed")],
    (None, 16, "paper", False, "float32"),   # default tiles; also `nbflash check` in the sim
    (None, 4, "paper", True, "float32"),     # tests/test_cli.py runs check --d 4 --causal
    (200, 2, "seed", False, "float32"),      # more rows per tile than threads
    (200, 2, "seed", True, "float32"),
}, key=str)

# the tiles a GPU run uses by default, and the extra head dims of the GPU tests
GPU_HEAD_DIMS = (64, 80, 96, 128, 256)

SCRIPT = r"""
import json, sys
from nbflash.devtools import compilecheck as cc
from nbflash.kernels.fa1 import tiles as fa1_tiles
from nbflash.kernels.tc import tiles as tc_tiles
from nbflash.kernels.fa2 import plan as fa2_plan, tiles as fa2_tiles
from nbflash.kernels.common.options import Features
CAP_WINDOW = Features(softcap=True, window=True, alibi=True)   # the softcap's, window's, ALiBi's
cases, head_dims, family = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
variants = []
for M, d, rule, causal, dtype in cases:
    for kernel in ("forward", "backward"):
        m = M if M is not None else fa1_tiles.default_M(d, kernel, rule)
        tiles = fa1_tiles.tiles_for(m, d, rule, fa1_tiles.SIM_THREADS)
        variants.append(cc.Variant("fa1", kernel, tiles, causal, dtype))
if head_dims and family == "fa2":   # fa2's GPU kernels as benchmarked, and with
    # dropout, key padding and a block mask (causal: the most masking code)
    # (float16 causal only beside float32's both: on 2026-12-02 float16's non-causal kernels
    # had no stack or spills at 168-254 registers, as their causal ones)
    variants += cc.variants(["fa2"], (64, 128), dtypes=("float32",))
    variants += cc.variants(["fa2"], (64, 128), dtypes=("float16",), causal=(True,))
    variants += cc.variants(["fa2"], (256,), dtypes=("float32",), causal=(True,))  # (untuned)
    # (in float32 only: float16's reports had the same stack and spills, registers within 2,
    # at each of these in CI's compile on 2026-12-02)
    variants += cc.variants(["fa2"], (64, 128), causal=(True,), features=cc.ALL_OPTIONS,
                            dtypes=("float32",))
elif head_dims:   # tc's (float16: bfloat16's kernels differ in their conversions alone, and
    # their reports were the same as float16's at every GPU tile on 2026-12-01) and
    # fa1's, fa1 at more head dims; tc's take local memory with options (docs/tensor-cores.md)
    variants += cc.variants(["tc"], (64, 128), dtypes=("float16",))
    variants += cc.variants(["fa1"], (64, 128))
    variants += cc.variants(["fa1"], tuple(d for d in head_dims if d not in (64, 128)))
    variants += cc.variants(["fa1"], (64,), dtypes=("float16",), causal=(True,),
                            features=cc.ALL_OPTIONS)
else:
    for kind in fa2_plan.KERNELS:   # (d = 40: the simulator's tiles; causal, whose code holds
        t = fa2_tiles.tiles(kind, 40, fa2_tiles.SIM_TILES)   # the non-causal kernel's)
        variants.append(cc.Variant("fa2", kind, t, True, "float32"))
        variants.append(cc.Variant("fa2", kind, t, True, "float16", cc.ALL_OPTIONS))
        variants.append(cc.Variant("fa2", kind, t, False, "float32", CAP_WINDOW))
    for kind in ("forward", "dkdv", "dq"):
        t = tc_tiles.tiles(kind, 32, tc_tiles.SIM_TILES)
        variants.append(cc.Variant("tc", kind, t, False, "float16", CAP_WINDOW))
    for kernel in ("forward", "backward"):
        tiles = fa1_tiles.tiles_for(128, 8, "paper", fa1_tiles.SIM_THREADS)
        variants.append(cc.Variant("fa1", kernel, tiles, True, "float32", cc.ALL_OPTIONS))
print(json.dumps([cc.as_dict(cc.compile_report(v)) for v in variants]))
"""

#: sm_80 and later reserve 1 KB of shared memory per block for the system; the report counts it
RESERVED_SMEM = 1024
SM90_SMEM_OPTIN = 232448


def compile_reports(cases, head_dims, family=""):
    """The reports of SCRIPT's variants: fa1's of `cases` and the simulator's fa2 and tc
    variants, or with head_dims the GPU's default variants of `family` ("fa2"; "tc": tc's and
    fa1's)."""
    env = {**os.environ, "NBFLASH_DEVICE": "compile"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(cases),
                           json.dumps(head_dims), family], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _allowance(label):
    """The measured allowance for a variant's label ("tc_forward d=128 ..."): tc's
    (tc_tiles.LOCAL_ALLOWANCE), fa2's with every option (fa2_tiles.OPTIONS_LOCAL_ALLOWANCE);
    0 for every other kernel."""
    name, d = label.split()[0], int(re.search(r"\bd=(\d+)", label).group(1))
    if name.startswith("fa2_"):
        return fa2_tiles.local_allowance(name[4:], d, " dropout " in label)
    if not name.startswith("tc_"):
        return 0
    return tc_tiles.local_allowance(name[3:], d)


@pytest.mark.parametrize("which", ["simulator-test variants", "gpu default variants: fa2",
                                   "gpu default variants: tc and fa1"])
def test_kernels_compile_for_sm90_without_spills(which):
    """(Three tests, so that two workers share the minutes of compiling.)"""
    if which.startswith("sim"):
        reports = compile_reports(SIM_CASES, [])
    else:
        reports = compile_reports([], list(GPU_HEAD_DIMS),
                                  "fa2" if which.endswith("fa2") else "tc")
    assert reports
    bad = []
    for r in reports:
        print(r)
        local = max(r["stack_bytes"], r["spill_store_bytes"], r["spill_load_bytes"],
                    r["local_bytes"])
        if local > _allowance(r["variant"]) if which.startswith("gpu") else local:
            bad.append(f"{r['variant']}: {r['registers']} registers, stack {r['stack_bytes']}, "
                       f"spills {r['spill_store_bytes']}/{r['spill_load_bytes']}")
        if r["shared_bytes"] != r["expected_shared_bytes"] + RESERVED_SMEM:
            bad.append(f"{r['variant']}: {r['shared_bytes']} bytes of shared memory, "
                       f"nbflash counts {r['expected_shared_bytes']} + {RESERVED_SMEM}")
        if r["expected_shared_bytes"] > fa1_tiles.STATIC_SMEM_BYTES:
            bad.append(f"{r['variant']}: over the static shared-memory limit")
        if r["dynamic_shared_bytes"] > SM90_SMEM_OPTIN:
            bad.append(f"{r['variant']}: {r['dynamic_shared_bytes']} bytes of dynamic shared "
                       f"memory, above the {SM90_SMEM_OPTIN} an sm_90 block may have")
    assert not bad, "\n".join(bad)


NORMALIZE_SCRIPT = r"""
import json
import re
from nbflash._cuda import cuda
from numba import float32, types
from nbflash.devtools.compilecheck import normalized_ptx


def make(c, name):
    C = float32(c)

    def kernel(x):
        s = cuda.shared.array(4, float32)
        s[0] = x[0] * C
        x[1] = s[0]
    kernel.__name__ = kernel.__qualname__ = name
    return kernel


sig = types.void(types.float32[:])
a, b, c = (cuda.compile_ptx(make(k, name), sig, cc=(9, 0))[0]
           for k, name in ((2.0, "first"), (2.0, "second"), (3.0, "first")))
print(json.dumps([a != b, normalized_ptx(a) == normalized_ptx(b),
                  normalized_ptx(a) == normalized_ptx(c)]))
"""


def test_normalized_ptx_ignores_names_and_sees_code():
    """The PTX comparison behind ``python -m nbflash compile --same-ptx-as``: one kernel under
    two names (other mangled symbols, another shared-array counter) compares equal, a kernel
    with another constant does not."""
    env = {**os.environ, "NBFLASH_DEVICE": "compile"}
    done = subprocess.run([sys.executable, "-c", NORMALIZE_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [True, True, False]
