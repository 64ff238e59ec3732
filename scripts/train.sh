#!/usr/bin/env bash
# Install everything and run the main job: fine-tune SmolLM2-135M-Instruct with MoLA (2-4-6-8 experts) on SST-2,
# offline on CPU, save the adapter (safetensors) to outputs/, reload it, train the plain LoRA baseline the same way,
# and print base, MoLA and LoRA held-out accuracy with paired-bootstrap intervals.
# Extra arguments go to examples/sft.py (e.g. --peft_method molex --max_steps 100).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python examples/sft.py "$@"
