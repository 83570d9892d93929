"""Compile-only: every fa1 variant the tests use, fa2 with the simulator's tiles, and the GPU's
default tiles of both (fa2's as the benchmark runs them; both also with dropout, key padding and
a block mask), compiled for sm_90 without a GPU
(NVVM -> PTX -> nvJitLink), with the compiler's resource report checked: no stack frame, no
spills, no local memory, exactly the static shared memory nbflash.tiling counts (fa2: none;
its dynamic shared memory within what an sm_90 block may opt in to).

Runs in a subprocess because the device mode (simulator or real target) is fixed at import.
"""

import json
import os
import subprocess
import sys

import pytest

from nbflash import tiling

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
GPU_HEAD_DIMS = (64, 80, 96, 128)

SCRIPT = r"""
import json, sys
from nbflash import compilecheck, tiling
from nbflash.kernels.options import Features
cases, head_dims = json.loads(sys.argv[1]), json.loads(sys.argv[2])
variants = []
for M, d, rule, causal, dtype in cases:
    for name, pass_ in (("fa1_forward", "forward"), ("fa1_backward", "backward")):
        m = M if M is not None else tiling.default_M(d, pass_, rule)
        tiles = tiling.tiles_for(m, d, rule, compilecheck.SIM_THREADS)
        variants.append(compilecheck.Variant(name, tiles, causal, dtype))
variants += compilecheck.default_variants(tuple(head_dims))
ALL = Features(dropout=True, padding=True, sparse=True)
if head_dims:   # fa2's GPU kernels as benchmarked, and the simulator tests' small tiles
    variants += compilecheck.fa2_default_variants()
    # with dropout, key padding and a block mask (causal: the most masking code)
    variants += compilecheck.fa2_default_variants(causal=(True,), features=ALL)
    # tc's tensor-core kernels as benchmarked (without options; with options they take local
    # memory, see the README's tc section)
    variants += compilecheck.tc_default_variants()
    for name, pass_ in (("fa1_forward", "forward"), ("fa1_backward", "backward")):
        tiles = tiling.tiles_for(tiling.default_M(64, pass_, "paper"), 64, "paper",
                                 compilecheck.DEFAULT_THREADS)
        variants.append(compilecheck.Variant(name, tiles, True, "float16", ALL))
else:
    for d in (8, 40):
        for kind in tiling.FA2_KERNELS:
            t = tiling.fa2_tiles(kind, d, tiling.SIM_FA2_TILES)
            variants += [compilecheck.Variant(f"fa2_{kind}", t, c, "float32")
                         for c in (False, True)]
            variants.append(compilecheck.Variant(f"fa2_{kind}", t, True, "float16", ALL))
    for name in ("fa1_forward", "fa1_backward"):
        tiles = tiling.tiles_for(128, 8, "paper", compilecheck.SIM_THREADS)
        variants.append(compilecheck.Variant(name, tiles, True, "float32", ALL))
print(json.dumps([compilecheck.as_dict(compilecheck.compile_report(v)) for v in variants]))
"""

#: sm_80 and later reserve 1 KB of shared memory per block for the system; the report counts it
RESERVED_SMEM = 1024
SM90_SMEM_OPTIN = 232448


def compile_reports(cases, head_dims):
    env = {**os.environ, "NBFLASH_DEVICE": "compile"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(cases),
                           json.dumps(head_dims)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("which", ["simulator-test variants", "gpu default variants"])
def test_kernels_compile_for_sm90_without_spills(which):
    if which.startswith("sim"):
        reports = compile_reports(SIM_CASES, [])
    else:
        reports = compile_reports([], list(GPU_HEAD_DIMS))
    assert reports
    bad = []
    for r in reports:
        print(r)
        if r["stack_bytes"] or r["spill_store_bytes"] or r["spill_load_bytes"] \
                or r["local_bytes"]:
            bad.append(f"{r['variant']}: {r['registers']} registers, stack {r['stack_bytes']}, "
                       f"spills {r['spill_store_bytes']}/{r['spill_load_bytes']}")
        if r["shared_bytes"] != r["expected_shared_bytes"] + RESERVED_SMEM:
            bad.append(f"{r['variant']}: {r['shared_bytes']} bytes of shared memory, "
                       f"nbflash.tiling counts {r['expected_shared_bytes']} + {RESERVED_SMEM}")
        if r["expected_shared_bytes"] > tiling.STATIC_SMEM_BYTES:
            bad.append(f"{r['variant']}: over the static shared-memory limit")
        if r["dynamic_shared_bytes"] > SM90_SMEM_OPTIN:
            bad.append(f"{r['variant']}: {r['dynamic_shared_bytes']} bytes of dynamic shared "
                       f"memory, above the {SM90_SMEM_OPTIN} an sm_90 block may have")
    assert not bad, "\n".join(bad)
