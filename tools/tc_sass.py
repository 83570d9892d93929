"""On the GPU: registers and local-memory instructions (LDL/STL in the SASS) of tc kernels for
candidate tiles, as the driver's compiler builds them: python3 tools/tc_sass.py"""

import re

from nbflash import tiling
from nbflash.kernels import launch

CANDIDATES = [("dkdv", 64, (8, 32, 2)), ("dkdv", 64, (4, 32, 2, 2)), ("dkdv", 64, (8, 64, 2)),
              ("dkdv", 128, (8, 32, 2)), ("forward", 64, (8, 64, 2, 2)),
              ("forward", 128, (8, 64, 2))]
for kind, d, args in CANDIDATES:
    t = tiling.TcTiles(d, *args)
    for causal in (False, True):
        k = launch.build_tc(kind, t, causal, "float16")
        k._function(0)
        sass = k._dispatcher.inspect_sass(k._dispatcher.signatures[0])
        local = len(re.findall(r"\b(?:LDL|STL)\b", sass))
        print(f"{kind} d={d} {args} causal={causal}: {k.resources()['registers']} registers, "
              f"{local} LDL/STL, HMMA {sass.count('HMMA')}", flush=True)
