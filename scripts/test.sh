#!/usr/bin/env bash
# The README's test command: set up .venv from scratch if needed, then run the whole suite against the
# real components (Tansu broker, Qdrant local mode, SmolLM2, MiniLM, vLLM's CPU build). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/install-vllm.sh  # the real vLLM server the openai student backend is tested against
exec .venv/bin/python -m pytest -ra "$@"
