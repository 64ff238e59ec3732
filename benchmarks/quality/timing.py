"""Measure one training step (and scoring speed) of every arm before planning a sweep.

Each arm trains ``steps`` real steps of the sweep's own recipe (the causal runs through ``DepthSFTTrainer``, the
encoder loop otherwise), on the task's training batches at the sweep's batch size; the first step is a warm-up and
the median of the others is kept, as wall seconds and as process CPU seconds. CPU seconds are what a sweep spends
whoever shares the machine; wall seconds on a shared machine are only an upper bound, so the load average is
recorded too. Scoring speed: seconds per row of the arm's trained model on a few dev rows with this repository's
scorer, and for the LoRA arm with lm-evaluation-harness too. Arms run one after another (one model in memory).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from peft_depth.tasks import fit_examples

from .arms import Arm, build_config
from .data import TaskSplits, choice_examples, pair_examples
from .models import CAUSAL, ModelSpec, load_tokenizer, run_device
from .provenance import hardware, versions
from .train_causal import RunSettings, TrainedModel, compute_precision, train_causal
from .train_encoder import predict, train_encoder

__all__ = ["measure", "tokens_per_row", "train_lengths", "padded_tokens_per_step"]


class _StepClock(TrainerCallback):
    """Wall and process-CPU seconds of every optimizer step of a Trainer."""

    def __init__(self) -> None:
        self.steps: list[tuple[float, float]] = []
        self._start = (0.0, 0.0)

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = (time.perf_counter(), time.process_time())

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append((time.perf_counter() - self._start[0], time.process_time() - self._start[1]))


def _clocked(function) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def tokens_per_row(spec: ModelSpec, task: str, rows: list[dict[str, Any]], tokenizer, max_length: int) -> float:
    """Mean tokens a row costs to score: prompt once plus every multi-token choice (as the scorers run them)."""
    if spec.family != CAUSAL:
        from .train_encoder import encode_pairs

        encoded = encode_pairs(pair_examples(task, rows), tokenizer, max_length)
        return statistics.fmean(len(r["input_ids"]) for r in encoded)
    total = 0
    for example in choice_examples(task, rows):
        prompt = len(tokenizer(example.prompt, add_special_tokens=False)["input_ids"])
        choices = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in example.choices]
        total += prompt if all(n == 1 for n in choices) else sum(prompt + n for n in choices)
    return total / len(rows)


def train_lengths(spec: ModelSpec, task: str, rows: list[dict[str, Any]], tokenizer, max_length: int) -> list[int]:
    """Token count of every training example as the run trains on it (causal rows too long are dropped)."""
    if spec.family == CAUSAL:
        return fit_examples(choice_examples(task, rows), tokenizer, max_length)[1]
    from .train_encoder import encode_pairs

    return [len(r["input_ids"]) for r in encode_pairs(pair_examples(task, rows), tokenizer, max_length)]


def padded_tokens_per_step(lengths: list[int], batch_size: int, draws: int = 500) -> float:
    """Mean positions a step computes (batch size × longest example, batches padded to their longest), by sampling."""
    import random

    rng = random.Random(0)
    return statistics.fmean(batch_size * max(rng.sample(lengths, min(batch_size, len(lengths)))) for _ in range(draws))


def _score_seconds(spec: ModelSpec, task: str, trained: TrainedModel, rows, settings: RunSettings) -> float:
    with compute_precision(settings):
        return _score_seconds_as_is(spec, task, trained, rows, settings)


def _score_seconds_as_is(spec: ModelSpec, task: str, trained: TrainedModel, rows, settings: RunSettings) -> float:
    if spec.family == CAUSAL:
        from peft_depth.tasks import multiple_choice_accuracy

        examples = choice_examples(task, rows)
        _, _, cpu = _clocked(lambda: multiple_choice_accuracy(trained.model, trained.tokenizer, examples))
    else:
        pairs = pair_examples(task, rows)
        _, _, cpu = _clocked(lambda: predict(trained.model, trained.tokenizer, pairs, settings.max_length))
    return cpu / len(rows)


def _lm_eval_seconds(task: str, trained: TrainedModel, rows, settings: RunSettings) -> float | None:
    from .lm_eval_scorer import lm_eval_available, lm_eval_score

    if not lm_eval_available():
        return None
    with compute_precision(settings):
        _, _, cpu = _clocked(lambda: lm_eval_score(trained.model, trained.tokenizer, task, rows))
    return cpu / len(rows)


def measure(
    spec: ModelSpec,
    task: str,
    splits: TaskSplits,
    arms: list[Arm],
    settings: RunSettings,
    score_rows: int = 16,
    output: str | Path | None = None,
) -> dict[str, Any]:
    """Step and scoring times of every arm on ``task``; written as JSON to ``output`` when given."""
    rows = (splits.dev or splits.test)[:score_rows]
    result: dict[str, Any] = {
        "model": spec.name,
        "task": task,
        "batch_size": settings.batch_size,
        "max_length": settings.max_length,
        "precision": settings.precision,
        "steps_timed": settings.steps - 1,
        "load_average_before": os.getloadavg(),
        "hardware": hardware(run_device()),  # both loops put every arm there
        "versions": versions(),
        "arms": {},
    }
    for arm in arms:
        config = build_config(arm, spec, task, settings.steps)
        steps: list[tuple[float, float]] = []
        if spec.family == CAUSAL:
            clock = _StepClock()
            examples = choice_examples(task, splits.train)
            trained = train_causal(spec, config, examples, 1e-4, 0, settings, callbacks=[clock])
            steps = clock.steps
        else:
            trained = train_encoder(spec, config, pair_examples(task, splits.train), 1e-4, 0, settings, steps)
        timed = steps[1:] or steps
        entry = {
            "label": arm.label,
            "load_average": os.getloadavg(),
            "trainable_params": trained.trainable_params,
            "step_wall_s": statistics.median(w for w, _ in timed),
            "step_cpu_s": statistics.median(c for _, c in timed),
            "flops_per_step": trained.train_flops / settings.steps,
            "score_cpu_s_per_row": _score_seconds(spec, task, trained, rows, settings),
            "score_tokens_per_row": tokens_per_row(spec, task, rows, trained.tokenizer, settings.max_length),
        }
        if arm.method == "lora" and spec.family == CAUSAL:
            entry["lm_eval_cpu_s_per_row"] = _lm_eval_seconds(task, trained, rows, settings)
        result["arms"][arm.name] = entry
        print(
            f"  {arm.label:<36} step {entry['step_cpu_s']:.2f} CPU-s ({entry['step_wall_s']:.2f} s wall)", flush=True
        )
        del trained
    lengths = train_lengths(spec, task, splits.train, load_tokenizer(spec), settings.max_length)
    result["padded_tokens_per_step"] = padded_tokens_per_step(lengths, settings.batch_size)
    result["load_average_after"] = os.getloadavg()
    result["torch_threads"] = torch.get_num_threads()
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=1) + "\n")
    return result
