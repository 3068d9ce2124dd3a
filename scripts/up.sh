#!/usr/bin/env bash
# The README's run command: set up .venv if needed, then run the main job on the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/slimstream up "$@"
