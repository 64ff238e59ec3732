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
from .budget import format_budget_table, task_arms
from .data import load_splits
from .models import CAUSAL, ModelSpec, load_tokenizer
from .sweep import Suite
from .timing import padded_tokens_per_step, tokens_per_row, train_lengths

__all__ = ["TaskCost", "suite_cost", "render_plan", "lm_eval_slowdown", "RUN_OVERHEAD_S", "BUDGET_HOURS"]

#: Loading the model and data, building the adapter and the trainer, per run. A SmolLM2 smoke sweep's whole runs (2
#: short training steps and 8 scored rows each) took 10-20 s of wall time, so 20 CPU-s is an upper bound.
RUN_OVERHEAD_S = 20.0
#: CPU-hour budgets of issue 14, per model.
BUDGET_HOURS = {"smollm2": 30.0, "minilm": 6.0}


@dataclass(frozen=True)
class TaskCost:
    task: str
    arms: list[Arm]
    training_runs: int
    scored_runs: int
    cpu_s: float
    padded_tokens_per_step: float
    #: The part of ``cpu_s`` spent scoring dev and test rows (the rest trains).
    scoring_cpu_s: float = 0.0
    #: Scoring seed ``grid_seed`` of every arm again with lm-eval (from the kept adapters), when it is not the scorer.
    lm_eval_rescore_cpu_s: float = 0.0


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


def lm_eval_slowdown(timing: dict[str, Any], crosschecks: list[dict[str, Any]], model: str, task: str) -> float:
    """lm-eval's CPU time over ours on the same rows: from the cross-check of this task (100 rows) when there is one,
    else from the step-time measurement (a few rows, so start-up weighs more)."""
    for check in crosschecks:
        if check.get("model") == model and check["task"] == task and check.get("arm") == "lora":
            return check["lm_eval_cpu_s"] / check["ours_batched_cpu_s"]
    lora = timing["arms"].get("lora", {})
    if lora.get("lm_eval_cpu_s_per_row"):
        return lora["lm_eval_cpu_s_per_row"] / lora["score_cpu_s_per_row"]
    return 1.0


def suite_cost(
    suite: Suite, spec: ModelSpec, timing: dict[str, Any], crosschecks: list[dict[str, Any]] | None = None
) -> list[TaskCost]:
    costs = []
    for task in suite.tasks:
        arms = task_arms(spec, task)[0]
        slowdown = lm_eval_slowdown(timing, crosschecks or [], spec.name, task) if spec.family == CAUSAL else 0.0
        lm_eval_factor = slowdown if suite.test_scorer == "lm_eval" else 1.0
        rescore = 0.0
        splits = load_splits(task)
        settings = suite.settings_for(task)
        step_scale, dev_scale, test_scale, padded = _scale(timing, spec, task, settings)
        cpu = scoring = 0.0
        training = scored = 0
        for arm in arms:
            measured = timing["arms"].get(arm.name) or timing["arms"]["lora"]
            train = (settings.steps + 1) * measured["step_cpu_s"] * step_scale + RUN_OVERHEAD_S
            row = measured["score_cpu_s_per_row"]
            grid = 0 if suite.indicative else len(arm.lr_grid)
            cpu += grid * (train + len(splits.dev) * row * dev_scale)
            scoring += grid * len(splits.dev) * row * dev_scale
            test_score = len(splits.test) * row * test_scale * lm_eval_factor
            scoring += len(suite.seeds) * test_score
            if suite.test_scorer != "lm_eval":
                rescore += len(splits.test) * row * test_scale * slowdown + RUN_OVERHEAD_S * (slowdown > 0)
            for seed in suite.seeds:
                reused = not suite.indicative and seed == suite.grid_seed
                cpu += test_score + (RUN_OVERHEAD_S if reused else train)
                training += 0 if reused else 1
            training += grid
            scored += grid + len(suite.seeds)
        costs.append(TaskCost(task, arms, training, scored, cpu, padded, scoring, rescore))
    return costs


def render_timing(timing: dict[str, Any]) -> list[str]:
    """The measured step times of one model as a markdown table."""
    lora = timing["arms"].get("lora")
    hardware = timing["hardware"]
    lines = [
        f"Measured in {timing.get('precision', 'fp32')} on `{timing['task']}` training batches of "
        f"{timing['batch_size']} (≈ "
        f"{timing['padded_tokens_per_step']:.0f} padded tokens per step), {timing['torch_threads']} torch thread(s), "
        f"{hardware['cpu']} ({hardware['cpu_count']} cores); median of {timing['steps_timed']} steps after a warm-up "
        f"step, each arm in turn. Load average (1/5/15 min) before {_load(timing['load_average_before'])}, after "
        f"{_load(timing['load_average_after'])}: the machine was shared, so wall seconds are upper bounds. CPU "
        "seconds are this process's own, but they too rise while the other core is busy (shared caches and memory "
        "bandwidth), so ratios to LoRA are approximate; FLOPs / step do not depend on load.",
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
    entries: list[tuple[Suite, ModelSpec, dict[str, Any], list[TaskCost]]], crosschecks: list[dict[str, Any]]
) -> str:
    lines = [
        "# Quality sweep plan (issue 14)",
        "",
        "Generated by `python benchmarks/quality.py plan` from the measured step times "
        "(`step_times_<model>.json`, written by `python benchmarks/quality.py measure`) and the scorer cross-check "
        "(`crosscheck.json`). Nothing here has been run.",
        "",
        "**Units.** *Core-hours* are process CPU time (one thread for one hour): what the sweep consumes, whoever else "
        "shares the machine. *Machine-hours* are hours of this 2-core machine with both cores busy = core-hours / 2, "
        "if nothing else runs: two single-thread shards (`--threads 1 --shard i/2`, MiniLM) or one two-thread "
        "process (`--threads 2`, SmolLM2: in stop 23, two threads ran a BoolQ LoRA step in 6.9 s against about "
        "13 s for one, within 5% of this unit). Other users' jobs stretch the wall time, not the core-hours. Issue 14's budgets (30 h "
        "SmolLM2, 6 h MiniLM) are compared with both below.",
    ]
    totals: dict[str, list[float]] = {}
    tables: dict[str, list[str]] = {}
    for suite, spec, _, costs in entries:
        hours = sum(c.cpu_s for c in costs) / 3600
        scoring = sum(c.scoring_cpu_s for c in costs) / 3600
        rescore = sum(c.lm_eval_rescore_cpu_s for c in costs) / 3600
        total = totals.setdefault(spec.name, [0.0, 0.0])
        total[0] += hours
        total[1] += scoring
        arms = {a.name: a for c in costs for a in c.arms}
        grids = ", ".join(f"{a.name} {'/'.join(f'{lr:g}' for lr in a.lr_grid)}" for a in arms.values())
        for cost in costs:
            table = format_budget_table(*reversed(task_arms(spec, cost.task)))
            tables.setdefault(f"{spec.name}\n{table}", []).append(cost.task)
        lines += [
            "",
            f"## `{suite.name}`: {hours:.1f} core-hours ({hours / 2:.1f} machine-hours), {scoring:.1f} of them scoring",
            "",
            f"- model `{spec.name}`; tasks {', '.join(suite.tasks)}; seeds {list(suite.seeds)}"
            + (f"; learning rate from `{suite.lr_from}` (indicative: 1 seed)" if suite.indicative else "")
            + "; training steps "
            + ", ".join(f"{task} {suite.settings_for(task).steps}" for task in suite.tasks)
            + f", batches of {suite.settings.batch_size} (max length {suite.settings.max_length}), "
            f"{suite.settings.precision}; test scorer "
            f"`{suite.test_scorer}`.",
            f"- {len(arms)} arms (LoRA partners included), learning-rate grids: {grids}.",
        ]
        if rescore:
            lines.append(
                f"- Optional: the lm-eval numbers for seed {suite.grid_seed} of every arm, scored from the kept "
                f"adapters (no training): `run --suite {suite.name} --scorer lm_eval --seeds {suite.grid_seed}`, "
                f"{rescore:.1f} core-hours more."
            )
        lines += [
            "",
            "| task | padded tokens / step | training runs | scored runs | scoring core-hours | core-hours |",
            "|---|---|---|---|---|---|",
        ]
        for cost in costs:
            lines.append(
                f"| {cost.task} | {cost.padded_tokens_per_step:.0f} | {cost.training_runs} | {cost.scored_runs} | "
                f"{cost.scoring_cpu_s / 3600:.2f} | {cost.cpu_s / 3600:.2f} |"
            )
    lines += [
        "",
        "## Totals against the budgets",
        "",
        "| model | core-hours | of which scoring | machine-hours | budget (h) | in core-hours | in machine-hours |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, (hours, scoring) in totals.items():
        budget = BUDGET_HOURS.get(model)
        fits = ["–", "–"] if budget is None else ["✓" if h <= budget else "✗ over" for h in (hours, hours / 2)]
        lines.append(
            f"| {model} | {hours:.1f} | {scoring:.1f} | {hours / 2:.1f} | {budget if budget is not None else '–'} | "
            f"{fits[0]} | {fits[1]} |"
        )
    lines += ["", design_notes(crosschecks, entries), "", "## Budget pairings", ""]
    for key, tasks in tables.items():
        model, table = key.split("\n", 1)
        lines += [f"`{model}` on {', '.join(dict.fromkeys(tasks))}:", "", table, ""]
    lines += ["## Measured training steps", ""]
    seen = set()
    for _, spec, timing, _ in entries:
        if spec.name not in seen:
            seen.add(spec.name)
            lines += [f"### `{spec.name}`", "", *render_timing(timing), ""]
    lines += ["## Commands", "", COMMANDS]
    return "\n".join(lines) + "\n"


def design_notes(crosschecks: list[dict[str, Any]], entries) -> str:
    """Why the sweep looks the way it does; every number comes from the tables and files it cites."""
    lora_like = [c for c in crosschecks if c.get("arm") != "molex_lora"]
    slowdowns = [c["lm_eval_cpu_s"] / c["ours_batched_cpu_s"] for c in lora_like if c.get("ours_batched_cpu_s")]
    agree = sum(c["rows"] - c["rows_disagreeing"] for c in lora_like)
    checked = sum(c["rows"] for c in lora_like)
    adapters = ", ".join(sorted({c["arm"] for c in lora_like})) or "none yet"
    molex = [c for c in crosschecks if c.get("arm") == "molex_lora"]
    molex_changed = (
        f"{sum(c['rows_disagreeing'] for c in molex)} of {sum(c['rows'] for c in molex)}" if molex else "(not checked)"
    )
    slowdown = f"{min(slowdowns):.1f}-{max(slowdowns):.1f}x" if slowdowns else "(not measured)"
    tasks = dict.fromkeys(task for suite, *_ in entries for task in suite.tasks if task in ("boolq", "piqa"))
    sources = "; ".join(f"{task}: {load_splits(task).source}" for task in tasks)
    return f"""## Design, and why

- **Arithmetic.** The SmolLM2 suites run in bf16 mixed precision (float32 weights and AdamW, bfloat16 autocast in
  the Trainer's forwards and in scoring; `RunSettings.precision`): on this CPU (AVX-512 BF16) that made a training
  step 1.8x and scoring 2.9x faster than float32, with the same predictions on 64 BoolQ rows, and it is how these
  methods are trained on GPUs. MiniLM runs in float32 (its suite was under way before; a run's precision is part of
  its key, so the two never mix). A CPU without native bf16 products (AVX2 only) emulates them 30-64x slower than
  float32, so `quality.py` refuses bf16-mixed work there (`quality/cpu_arithmetic.py`; `--allow-slow-bf16`).
- **Scoring dominates.** Every test run scores all of BoolQ's test rows (long passages; on CPU a scored token costs
  about as much as a training step's forward), so BoolQ's scoring alone is most of SmolLM2's budget, whatever the
  training length: see "of which scoring" above. Within 30 *core*-hours the issue's sizes (≥ 2,000 BoolQ test rows ×
  every arm × 3 seeds) leave a handful of training steps per run, so this plan is sized in hours of this 2-core
  machine (both cores busy) and states both units.
- **Test scorer: lm-evaluation-harness for the main suite** (issue 14: the final numbers come from the harness),
  **this repository's** (`peft_depth.tasks.multiple_choice_predictions`) **for the dev-split learning-rate choice and
  the indicative suite** (cheaper). `crosscheck.md`: {agree} of {checked} rows got the same prediction from both
  scorers (adapters: {adapters}; 100 test rows of BoolQ and PIQA each); every row of every split tokenizes to the same
  ids both ways; the shipped YAML configs render exactly our prompt, choices and label for every validation row (test
  `test_shipped_lm_eval_task_configs_render_the_package_prompts`). lm-eval took {slowdown} our CPU time there, which
  the main suite's hours above include; `--scorer` switches either way.
- **MoLEx (`batch_vote`) is batch-dependent**: one expert layer per evaluation batch, by vote. With random gates,
  {molex_changed} cross-check rows changed prediction between batchings. Our scorer batches rows sorted by length with
  an attention mask; lm-eval runs without a mask, so its padding votes too. So lm-eval scores a `batch_vote` arm one
  row per batch (each row votes over its own tokens: the score of a request served alone, whatever else is scored);
  runs scored in batches (the dev phase, the encoder suite) are marked † and compared under one scorer only.
- **Learning rates**: 3 for LoRA, 2 per method (issue 14), chosen on dev with seed 0; the seed-0 test score reuses that
  dev run's adapter (the same training run), so only the other seeds train again. MoD alone trains only its norms,
  router and gate, so its grid sits 10x higher. The indicative suite borrows each arm's rate from the main suite (best
  dev accuracy averaged over its tasks) and runs one seed.
- **Budgets** (tables below): every arm adapts the same linear layers with lora_alpha = 2r. MoLA keeps 8-rank experts
  (the paper's and the main job's) and is paired with the LoRA whose rank matches it; DLO and dense expansion train
  their new layers through LoRA of the rank that matches the baseline LoRA; MoD alone is unmatched on purpose (its
  claim is ~97% fewer parameters). MiniLM's MoLEx takes the official per-task preset (`MoLExConfig.for_task`), which
  changes its gate and so its partner's rank per task.
- **MoLA ▽** = 2-4-6-8 experts from the bottom layer group up (more experts higher up: the paper's best allocation and
  `MoLAConfig`'s definition); □ = 5-5-5-5, as many experts in total.
- **Defaults**: fields an arm does not set keep the method's defaults at run time (e.g. MoD's `gate_init`); each record
  stores the full config, which is part of the run key, so a changed default gives new runs rather than reusing old
  ones. One exception: DLO anneals capacity over half of each run (its default 1,000 steps would not start to bite).
- **Steps** (per suite above): a BoolQ step costs ~3x a PIQA step (padded tokens per step), so BoolQ trains fewer
  steps; MiniLM's GLUE training sets have a few hundred rows, so their steps stop near 8-10 epochs, and MiniLM (cheap)
  gets 5 seeds for power.
- **Data**: {sources}. Splits are fixed (seed 1234) and fingerprinted in every record."""


#: How to run (and resume) the sweep in the background; rerunning a command resumes it.
COMMANDS = """Run from the repository root; each command resumes where it stopped (finished runs are skipped), so
rerun it after an interruption. SmolLM2 runs as one process with two threads: a BoolQ run peaks at about 10 GB
while training and 12-15 GB while lm-eval scores, so two single-thread shards do not fit this 24 GB machine, and
one and two threads give bit-identical training steps and scores (`benchmarks/thread_determinism.py`). MiniLM's
runs are small, so two single-thread shards use both cores. The indicative suite needs the main suite's dev results
(its learning rates), so it goes second.

```bash
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p outputs/quality
nohup .venv/bin/python benchmarks/quality.py run --suite smollm2-main --threads 2 \\
  > outputs/quality/smollm2-main.log 2>&1
nohup .venv/bin/python benchmarks/quality.py run --suite smollm2-indicative --threads 2 \\
  > outputs/quality/smollm2-indicative.log 2>&1
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
