#!/usr/bin/env bash
# What issue 2 asks of the H200, in two device calls (run from the repo root there, after the
# prefix line of shared/device/prefix.txt):  tools/h200.sh test  |  tools/h200.sh measure
# test: the whole suite with the gpu marker, then compute-sanitizer memcheck and racecheck.
# measure: info, the compiler's report, SASS instruction counts, and `check` timings.
# Logs and JSON go to $OUT (at most 8 files come back).
set -uo pipefail
export NBFLASH_DEVICE=gpu
O=${OUT:-/tmp/out}; mkdir -p "$O"
step() { echo; echo "=== $* ($(date +%T))"; }
case "${1:-}" in
test)
  step tests; timeout 420 python3 -m pytest -n 2 -q -p no:cacheprovider tests 2>&1 \
    | tee "$O/pytest.log" | tail -15
  # memcheck also reports host API calls that fail, and cuda-bindings probes driver entry points
  # with cuGetProcAddress, some of which fail by design (34 such reports, 0 device errors, on
  # 2026-11-24): --report-api-errors no keeps the device memory errors alone
  step memcheck; /usr/local/cuda/bin/compute-sanitizer --tool memcheck \
    --report-api-errors no --error-exitcode 99 python3 tools/sanitize_case.py \
    > "$O/memcheck.log" 2>&1; echo "memcheck rc=$?"
  tail -2 "$O/memcheck.log"
  step racecheck; /usr/local/cuda/bin/compute-sanitizer --tool racecheck --error-exitcode 99 \
    python3 tools/sanitize_case.py > "$O/racecheck.log" 2>&1; echo "racecheck rc=$?"
  tail -4 "$O/racecheck.log"
  ;;
measure)
  step gpu; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
  step info; python3 -m nbflash info
  step compile; python3 -m nbflash compile --head-dims 64 128 --json "$O/compile.json" | tail -20
  step sass; python3 tools/sass_report.py "$O" 2>&1 | grep -v Warn | tail -4
  step check; python3 -m nbflash check --json /tmp/check_default.json
  for d in 64 128; do for N in 1024 4096; do
    step "check N=$N d=$d"
    python3 -m nbflash check --N $N --d $d --repeats 5 --json "/tmp/check_N${N}_d${d}.json" | tail -6
  done; done
  python3 -c "import json,glob,sys; json.dump([json.load(open(f)) for f in sorted(glob.glob('/tmp/check_*.json'))], open(sys.argv[1],'w'), indent=1)" "$O/check.json"
  ;;
*) echo "usage: tools/h200.sh test | measure"; exit 2 ;;
esac
