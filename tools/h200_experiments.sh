#!/usr/bin/env bash
# The paper's figures on the H200: python -m experiments for some experiments, within a time
# limit, with the data files copied to $OUT as they grow (a run cut by the device tool's limit
# still brings back what it finished; the next run resumes from them).
#   bash tools/h200_experiments.sh SECONDS NAME...
set -u
limit=$1; shift
mkdir -p "$OUT"
copy() { cp figures/data/*.json "$OUT"/ 2>/dev/null; }
( while sleep 15; do copy; done ) &
watcher=$!
timeout "$limit" python3 -m experiments --no-count "$@" > "$OUT/experiments.log" 2>&1
echo "rc=$?" >> "$OUT/experiments.log"
kill $watcher
copy
rm -f "$OUT"/bench_*.json "$OUT"/check_h200.json "$OUT"/fa1_threads_h200.json "$OUT"/fa2_tiles_h200.json
tail -40 "$OUT/experiments.log"
