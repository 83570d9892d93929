#!/bin/bash
# One H200 call: the GPU tests of tc and its primitives, then compute-sanitizer (memcheck and
# racecheck) over small tc runs (tools/tc_sanitize.py).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NBFLASH_DEVICE=gpu
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout ${TEST_S:-300} python3 -m pytest -q -n 4 -rA tests/test_warp.py tests/test_tc.py 2>&1 | grep -E "passed|failed|FAILED|Error|sass|registers" | tail -30 | tee $OUT/tests.txt
for tool in memcheck racecheck; do
  timeout ${SAN_S:-150} /usr/local/cuda/bin/compute-sanitizer --tool $tool --report-api-errors no \
    python3 tools/tc_sanitize.py > $OUT/sanitizer_$tool.txt 2>&1
  echo "== $tool rc=$?"; grep -vi warning $OUT/sanitizer_$tool.txt | tail -12
done
