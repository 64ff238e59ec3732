#!/usr/bin/env bash
# GPU check on a borrowed GPU machine with no network, in at most 8 minutes: install the wheels that
# benchmarks/gpu_prepare.sh brought (.gpu-wheels/, carried with the working tree) into a folder of their own, offline,
# and run benchmarks/gpu_check.py: each method's training step and peak memory against plain peft LoRA, batch-1
# decode, QLoRA on an NF4 base and accelerate FSDP2 at world size 1, on random weights in SmolLM2-135M's and
# Llama-3.2-1B's shapes. Prints markdown for BENCHMARKS.md (also written to $GPU_CHECK_OUTPUT, gpu_check.md).
#
#   bash benchmarks/gpu_prepare.sh                  # here, with PyPI: fills .gpu-wheels/
#   bash benchmarks/gpu_check.sh                    # there: the GPU machine's python3 must have torch with CUDA
#   bash benchmarks/gpu_check.sh --device cpu --tiny   # the same steps as a CPU smoke run
#
# Extra arguments go to gpu_check.py. Settings (environment): GPU_WHEELS_DIR (.gpu-wheels), GPU_SITE_DIR (where the
# wheels are installed, /tmp/peft-depth-gpu-site), PYTHON (python3), GPU_CHECK_LIMIT (seconds for gpu_check.py, 440:
# it then prints what it measured and stops), GPU_CHECK_OUTPUT (gpu_check.md).
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
WHEELS=${GPU_WHEELS_DIR:-.gpu-wheels}
SITE=${GPU_SITE_DIR:-/tmp/peft-depth-gpu-site}
PYTHON=${PYTHON:-python3}
LIMIT=${GPU_CHECK_LIMIT:-440}
OUTPUT=${GPU_CHECK_OUTPUT:-gpu_check.md}
if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
  echo "gpu_check.sh: no wheels in $WHEELS: run 'bash benchmarks/gpu_prepare.sh' where PyPI is reachable and carry $WHEELS" >&2
  exit 2
fi
rm -rf "$SITE"
# --target: a folder of their own, put first on the path, so they shadow the machine's older transformers; --no-deps
# and --no-index: nothing is resolved or fetched, the machine's torch, numpy, hub and tokenizers are used as they are
if ! "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
  --target "$SITE" "$WHEELS"/*.whl; then
  echo "gpu_check.sh: installing the wheels from $WHEELS failed" >&2
  exit 2
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
echo "gpu_check.sh: wheels installed in $(($(date +%s) - start)) s"
# SIGTERM at the limit: gpu_check.py prints the tables of what it measured, then stops; SIGKILL 20 s later
timeout --signal=TERM --kill-after=20 "$LIMIT" "$PYTHON" benchmarks/gpu_check.py --output "$OUTPUT" "$@"
status=$?
echo "gpu_check.sh: exit $status after $(($(date +%s) - start)) s; the markdown is in $OUTPUT"
exit "$status"
