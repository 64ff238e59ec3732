"""The sweep plan: every suite's runs and their CPU-hour estimate from the measured step times, as markdown.

Cost model (CPU-seconds = process CPU time, so the estimate does not depend on who else uses the machine):

- a training run = (steps + 1) × step time (the +1 is the FLOPs-counting step) + ``RUN_OVERHEAD_S``, where an arm's
  step time on a task = its measured step time × (padded tokens per step of that task / of the measured task);
- scoring = rows × measured seconds per row × (scoring tokens per row of that split / of the measured rows),
  × lm-eval's measured slowdown over our scorer when the test scorer is lm-eval;
- a dev run trains and scores dev; a test run trains and scores test, except seed ``grid_seed``, whose adapter comes
  from the dev phase (scoring and ``RUN_OVERHEAD_S`` only).

Step times scale linearly with padded tokens (attention's quadratic part is small at these lengths).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .arms import Arm
from .data import load_splits
from .models import ModelSpec, load_tokenizer
from .sweep import Suite
from .timing import padded_tokens_per_step, tokens_per_row, train_lengths

__all__ = ["TaskCost", "suite_cost", "render_plan", "RUN_OVERHEAD_S", "BUDGET_HOURS"]

#: Loading the model and data, building the adapter and the trainer: measured 10-20 CPU-s per run on SmolLM2.
RUN_OVERHEAD_S = 20.0
#: CPU-hour budgets of issue 14, per model.
BUDGET_HOURS = {"smollm2": 30.0, "minilm": 6.0}


@dataclass(frozen=True)
class TaskCost:
    task: str
    training_runs: int
    scored_runs: int
    cpu_s: float
    padded_tokens_per_step: float


def _scale(timing: dict[str, Any], spec: ModelSpec, task: str, settings) -> tuple[float, float, float, float]:
    """(step scale, dev row scale, test row scale, padded tokens per step) of ``task`` vs the measured task."""
    tokenizer = load_tokenizer(spec)
    splits = load_splits(task)
    lengths = train_lengths(spec, task, splits.train, tokenizer, settings.max_length)
    padded = padded_tokens_per_step(lengths, settings.batch_size)
    measured_row = statistics.fmean(a["score_tokens_per_row"] for a in timing["arms"].values())
    dev = tokens_per_row(spec, task, splits.dev, tokenizer, settings.max_length) if splits.dev else 0.0
    test = tokens_per_row(spec, task, splits.test, tokenizer, settings.max_length)
    return padded / timing["padded_tokens_per_step"], dev / measured_row, test / measured_row, padded


def suite_cost(suite: Suite, spec: ModelSpec, arms: list[Arm], timing: dict[str, Any]) -> list[TaskCost]:
    lora = timing["arms"].get("lora", {})
    lm_eval_factor = 1.0
    if suite.test_scorer == "lm_eval" and lora.get("lm_eval_cpu_s_per_row"):
        lm_eval_factor = lora["lm_eval_cpu_s_per_row"] / lora["score_cpu_s_per_row"]
    costs = []
    for task in suite.tasks:
        splits = load_splits(task)
        settings = suite.settings_for(task)
        step_scale, dev_scale, test_scale, padded = _scale(timing, spec, task, settings)
        cpu = 0.0
        training = scored = 0
        for arm in arms:
            measured = timing["arms"].get(arm.name) or timing["arms"]["lora"]
            train = (settings.steps + 1) * measured["step_cpu_s"] * step_scale + RUN_OVERHEAD_S
            row = measured["score_cpu_s_per_row"]
            grid = 0 if suite.indicative else len(arm.lr_grid)
            cpu += grid * (train + len(splits.dev) * row * dev_scale)
            test_score = len(splits.test) * row * test_scale * lm_eval_factor
            for seed in suite.seeds:
                reused = not suite.indicative and seed == suite.grid_seed
                cpu += test_score + (RUN_OVERHEAD_S if reused else train)
                training += 0 if reused else 1
            training += grid
            scored += grid + len(suite.seeds)
        costs.append(TaskCost(task, training, scored, cpu, padded))
    return costs


def render_timing(timing: dict[str, Any]) -> list[str]:
    """The measured step times of one model as a markdown table."""
    lora = timing["arms"].get("lora")
    hardware = timing["hardware"]
    lines = [
        f"Measured on `{timing['task']}` training batches of {timing['batch_size']} (≈ "
        f"{timing['padded_tokens_per_step']:.0f} padded tokens per step), {timing['torch_threads']} torch thread(s), "
        f"{hardware['cpu']} ({hardware['cpu_count']} cores); median of {timing['steps_timed']} steps after a warm-up "
        f"step, each arm in turn. Load average (1/5/15 min) before {_load(timing['load_average_before'])}, after "
        f"{_load(timing['load_average_after'])}: the machine was shared, so wall seconds are upper bounds; CPU "
        "seconds are this process's own.",
        "",
        "| arm | trainable params | step CPU-s | × LoRA | step wall-s | FLOPs / step | scoring CPU-s / row |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in timing["arms"].values():
        ratio = f"{arm['step_cpu_s'] / lora['step_cpu_s']:.2f}" if lora else "–"
        lines.append(
            f"| {arm['label']} | {arm['trainable_params']:,} | {arm['step_cpu_s']:.2f} | {ratio} | "
            f"{arm['step_wall_s']:.2f} | {arm['flops_per_step']:.3g} | {arm['score_cpu_s_per_row']:.3f} |"
        )
    if lora and lora.get("lm_eval_cpu_s_per_row"):
        lines += [
            "",
            f"lm-evaluation-harness scored the same rows in {lora['lm_eval_cpu_s_per_row']:.3f} CPU-s per row "
            f"(LoRA arm), {lora['lm_eval_cpu_s_per_row'] / lora['score_cpu_s_per_row']:.2f}× our scorer.",
        ]
    return lines


def _load(values: list[float]) -> str:
    return "/".join(f"{v:.1f}" for v in values)


def render_plan(
    entries: list[tuple[Suite, ModelSpec, list[Arm], dict[str, Any], list[TaskCost]]], budget_tables: dict[str, str]
) -> str:
    lines = [
        "# Quality sweep plan (issue 14)",
        "",
        "Generated by `python benchmarks/quality.py plan` from the measured step times "
        "(`step_times_<model>.json`, `python benchmarks/quality.py measure`). Nothing here is run yet.",
        "",
        "CPU-hours are process CPU time (core-hours): what the sweep consumes whoever else shares the machine. "
        "On the 2-core machine, two single-thread shards (`--threads 1 --shard i/2`) finish in about CPU-hours / 2 "
        "of wall time when nothing else runs.",
    ]
    totals: dict[str, float] = {}
    for suite, spec, arms, _, costs in entries:
        hours = sum(c.cpu_s for c in costs) / 3600
        totals[spec.name] = totals.get(spec.name, 0.0) + hours
        grids = ", ".join(f"{a.name} {'/'.join(f'{lr:g}' for lr in a.lr_grid)}" for a in arms)
        lines += [
            "",
            f"## `{suite.name}`: {hours:.1f} CPU-hours",
            "",
            f"- model `{spec.name}`; tasks {', '.join(suite.tasks)}; seeds {list(suite.seeds)}"
            + (f"; learning rate from `{suite.lr_from}` (indicative: 1 seed)" if suite.indicative else "")
            + "; training steps "
            + ", ".join(f"{task} {suite.settings_for(task).steps}" for task in suite.tasks)
            + f", batches of {suite.settings.batch_size} (max length {suite.settings.max_length}); test scorer "
            f"`{suite.test_scorer}`.",
            f"- {len(arms)} arms, learning-rate grids: {grids}.",
            "",
            "| task | padded tokens / step | training runs | scored runs | CPU-hours |",
            "|---|---|---|---|---|",
        ]
        for cost in costs:
            lines.append(
                f"| {cost.task} | {cost.padded_tokens_per_step:.0f} | {cost.training_runs} | {cost.scored_runs} | "
                f"{cost.cpu_s / 3600:.2f} |"
            )
    lines += ["", "## Totals against the budgets", "", "| model | CPU-hours | budget |", "|---|---|---|"]
    for model, hours in totals.items():
        budget = BUDGET_HOURS.get(model)
        verdict = "" if budget is None else (" ✓ within" if hours <= budget else " ✗ over")
        lines.append(f"| {model} | {hours:.1f} | {budget if budget is not None else '–'}{verdict} |")
    lines += ["", "## Budget pairings", ""]
    for model, table in budget_tables.items():
        lines += [f"`{model}`:", "", table, ""]
    lines += ["## Measured training steps", ""]
    seen = set()
    for _, spec, _, timing, _ in entries:
        if spec.name not in seen:
            seen.add(spec.name)
            lines += [f"### `{spec.name}`", "", *render_timing(timing), ""]
    lines += ["## Commands", "", COMMANDS]
    return "\n".join(lines) + "\n"


#: How to run (and resume) the sweep in the background; rerunning a command resumes it.
COMMANDS = """Run from the repository root; each command resumes where it stopped (finished runs are skipped), so
rerun it after an interruption. Two single-thread shards use both cores; the indicative suite needs the main suite's
dev results (its learning rates), so it goes second.

```bash
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p outputs/quality
for shard in 0 1; do
  nohup .venv/bin/python benchmarks/quality.py run --suite smollm2-main --threads 1 --shard $shard/2 \\
    > outputs/quality/smollm2-main.$shard.log 2>&1 &
done
wait
for shard in 0 1; do
  nohup .venv/bin/python benchmarks/quality.py run --suite smollm2-indicative --threads 1 --shard $shard/2 \\
    > outputs/quality/smollm2-indicative.$shard.log 2>&1 &
done
wait
for shard in 0 1; do
  nohup .venv/bin/python benchmarks/quality.py run --suite minilm --threads 1 --shard $shard/2 \\
    > outputs/quality/minilm.$shard.log 2>&1 &
done
wait
for suite in smollm2-main smollm2-indicative minilm; do .venv/bin/python benchmarks/quality.py report --suite $suite; done
```

`tail -f outputs/quality/*.log` shows the progress bars; `benchmarks/results/quality/<suite>.jsonl` holds every finished
run, `<suite>.md` / `<suite>.png` the report. Adapters of the dev phase are kept in `outputs/quality/adapters/` (the
chosen one is scored on test instead of training seed 0 again; delete the folder to reclaim the space)."""


def load_timing(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No step times at {path}: run `python benchmarks/quality.py measure` first.")
    return json.loads(path.read_text())
