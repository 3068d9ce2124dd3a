#!/usr/bin/env bash
# The README's test command: set up .venv from scratch if needed, then run the whole suite against the
# real components (Tansu broker, Qdrant local mode, SmolLM2, MiniLM). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m pytest -ra "$@"
