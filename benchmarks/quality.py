"""Fair, resumable accuracy comparison of the depth methods (MoLA, MoLEx, MoD, DLO) against plain peft LoRA.

    python benchmarks/quality.py budgets --model smollm2            # the matched-budget pairing table
    python benchmarks/quality.py measure --model smollm2 --task boolq  # time one training step per arm
    python benchmarks/quality.py plan                               # write benchmarks/results/quality/plan.md
    python benchmarks/quality.py run --suite smollm2-main           # the sweep (resumes where it stopped)
    python benchmarks/quality.py report --suite smollm2-main        # mean ± std, paired bootstrap, plot
    python benchmarks/quality.py crosscheck --task boolq            # our scorer vs lm-evaluation-harness

Everything runs offline. ``--help`` on each command lists its options; the logic lives in ``benchmarks/quality/``.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The package next to this file (benchmarks/quality/) is found before this script's own name.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from quality.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
