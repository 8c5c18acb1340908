#!/usr/bin/env bash
# Issue 26 on one GPU, in one device call of at most 10 minutes: the seed profile on the
# 8B-shaped random model, 20 SuperNodes, 3 sampled a round, 3 rounds per phase:
#   device       trainer.placement=device (one trainer, the base loaded once, clients in turn)
#   nonresident  trainer.resident=false (today's fallback: a model load per client round)
# benchmarks/bench_device_trainer.py runs each phase (`fedtune local up`, nvidia-smi sampled every
# 0.5 s) and reports start-up to round 1, steady round vs the sum of its clients' train-seconds,
# the GPU peak vs the plan's one base + one training peak, and the trainer of every client.
# Results: $OUT/device_trainer.json, each phase's log as $OUT/<phase>.log, each run directory
# (no checkpoints) as $OUT/<phase>.tgz. On the device, after `. benchmarks/device_setup.sh`:
#   bash benchmarks/gpu_device_trainer.sh                   # both phases (~8 min with the model build)
#   PHASES=nonresident bash benchmarks/gpu_device_trainer.sh
#   TINY=1 bash benchmarks/gpu_device_trainer.sh            # CPU dry run, tiny profile
set -uo pipefail
OUT=${OUT:-/tmp/out} WORK=${WORK:-/tmp/fedtune-bench}
mkdir -p "$OUT"
limit() {  # seconds one phase's federation may take before it is stopped (partial results kept)
  case $1 in device) echo "${DEVICE_LIMIT:-210}" ;; *) echo "${NONRESIDENT_LIMIT:-330}" ;; esac
}
if [ -n "${TINY:-}" ]; then DEVICE_ARGS=(--tiny); else DEVICE_ARGS=(--gpus "${GPU:-0}"); fi
status=0
for phase in ${PHASES:-device nonresident}; do
  echo "== $phase ($(date -u +%T))"
  python3 benchmarks/bench_device_trainer.py --phases "$phase" --supernodes 20 --clients 3 --rounds 3 --work "$WORK" \
    --out "$OUT/device_trainer.json" --timeout "$(limit "$phase")" "${DEVICE_ARGS[@]}" > "$OUT/$phase.log" 2>&1
  code=$?
  echo "exit $code"
  [ $code -eq 0 ] || status=$code
  grep -vE "^  \|" "$OUT/$phase.log" | tail -8
  run=$(ls -td "$WORK/results-$phase"/run-* 2>/dev/null | head -1)
  logs=$(ls -td "$WORK/results-$phase"/.local/*/logs 2>/dev/null | head -1)  # every process's log (no keys in them)
  [ -n "$run" ] && tar -czf "$OUT/$phase.tgz" -C "$run" --exclude 'peft_*' . ${logs:+-C "$logs" .}
done
exit $status
