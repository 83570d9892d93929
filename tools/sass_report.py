"""SASS of the default fa1 kernels on the GPU: instruction mix and local-memory instructions.

    python3 tools/sass_report.py OUTDIR
Writes OUTDIR/sass.txt (every kernel's SASS, one after the other) and prints, per kernel, the count of FFMA, LDS, LDG, STG,
BAR and of local-memory loads/stores (LDL/STL: there should be none).
"""

import re
import sys
from pathlib import Path

import numpy as np

import nbflash
from nbflash import tiling
from nbflash.kernels import launch

import cupy as cp  # noqa: E402

out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
dump = []
for d in (64, 128):
    for name, pass_ in (("fa1_forward", "forward"), ("fa1_backward", "backward")):
        tiles = tiling.tiles_for(tiling.default_M(d, pass_), d, "paper", launch.DEFAULT_THREADS)
        kernel = launch.build(name, tiles, False, False)
        x = cp.asarray(np.random.default_rng(0).standard_normal((1, 1, 64, d), np.float32))
        o, lse = nbflash.attention_forward(x, x, x)   # compiles the forward for float32
        nbflash.attention_backward(x, x, x, x, o, lse)
        sass = "\n".join(kernel.inspect_sass().values())
        dump.append(f"// ===== {name} d={d} Br={tiles.Br} Bc={tiles.Bc}\n{sass}")
        counts = {op: len(re.findall(rf"\b{op}\b", sass))
                  for op in ("FFMA", "FMUL", "LDS", "LDG", "STG", "BAR", "LDL", "STL", "MUFU")}
        print(f"{name} d={d} Br={tiles.Br} Bc={tiles.Bc}: {counts}")
(out / "sass.txt").write_text("\n".join(dump))
