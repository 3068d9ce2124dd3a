#!/usr/bin/env bash
# The base-vs-distilled-student ablation of the trained SLIM models on ML-100k, end to end and resumable:
#   1. the offline 1.5B teacher writes outcome-filtered rationales for USERS training users (resumable JSONL);
#   2. the student is LoRA-distilled on them into registry version $VERSION (skipped when it exists);
#   3. the harness trains and scores the ID + text and the ID-based models with base and distilled rationales for
#      every user (943 generations per student, cached under .slimstream/eval-rationales/; SASRec checkpoints
#      resume), one run per family: reports/ml-100k-slim-distilled-idtext/ and reports/ml-100k-slim-distilled-id/.
# Measured here: ~28 s per teacher user (3 samples x 160 tokens, 2 idle cores), ~75 min for 943 student
# rationales on one core, ~10-20 min per model: about 4 hours on this box with nothing else running.
#   scripts/run-distilled-ablation.sh            # USERS=150 VERSION=ml100k-qwen15b by default
set -euo pipefail
cd "$(dirname "$0")/.."
USERS=${USERS:-150}
VERSION=${VERSION:-ml100k-qwen15b}
DATASET=ml100k-qwen15b-s3
PORT=${PORT:-8011}
[ -x .venv/bin/python ] || bash scripts/install.sh
bash scripts/install-teacher.sh 1.5b
mkdir -p .slimstream/logs

if [ ! -d ".slimstream/registry/$VERSION" ]; then
  .venv/bin/slimstream serve-teacher --teacher 1.5b --backend llamacpp --port "$PORT" --threads 2 \
      > .slimstream/logs/ablation-teacher.log 2>&1 &
  teacher=$!
  trap 'kill $teacher 2>/dev/null || true' EXIT
  for _ in $(seq 1 120); do curl -fs "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 1; done
  SLIMSTREAM_TEACHER_URL="http://127.0.0.1:$PORT/v1" SLIMSTREAM_TEACHER_MODEL=qwen2.5-coder-1.5b-instruct \
  SLIMSTREAM_TEACHER_TIMEOUT_S=1200 SLIMSTREAM_TEACHER_MAX_CONCURRENCY=1 \
      .venv/bin/slimstream teacher-rationales --data ml-100k --users "$USERS" --samples 3 --max-tokens 160 \
      --version "$DATASET"
  kill "$teacher" 2>/dev/null || true
  trap - EXIT
  SLIMSTREAM_STUDENT_THREADS=2 .venv/bin/slimstream distill ".slimstream/rationales/$DATASET.jsonl" \
      --target-modules all --lora-r 16 --lora-alpha 32 --lr 4e-4 --max-steps 80 --max-seq-len 768 \
      --version "$VERSION"
fi

# One harness run per model family (base vs distilled rationale, same run, same seed), so that each lands its
# report as soon as it is done; the base-student rationales are cached and shared with the earlier reports.
# RUNS="name:methods ..." overrides the two runs.
RUNS=${RUNS:-"ml-100k-slim-distilled-idtext:popularity,slim-idtext-base,slim-idtext-distilled ml-100k-slim-distilled-id:popularity,slim-id-base,slim-id-distilled"}
for spec in $RUNS; do
  run=${spec%%:*}; methods=${spec#*:}
  [ -f "reports/$run/results.json" ] && { echo "$run: done already (reports/$run)"; continue; }
  SLIMSTREAM_STUDENT_BACKEND=llamacpp SLIMSTREAM_STUDENT_THREADS=1 .venv/bin/slimstream evaluate --data ml-100k \
      --methods "$methods" --adapter ".slimstream/registry/$VERSION/adapter" --sample-users 0 --sasrec-epochs 100 \
      --sasrec-minutes 30 --threads 1 --patience 10 --run "$run"
done
