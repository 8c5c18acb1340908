#!/usr/bin/env bash
# On the lent GPU machine, after `. benchmarks/device_setup.sh` and `bench_comm.py --gpu-round`
# (which builds the random 8B-shaped model and the 512-token flashcards under $WORK):
# `fedtune local up` with the seed profile, one resident SuperNode, ROUNDS rounds, then the
# evaluation (--eval-limit; NO_EVAL=1 skips it) and the report; nvidia-smi sampled every 250 ms beside it.
set -uo pipefail
WORK=${WORK:-/tmp/fedtune-bench} ROUNDS=${ROUNDS:-3} NODES=${NODES:-1} OUT=${OUT:-/tmp/out}
EVAL_DATA=$(python3 -c "from app.training.tiny import tiny_eval_dir; print(tiny_eval_dir())")
nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader,nounits -lms 250 > "$OUT/nvidia-smi.csv" &
SMI=$!
python3 -m app.cli local up --supernodes "$NODES" --gpus 0 --rounds "$ROUNDS" --data "$WORK/flashcards-512.jsonl" \
  --results "$WORK/results" --eval-limit "${EVAL_LIMIT:-20}" --eval-data-dir "$EVAL_DATA" ${NO_EVAL:+--no-eval} \
  --run-config "model.name=\"$WORK/llama3-8b-random\" strategy.fraction-train=1.0 ${EXTRA:-}"
status=$?
kill $SMI
run=$(ls -td "$WORK"/results/run-* | head -1)
tar -czf "$OUT/run.tgz" -C "$run" --exclude 'peft_*' .
exit $status
