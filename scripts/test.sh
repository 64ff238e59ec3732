#!/usr/bin/env bash
# Install both dependency sets and run the whole test suite in each (offline, CPU). Extra arguments go to pytest.
#
#   bash scripts/test.sh                              # newest releases, then the floor set (constraints/floor.txt)
#   PEFT_DEPTH_SETS=newest bash scripts/test.sh -k molex   # one set only
#   PEFT_DEPTH_TEST_WORKERS=0 bash scripts/test.sh        # in one process (default: one xdist worker per core)
#
# Each suite also loads, in the other set's interpreter, adapters this one saved (PEFT_DEPTH_CROSS_PYTHON): an
# adapter saved under the newest releases must load under the floor set with identical logits, and the reverse.
set -euo pipefail
cd "$(dirname "$0")/.."
SETS=${PEFT_DEPTH_SETS:-"newest floor"}
venv_of() { if [ "$1" = floor ]; then echo .venv-floor; else echo .venv; fi; }
# One pytest-xdist worker per core (at most 4; PEFT_DEPTH_TEST_WORKERS overrides, 0 runs in-process), each with its share
# of the cores as torch threads (tests/conftest.py): the suite is mostly small models and subprocesses, which one
# thread serves nearly as fast as two, so two workers on two cores halve its time. worksteal rebalances the long
# files (compile, the quality harness) across workers as they finish.
WORKERS=${PEFT_DEPTH_TEST_WORKERS:-$(nproc 2>/dev/null || echo 1)}
if ! [[ "$WORKERS" =~ ^[0-9]+$ ]]; then
  echo "test.sh: PEFT_DEPTH_TEST_WORKERS must be a whole number of workers (0 or 1: one process), got '$WORKERS'" >&2
  exit 2
fi
[ "$WORKERS" -gt 4 ] && WORKERS=4
XDIST=(-n "$WORKERS" --dist worksteal)
[ "$WORKERS" -le 1 ] && XDIST=(-p no:xdist)
for set in $SETS; do
  bash scripts/setup_env.sh "$set"
done
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# The floor set runs the files whose subject depends on the transformers / peft / TRL / hub versions (call
# conventions, invariants, cross-version loads, Hub and load paths, trainer, registration); what tests torch or
# bitsandbytes behaviour (compile, FSDP2, quantized bases, checkpoint replay, property fuzzing) uses the same torch and
# bitsandbytes in both sets and runs on the newest set only, keeping the whole command within the CI budget.
FLOOR_FILES=(tests/test_invariants.py tests/test_call_convention.py tests/test_cross_version.py tests/test_hub.py
  tests/test_load_trust.py tests/test_trainer.py tests/test_registration.py tests/test_autoload.py
  tests/test_stock_trainer.py tests/test_pipeline.py tests/test_concurrency.py tests/test_core.py
  tests/test_load_precision.py)
declare -A results
overall=0
for set in $SETS; do
  other=$set
  for candidate in $SETS; do [ "$candidate" != "$set" ] && other=$candidate; done
  echo "=== pytest on the '$set' dependency set (cross-loading with '$other') ==="
  set +e
  files=()
  if [ "$set" = floor ] && [ "$#" -eq 0 ]; then files=("${FLOOR_FILES[@]}"); fi
  PEFT_DEPTH_CROSS_PYTHON="$PWD/$(venv_of "$other")/bin/python" "$(venv_of "$set")/bin/python" -m pytest -q "${XDIST[@]}" "${files[@]}" "$@"
  status=$?
  set -e
  # pytest exits 5 when nothing was collected (e.g. a -k filter that matches nothing): not a failure of the code.
  if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests on '$set' (exit 5)"
    status=0
  fi
  results[$set]=$status
  [ "$status" -ne 0 ] && overall=$status
done
for set in $SETS; do echo "dependency set '$set': pytest exit ${results[$set]}"; done
exit "$overall"
