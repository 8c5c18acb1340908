#!/usr/bin/env bash
# Issue 16's H200 measurements in one device call (BENCHMARKS.md, "On the GPU"): the seed profile on
# the 8B-shaped random model, 4 rounds each, one node and three nodes sharing the GPU, with the
# SuperNode poll patched (0.5 s, GPU nodes' default) and with Flower's own 3 s (PHASES picks; the
# default is the two patched phases, which fit one 10-minute call with the model build). Each phase leaves
# one archive, $OUT/<phase>.tgz (run directory without checkpoints, nvidia-smi samples,
# gpu_vs_smi.json, the launcher's log). A phase that outlives its limit is stopped (its partial
# results are still archived). On the device, after `. benchmarks/device_setup.sh`:
#   bash benchmarks/gpu_transport_runs.sh
#   PHASES="alone_stock-poll shared_stock-poll" bash benchmarks/gpu_transport_runs.sh
set -uo pipefail
export WORK=${WORK:-/tmp/fedtune-bench}
python3 - <<PY || exit 1
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from bench_client_round import build_random_llama, write_long_flashcards
work = Path("$WORK")
work.mkdir(parents=True, exist_ok=True)
build_random_llama(work / "llama3-8b-random")
write_long_flashcards(work / "flashcards-512.jsonl")
PY
phase() {  # name nodes poll limit_s
  local dir=$OUT/$1
  mkdir -p "$dir"
  echo "== $1 ($(date -u +%T))"
  FEDTUNE_SUPERNODE_POLL_SECONDS=$3 NO_EVAL=1 ROUNDS=4 NODES=$2 OUT=$dir timeout "$4" bash benchmarks/gpu_alone_run.sh > "$dir/run.log" 2>&1
  echo "exit $?"
  grep -E "^round|finished" "$dir/run.log" | tail -5
  run=$(ls -td "$WORK"/results/run-* | head -1)
  [ -f "$dir/run.tgz" ] || tar -czf "$dir/run.tgz" -C "$run" --exclude 'peft_*' .
  python3 benchmarks/gpu_vs_smi.py "$run" --smi "$dir/nvidia-smi.csv" --json "$dir/gpu_vs_smi.json" | tail -1
  tar -czf "$OUT/$1.tgz" -C "$OUT" "$1" && rm -rf "$dir"
}
for name in ${PHASES:-alone_poll-0.5 shared_poll-0.5}; do
  case $name in
    alone_poll-0.5) phase "$name" 1 0.5 150 ;;
    shared_poll-0.5) phase "$name" 3 0.5 200 ;;
    alone_stock-poll) phase "$name" 1 "" 150 ;;
    shared_stock-poll) phase "$name" 3 "" 200 ;;
    *) echo "unknown phase $name"; exit 2 ;;
  esac
done
