#!/usr/bin/env bash
# fa2 on the H200 (run from the repo root there, after the prefix line of shared/device/prefix.txt):
#   tools/h200_fa2.sh sweep   tile sweep (experiments/fa2_tiles.py), host overhead, GPU tests of fa2/torch
#   tools/h200_fa2.sh bench   the benchmark grid (python -m nbflash bench)
#   tools/h200_fa2.sh probe   host-time profile, forward/dkdv tile sweep, ncu stall reasons
#   tools/h200_fa2.sh sanitize  compute-sanitizer memcheck and racecheck on fa2
#   tools/h200_fa2.sh final   the test suite on the GPU (without fa1's slow GPU sizes), then sanitize
set -uo pipefail
export NBFLASH_DEVICE=gpu
O=${OUT:-/tmp/out}; mkdir -p "$O"
step() { echo; echo "=== $* ($(date +%T))"; }
overhead() {
  python3 - <<'PY'
import time, statistics, numpy as np, cupy as cp, nbflash
q, k, v, do = (cp.asarray(np.random.standard_normal((1, 1, 128, 64)).astype(np.float32)) for _ in range(4))
for impl in ("fa2",):
    o, lse = nbflash.attention_forward(q, k, v, impl=impl)
    nbflash.attention_backward(do, q, k, v, o, lse, impl=impl)
    for name, fn in (("forward", lambda: nbflash.attention_forward(q, k, v, impl=impl)),
                     ("backward", lambda: nbflash.attention_backward(do, q, k, v, o, lse, impl=impl))):
        ts = []
        for i in range(300):
            if i % 50 == 0: cp.cuda.get_current_stream().synchronize()
            t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
        print(f"host overhead {impl} {name}: median {statistics.median(ts)*1e6:.1f} us")
PY
}
case "${1:-}" in
sweep)
  step info; python3 -m nbflash info | tail -12
  step overhead; overhead
  step sweep; timeout 330 python3 experiments/fa2_tiles.py --out "$O/fa2_tiles.json" 2>&1 | grep -v Warn | tail -40
  step tests; timeout 200 python3 -m pytest -n 4 -q -p no:cacheprovider tests/test_attention.py tests/test_torch.py \
      -k "fa2 or torch" 2>&1 | tee "$O/pytest.log" | tail -12
  ;;
probe)
  step launch; python3 tools/launch_overhead.py 2>&1 | grep -v Warn
  step sweep; cp figures/data/fa2_tiles_h200.json "$O/fa2_tiles.json"
  timeout 240 python3 experiments/fa2_tiles.py --kernels ${KERNELS:-forward} --out "$O/fa2_tiles.json" 2>&1 \
      | grep -v Warn | cut -c1-330 | tail -24
  step tests; timeout 200 python3 -m pytest -n 4 -q -p no:cacheprovider tests/test_attention.py tests/test_torch.py \
      tests/test_fa2_tiles.py -k "fa2 or torch" 2>&1 | tee "$O/pytest.log" | tail -5
  ;;
bench)
  step info; python3 -m nbflash info | tail -12
  step bench; timeout 480 python3 -m nbflash bench --out "$O/bench.json" 2>&1 | tail -80
  ;;
final)
  step tests; timeout 300 python3 -m pytest -n 4 -q -p no:cacheprovider tests --ignore=tests/test_compile.py \
      -k "not (fa1 and gpu)" 2>&1 | tee "$O/pytest.log" | tail -6
  ;&
sanitize)
  step memcheck; timeout 150 /usr/local/cuda/bin/compute-sanitizer --tool memcheck \
    --report-api-errors no --error-exitcode 99 python3 tools/sanitize_case.py fa2 \
    > "$O/memcheck.log" 2>&1; echo "memcheck rc=$?"; tail -2 "$O/memcheck.log"
  step racecheck; timeout 170 /usr/local/cuda/bin/compute-sanitizer --tool racecheck \
    --error-exitcode 99 python3 tools/sanitize_case.py fa2 > "$O/racecheck.log" 2>&1; echo "racecheck rc=$?"
  tail -4 "$O/racecheck.log"
  ;;
*) echo "usage: tools/h200_fa2.sh sweep | probe | bench | final | sanitize"; exit 2 ;;
esac
