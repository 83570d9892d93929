#!/bin/bash
# One H200 call after a tc kernel change: the SASS test in full, the benchmark against torch
# (fresh, one process) into figures/data/bench_tc_h200.json, and compute-sanitizer.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NBFLASH_DEVICE=gpu
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 200 python3 tools/tc_sass.py 2>&1 | grep -v Warning | tee $OUT/sass_candidates.txt
timeout 200 python3 -m pytest -q -s tests/test_tc.py -k sass 2>&1 | grep -v Warning | tail -30 > $OUT/sass.txt
grep -E "passed|failed|local memory|no (HMMA|LDSM|LDGSTS)" $OUT/sass.txt | cut -c1-400
timeout 300 python3 -m nbflash bench --impls torch torch-flash tc --dtypes float16 --no-resume \
  --out figures/data/bench_tc_h200.json > $OUT/bench.txt 2>&1; echo "bench rc=$?"
cp figures/data/bench_tc_h200.json $OUT/
for tool in memcheck racecheck; do
  timeout 120 /usr/local/cuda/bin/compute-sanitizer --tool $tool --report-api-errors no \
    python3 tools/tc_sanitize.py > $OUT/sanitizer_$tool.txt 2>&1
  echo "== $tool rc=$?"; grep -E "SUMMARY" $OUT/sanitizer_$tool.txt
done
