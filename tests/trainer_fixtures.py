"""Tiny tokenizer, data and trainer factory for the DepthSFTTrainer tests (no Hub access)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from datasets import Dataset
from tiny_models import VOCAB, tiny_llama
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast, TrainerCallback

import peft_depth
from peft_depth import DepthSFTConfig, DepthSFTTrainer


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny models' vocabulary ("t0" ... "t127"); the data is pre-tokenized."""
    vocab = {f"t{i}": i for i in range(VOCAB)}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t3")),
        pad_token="t0",
        bos_token="t1",
        eos_token="t2",
        unk_token="t3",
    )


def counting_dataset(num_rows: int = 32, seed: int = 0, min_len: int = 8, max_len: int = 14) -> Dataset:
    """Runs of consecutive token ids of varying length (so batches carry padding): learnable in a few steps."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(num_rows):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=generator))
        start = int(torch.randint(4, VOCAB - length, (1,), generator=generator))
        rows.append({"input_ids": list(range(start, start + length))})
    return Dataset.from_list(rows)


def method_configs() -> dict[str, Callable[[], Any]]:
    """Factories of a small adapter config for every depth method present in this checkout."""
    factories: dict[str, Callable[[], Any]] = {
        "mola": lambda: peft_depth.MoLAConfig(task_type="CAUSAL_LM", r=4, expert_pattern=[2, 4], top_k=1),
    }
    if hasattr(peft_depth, "MoLExConfig"):
        factories["molex"] = lambda: peft_depth.MoLExConfig(task_type="CAUSAL_LM", r=4)
    try:  # methods being built alongside: include them as soon as their package imports
        from peft_depth.tuners.mod import MoDConfig

        factories["mod"] = lambda: MoDConfig(task_type="CAUSAL_LM")
    except ImportError:
        pass
    try:
        from peft_depth.tuners.dlo import DLOConfig

        factories["dlo"] = lambda: DLOConfig(task_type="CAUSAL_LM")
    except ImportError:
        pass
    return factories


class GradCapture(TrainerCallback):
    """Copies every trainable parameter's gradient right before each optimizer step (after DDP's all-reduce)."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append(
            {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
        )


def make_trainer(
    peft_config: Any,
    output_dir: str,
    *,
    model: torch.nn.Module | None = None,
    dataset: Dataset | None = None,
    eval_dataset: Dataset | None = None,
    callbacks: list | None = None,
    **overrides: Any,
) -> DepthSFTTrainer:
    args = dict(
        output_dir=output_dir,
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to="none",
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    args.update(overrides)
    return DepthSFTTrainer(
        model=model if model is not None else tiny_llama(),
        args=DepthSFTConfig(**args),
        train_dataset=dataset if dataset is not None else counting_dataset(),
        eval_dataset=eval_dataset,
        processing_class=tiny_tokenizer(),
        peft_config=peft_config,
        callbacks=callbacks,
    )


def train_logs(trainer: DepthSFTTrainer) -> list[dict[str, float]]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def assert_finite(values: dict[str, float]) -> None:
    bad = {k: v for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)}
    assert not bad, bad
