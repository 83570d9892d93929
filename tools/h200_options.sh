#!/usr/bin/env bash
# Dropout, key padding and block-sparse attention on the H200 (run from the repo root there, after
# the prefix line of shared/device/prefix.txt):
#   tools/h200_options.sh tests     GPU tests of the options and the generator, fa2's GPU sizes
#   tools/h200_options.sh sanitize  compute-sanitizer memcheck and racecheck, fa1 and fa2, options on
#   tools/h200_options.sh bench     the benchmark at N = 4096: dropout, padding, block-sparse densities
set -uo pipefail
export NBFLASH_DEVICE=gpu
O=${OUT:-/tmp/out}; mkdir -p "$O"
step() { echo; echo "=== $* ($(date +%T))"; }
case "${1:-}" in
tests)
  step tests; timeout 420 python3 -m pytest -n 4 -q -p no:cacheprovider tests/test_options.py \
      tests/test_rng.py tests/test_attention.py -k "gpu and (fa2 or options or rng)" 2>&1 \
      | tee "$O/pytest.log" | grep -v "^SKIPPED" | tail -12
  step "dq margin of fa2's atomic dq (4096, d 64, float32)"
  timeout 120 python3 -m pytest -q -s -p no:cacheprovider tests/test_attention.py \
      -k "test_gpu_realistic_sizes and 4096-4096-64-full-f32-fa2" 2>&1 | grep -E " dq:|passed|failed"
  ;;
sanitize)
  for tool in memcheck racecheck; do
    for impl in fa2 fa1; do
      step "$tool $impl"; timeout 140 /usr/local/cuda/bin/compute-sanitizer --tool $tool --report-api-errors no \
        --error-exitcode 99 python3 tools/sanitize_case.py $impl options > "$O/$tool-$impl.log" 2>&1
      echo "$tool $impl rc=$?"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|max err" "$O/$tool-$impl.log" | tail -3
    done
  done
  ;;
bench)
  A="--impls fa2 naive torch --N 4096 --d 64 --dtypes float16 float32 --causal off --no-host-overhead"
  J="$O/bench_options_h200.json"
  step plain; timeout 100 python3 -m nbflash bench $A --out "$J" 2>&1 | tail -3
  step dropout; timeout 100 python3 -m nbflash bench $A --dropout 0.1 --out "$J" 2>&1 | tail -3
  step padding; timeout 100 python3 -m nbflash bench $A --padding --out "$J" 2>&1 | tail -3
  step sparse; timeout 200 python3 -m nbflash bench $A --density 1 0.5 0.2 0.1 --block-size 64 \
      --out "$J" 2>&1 | tail -3
  step table; python3 -c "import json, sys; from nbflash import bench; bench.print_table(json.load(open(sys.argv[1])))" "$J" 2>&1 | tail -70
  ;;
*) echo "usage: tools/h200_options.sh tests | sanitize | bench"; exit 2 ;;
esac
