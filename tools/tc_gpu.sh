#!/bin/bash
# One H200 call for the tc work: GPU tests of the primitives and tc, the resource report of
# the default tc kernels, then the probe (tools/tc_probe.py) with a time limit.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NBFLASH_DEVICE=gpu
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
if [ "${TESTS:-1}" = 1 ]; then
  timeout ${TEST_S:-300} python3 -m pytest -q -n 4 -x tests/test_warp.py tests/test_tc.py 2>&1 | tail -25 | tee $OUT/tests.txt
fi
for mode in ${PROBE:-grid}; do
  timeout ${PROBE_S:-200} python3 tools/tc_probe.py $mode 2>&1 | tee $OUT/probe_$mode.txt | grep "^d="
done
