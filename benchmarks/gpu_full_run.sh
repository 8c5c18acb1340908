#!/usr/bin/env bash
# Issue 26: the whole seed run from one command on one GPU: `fedtune local up` with 20 SuperNodes
# (3 sampled a round), 10 rounds, then the evaluation of all four benchmarks at their real test-set
# sizes (synthetic questions, benchmarks/eval_sets.py) and the report, on the 8B-shaped random model
# (benchmarks/bench_client_round.py). A lent device runs one command for at most 10 minutes, so
# `start` launches the run in its own session (it outlives the call while the machine stays warm)
# and follows it for up to FOLLOW seconds; `wait` follows it again and, once it ended, archives it
# to $OUT/full.tgz and prints the wall time and its parts. On the device, after
# `. benchmarks/device_setup.sh`:
#   bash benchmarks/gpu_full_run.sh start
#   bash benchmarks/gpu_full_run.sh wait     # in the next call, within 30 s
# EXTRA adds run-config keys (e.g. "trainer.placement=\"device\"").
set -uo pipefail
WORK=${WORK:-/tmp/fedtune-bench} OUT=${OUT:-/tmp/out} FOLLOW=${FOLLOW:-540}
# A CPU dry run: GPUS= NODES=4 ROUNDS=1 EXTRA="profile=\"tiny\"" with a tiny model at $WORK/llama-3-8b-random.
GPUS=${GPUS-0} NODES=${NODES:-20} ROUNDS=${ROUNDS:-10}
FULL=$WORK/full
follow() {  # print new progress lines until the run ends or FOLLOW s pass; 0 once it ended
  local until=$(( $(date +%s) + FOLLOW )) seen=0
  while [ "$(date +%s)" -lt "$until" ]; do
    if [ -f "$FULL/run.log" ]; then
      n=$(wc -l < "$FULL/run.log"); [ "$n" -gt "$seen" ] && sed -n "$((seen + 1)),${n}p" "$FULL/run.log" | grep -E "^round|fedtune:|finished|accuracy|questions/s|error" ; seen=$n
    fi
    [ -f "$FULL/exit" ] && return 0
    sleep 5
  done
  return 1
}
case ${1:-} in
  start)
    mkdir -p "$FULL"
    python3 - <<PY || exit 1
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from bench_client_round import build_random_llama, write_long_flashcards
work = Path("$WORK")
build_random_llama(work / "llama-3-8b-random")
write_long_flashcards(work / "flashcards-512.jsonl")
PY
    python3 benchmarks/eval_sets.py "$WORK/eval-real-sizes" --tokenizer "$WORK/llama-3-8b-random" | tee "$FULL/eval_sets.txt" || exit 1
    setsid bash -c "
      nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader,nounits -lms 500 > '$FULL/nvidia-smi.csv' &
      smi=\$!
      date +%s.%N > '$FULL/t0'
      python3 -m app.cli local up --supernodes $NODES ${GPUS:+--gpus $GPUS} --rounds $ROUNDS --data '$WORK/flashcards-512.jsonl' \
        --results '$WORK/results' --eval-data-dir '$WORK/eval-real-sizes' \
        --run-config 'model.name=\"$WORK/llama-3-8b-random\" ${EXTRA:-}' > '$FULL/run.log' 2>&1
      echo \$? > '$FULL/exit.tmp'; date +%s.%N > '$FULL/t1'; kill \$smi; mv '$FULL/exit.tmp' '$FULL/exit'
    " < /dev/null > /dev/null 2>&1 &
    follow
    ;;
  wait)
    follow || { echo "still running"; exit 3; }
    run=$(ls -td "$WORK"/results/run-* | head -1)
    echo "exit $(cat "$FULL/exit"), wall $(python3 -c "print(f'{$(cat "$FULL/t1") - $(cat "$FULL/t0"):.0f}')") s; run $run"
    python3 - "$run" "$(cat "$FULL/t0")" <<'PY'
import json, sys
from pathlib import Path
run, t0 = Path(sys.argv[1]), float(sys.argv[2])
rounds = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
summary = json.loads((run / "summary.json").read_text())
print(f"start-up: round 1 started {rounds[0]['t_start'] - t0:.0f} s after the command")
print(f"training: {rounds[-1]['t_end'] - t0:.0f} s from the command to the last round's end, rounds aggregated {summary['rounds_aggregated']}")
for r in rounds:
    train = sum(c.get("train_seconds", 0) for c in r["clients"])
    print(f"round {r['round']:2d}: {r['round_seconds']:6.1f} s, clients' training {train:6.1f} s ({r['round_seconds'] / max(train, 1e-9):.2f}x)")
sys.path.insert(0, "benchmarks")
import round_path
round_path.print_summary(round_path.summarize(rounds))
ev = run / "eval" / "summary.json"
if ev.is_file():
    for name, b in json.loads(ev.read_text()).get("datasets", {}).items():
        print(f"eval {name}: {b.get('questions')} questions in {b.get('seconds')} s")
PY
    logs=$(cd "$WORK" && ls -td results/.local/*/logs 2>/dev/null | head -1)  # every process's log (no keys in them)
    tar -czf "$OUT/full.tgz" -C "$WORK" --exclude 'peft_*' --exclude '*.safetensors' full "results/$(basename "$run")" $logs
    ;;
  *) echo "usage: $0 start|wait"; exit 2 ;;
esac
