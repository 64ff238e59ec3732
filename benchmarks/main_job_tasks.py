"""Which task of the pool shows what a few minutes of CPU training buys (issue 14, the main job).

For each task it runs the main job exactly as ``bash scripts/train.sh`` would (``examples/sft.py`` with its embedded
defaults: MoLA ▽ and the plain LoRA baseline, 40 steps of 8), on the same held-out rows, and adds the majority class
(of the training split) and the base model with its best prompt format (the task's prompt alone, or with a one-line
instruction; chosen on the held-out rows, which favours the base). Each task's run is kept
(``outputs/main_job_tasks/<task>/sft_results.json``), so an interrupted survey resumes; the table goes to
``benchmarks/results/main_job_tasks.md``::

    python benchmarks/main_job_tasks.py --threads 1                 # every task of the pool
    python benchmarks/main_job_tasks.py --tasks sst2,boolq --num-test 300
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import peft_depth.assets  # noqa: E402
from peft_depth.analysis import paired_bootstrap  # noqa: E402
from peft_depth.tasks import TASKS, ChoiceExample, load_task, multiple_choice_predictions, train_test_split  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: One-line instructions tried in front of each task's prompt for the base model's best prompt.
INSTRUCTIONS = {
    "arc_easy": "Answer the multiple-choice question with the letter of the correct option.",
    "arc_challenge": "Answer the multiple-choice question with the letter of the correct option.",
    "sciq": "Answer the multiple-choice question with the letter of the correct option.",
    "boolq": "Read the passage and answer the question with yes or no.",
    "piqa": "Choose the solution that best achieves the goal.",
    "sst2": "Is the sentiment of this movie review positive or negative?",
}


def _instructed(examples: list[ChoiceExample], task: str) -> list[ChoiceExample]:
    return [ChoiceExample(f"{INSTRUCTIONS[task]}\n{ex.prompt}", ex.choices, ex.label) for ex in examples]


def _correct(predictions: torch.Tensor, examples: list[ChoiceExample]) -> list[bool]:
    return [int(p) == ex.label for p, ex in zip(predictions, examples)]


def survey_task(task: str, args: argparse.Namespace, out_root: Path) -> dict:
    folder = out_root / task
    results_file = folder / "sft_results.json"
    if not results_file.is_file():
        command = [
            sys.executable,
            str(ROOT / "examples" / "sft.py"),
            "--task",
            task,
            "--num_test",
            str(args.num_test),
            "--output_dir",
            str(folder),
            "--max_steps",
            str(args.steps),
        ]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True, cwd=ROOT)
    run = json.loads(results_file.read_text())
    examples = load_task(task)
    train, test = train_test_split(examples, args.num_test, seed=0)
    majority = collections.Counter(ex.label for ex in train).most_common(1)[0][0]
    path = peft_depth.assets.smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    formats = {
        "task prompt": [c == "1" for c in run["correct_before"]],
        "with instruction": _correct(multiple_choice_predictions(base, tokenizer, _instructed(test, task)), test),
    }
    best_format = max(formats, key=lambda name: sum(formats[name]))
    best_base = formats[best_format]
    method = [c == "1" for c in run["correct_after"]]
    lora = [c == "1" for c in run["lora_baseline"]["correct_after"]]
    return {
        "task": task,
        "num_test": len(test),
        # the training split's most frequent label, answered on every held-out row (what a model learns from the
        # label prior alone), and the held-out rows' own most frequent label (the stricter floor quality.py uses)
        "majority_class": sum(ex.label == majority for ex in test) / len(test),
        "test_majority_class": collections.Counter(ex.label for ex in test).most_common(1)[0][1] / len(test),
        "base_by_format": {name: sum(v) / len(v) for name, v in formats.items()},
        "best_base_format": best_format,
        "mola": sum(method) / len(method),
        "lora": sum(lora) / len(lora),
        "mola_vs_best_base": paired_bootstrap(method, best_base).__dict__,
        "lora_vs_best_base": paired_bootstrap(lora, best_base).__dict__,
        "mola_vs_lora": paired_bootstrap(method, lora).__dict__,
        "train_seconds": {"mola": run["train_seconds"], "lora": run["lora_baseline"]["train_seconds"]},
    }


def _interval(d: dict) -> str:
    mark = " ✓" if d["low"] > 0 or d["high"] < 0 else ""
    return f"{100 * d['difference']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]{mark}"


def write_table(rows: list[dict], path: Path, command: str) -> None:
    lines = [
        "# What the main job's few minutes of CPU training buy, per task",
        "",
        f"Command: `{command}` (SmolLM2-135M-Instruct dequantized from the Q4_1 GGUF; the main job's defaults: 40 steps "
        f"of 8, lr 1e-3, MoLA ▽ 2-4-6-8 r=8 and LoRA r=8 on all projections; {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}). Differences in percentage points with 95% paired-bootstrap intervals over the "
        "held-out rows (✓: excludes 0). The base model's best prompt format is chosen on the held-out rows.",
        "",
        "| task | held-out | majority class (train's / held-out's) | base (best format) | MoLA | LoRA | MoLA − base | LoRA − base | MoLA − LoRA | train s (MoLA / LoRA) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = r["base_by_format"][r["best_base_format"]]
        lines.append(
            f"| {r['task']} | {r['num_test']} | {r['majority_class']:.3f} / {r.get('test_majority_class', float('nan')):.3f} | {base:.3f} ({r['best_base_format']}) | "
            f"{r['mola']:.3f} | {r['lora']:.3f} | {_interval(r['mola_vs_best_base'])} | "
            f"{_interval(r['lora_vs_best_base'])} | {_interval(r['mola_vs_lora'])} | "
            f"{r['train_seconds']['mola']:.0f} / {r['train_seconds']['lora']:.0f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma list of pool tasks (default: all)")
    parser.add_argument("--num-test", type=int, default=300)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "outputs" / "main_job_tasks"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the sft.py subprocesses
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        parser.error(f"--tasks: unknown {unknown}; allowed: {sorted(TASKS)}")
    rows, start = [], time.perf_counter()
    table = ROOT / "benchmarks" / "results" / "main_job_tasks.md"
    command = "python benchmarks/main_job_tasks.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for task in tasks:
        rows.append(survey_task(task, args, Path(args.out)))
        (Path(args.out) / "survey.json").write_text(json.dumps(rows, indent=2))
        write_table(rows, table, command.strip())
        print(f"[{time.perf_counter() - start:.0f}s] {task} done -> {table}", flush=True)


if __name__ == "__main__":
    main()
