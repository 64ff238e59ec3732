"""One training run of a causal LM on a multiple-choice task with ``DepthSFTTrainer`` (auxiliary losses included).

The data is TRL's prompt-completion format (``peft_depth.tasks.to_sft_dataset``: loss on the answer only); the
prompts are ``peft_depth.tasks``'s. Training rows longer than ``max_length`` tokens are dropped rather than cut, since
TRL truncates from the end and would cut the answer away (their count is recorded). Scoring is left to the caller.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from peft import PeftConfig, get_peft_model
from transformers import set_seed

import peft_depth
from peft_depth.analysis import distance_from_base
from peft_depth.tasks import ChoiceExample, collate_answer_batch, encode_answer_only, fit_examples, to_sft_dataset

from .flops import step_flops
from .models import ModelSpec, load_model, load_tokenizer

__all__ = ["PRECISIONS", "RunSettings", "TrainedModel", "compute_precision", "train_causal"]


#: Arithmetic of a run: "fp32" throughout, or "bf16-mixed" - float32 weights and optimizer, matrix products under
#: bfloat16 autocast in training (the Trainer's ``bf16=True``) and scoring alike.
PRECISIONS = ("fp32", "bf16-mixed")


@dataclass(frozen=True)
class RunSettings:
    """Everything about training besides the arm, the learning rate and the seed (part of every run key; an fp32
    run's key leaves ``precision`` out, so runs recorded before the field existed keep their keys)."""

    steps: int
    batch_size: int
    max_length: int = 320
    warmup_fraction: float = 0.1
    weight_decay: float = 0.0
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"`precision` must be one of {PRECISIONS}, got {self.precision!r}.")

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16-mixed"

    def key_fields(self) -> dict[str, Any]:
        """The fields that identify a run (``precision`` only when it is not the default)."""
        fields = asdict(self)
        if self.precision == "fp32":
            del fields["precision"]
        return fields


def compute_precision(settings: RunSettings) -> contextlib.AbstractContextManager:
    """The context a run's forward passes outside the Trainer (scoring, encoder training) run under: bf16 autocast on
    the CPU and, where there is one, the GPU (an autocast covers one device type; with the CPU's alone, a model
    trained on a GPU was scored there in float32 while its record said bf16-mixed)."""
    if not settings.bf16:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
    if torch.cuda.is_available():
        stack.enter_context(torch.autocast("cuda", dtype=torch.bfloat16))
    return stack


@dataclass
class TrainedModel:
    """A trained (adapted) model, ready to score, and what its training cost."""

    model: Any
    tokenizer: Any
    train_wall_s: float
    train_flops: float
    trainable_params: int
    train_examples_used: int
    train_examples_dropped: int
    final_loss: float | None
    #: ``peft_depth.analysis.distance_from_base`` of the untrained adapter on the first training batch (None in records
    #: older than it): how far the method starts from the base model.
    start_distance: dict[str, float] | None = None


def _flops_per_token(model, tokenizer, examples: list[ChoiceExample]) -> float:
    batch = collate_answer_batch(encode_answer_only(examples, tokenizer), tokenizer.pad_token_id)

    def loss() -> torch.Tensor:
        out = model(**batch)
        return out.loss + sum(peft_depth.aux_losses(model).values())

    model.train()
    flops = step_flops(loss)
    model.zero_grad(set_to_none=True)
    return flops / int(batch["attention_mask"].sum())


def train_causal(
    spec: ModelSpec,
    config: PeftConfig,
    train_examples: list[ChoiceExample],
    lr: float,
    seed: int,
    settings: RunSettings,
    output_dir: str | None = None,
    callbacks: list | None = None,
) -> TrainedModel:
    """Train ``config`` on ``spec`` for ``settings.steps`` steps at ``lr`` from ``seed`` (adapter init and data order)."""
    from peft_depth import DepthSFTConfig, DepthSFTTrainer

    tokenizer = load_tokenizer(spec)
    kept, lengths = fit_examples(train_examples, tokenizer, settings.max_length)
    if not kept:
        raise ValueError(f"No training example fits max_length={settings.max_length} tokens.")
    set_seed(seed)
    model = get_peft_model(load_model(spec), config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    first = collate_answer_batch(encode_answer_only(kept[: settings.batch_size], tokenizer), tokenizer.pad_token_id)
    start_distance = distance_from_base(model, first["input_ids"], first["attention_mask"]).as_dict()

    scratch = tempfile.TemporaryDirectory(prefix="quality-run-") if output_dir is None else None
    args = DepthSFTConfig(
        output_dir=output_dir or scratch.name,
        max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=lr,
        lr_scheduler_type="linear",
        warmup_steps=int(settings.warmup_fraction * settings.steps),
        weight_decay=settings.weight_decay,
        max_length=settings.max_length,
        seed=seed,
        data_seed=seed,
        logging_steps=max(1, settings.steps // 10),
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        bf16=settings.bf16,  # on CPU: torch.autocast(bfloat16) around each forward, float32 weights
        gradient_checkpointing=False,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    trainer = DepthSFTTrainer(
        model=model, args=args, train_dataset=to_sft_dataset(kept), processing_class=tokenizer, callbacks=callbacks
    )
    start = time.perf_counter()
    output = trainer.train()
    wall = time.perf_counter() - start
    if scratch is not None:
        scratch.cleanup()
    # Counted after training, so that the counting forward cannot change any training state (e.g. DLO capacities).
    per_token = _flops_per_token(model, tokenizer, kept[: settings.batch_size])
    mean_tokens = sum(lengths) / len(lengths)
    model.eval()
    return TrainedModel(
        model=model,
        tokenizer=tokenizer,
        train_wall_s=wall,
        train_flops=per_token * mean_tokens * settings.batch_size * settings.steps,
        trainable_params=trainable,
        train_examples_used=len(kept),
        train_examples_dropped=len(train_examples) - len(kept),
        final_loss=getattr(output, "training_loss", None),
        start_distance=start_distance,
    )
