"""One training run of a sequence classifier (MiniLM) with a depth adapter or LoRA, and its predictions.

``DepthSFTTrainer`` is TRL's SFT trainer, made for causal LMs, so an encoder trains in this small loop instead. It
uses the same hooks the trainer does, so nothing a method needs is dropped: the adapter's auxiliary losses
(``peft_depth.aux_losses``, weighted by the config's coefficients) are added to the loss, ``set_training_step`` runs
before every step, and the optimizer takes the method's own parameter groups (``collect_optimizer_groups``: MoLEx
gates at ``gate_lr``). Schedule as in the causal runs: linear warm-up over ``warmup_fraction`` of the steps, then
linear decay to 0; AdamW; examples drawn in a seeded order, epoch after epoch.
"""

from __future__ import annotations

import time

import torch
from peft import PeftConfig, get_peft_model
from transformers import set_seed

import peft_depth
from peft_depth.analysis import distance_from_base
from peft_depth.trainer import collect_optimizer_groups, set_training_step

from .flops import step_flops
from .models import ModelSpec, load_model, load_tokenizer, run_device
from .train_causal import RunSettings, TrainedModel, compute_precision

__all__ = ["train_encoder", "encode_pairs", "predict"]


def encode_pairs(pairs: list[tuple[str, str | None, int]], tokenizer, max_length: int) -> list[dict[str, list[int]]]:
    """Token ids of each (text, text pair, label); only the second text is cut when a pair is too long."""
    rows = []
    for text, pair, label in pairs:
        encoded = tokenizer(text, pair, truncation="only_second" if pair is not None else True, max_length=max_length)
        rows.append({**{k: list(v) for k, v in encoded.items()}, "labels": label})
    return rows


def collate_pairs(rows: list[dict], pad_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    batch: dict[str, torch.Tensor] = {}
    for name in ("input_ids", "token_type_ids", "attention_mask"):
        if name not in rows[0]:
            continue
        fill = pad_id if name == "input_ids" else 0
        batch[name] = torch.tensor([r[name] + [fill] * (width - len(r[name])) for r in rows])
    batch["labels"] = torch.tensor([r["labels"] for r in rows])
    return {name: tensor.to(device) for name, tensor in batch.items()}


def _optimizer(model, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    groups = collect_optimizer_groups(model, lr, weight_decay)
    claimed = {id(p) for group in groups for p in group["params"]}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in claimed]
    return torch.optim.AdamW([{"params": rest, "lr": lr, "weight_decay": weight_decay}, *groups], lr=lr)


def _lr_scale(step: int, settings: RunSettings) -> float:
    warmup = int(settings.warmup_fraction * settings.steps)
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (settings.steps - step) / max(1, settings.steps - warmup))


def _loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss + sum(peft_depth.aux_losses(model).values())


def train_encoder(
    spec: ModelSpec,
    config: PeftConfig,
    train_pairs: list[tuple[str, str | None, int]],
    lr: float,
    seed: int,
    settings: RunSettings,
    step_clock: list[tuple[float, float]] | None = None,
) -> TrainedModel:
    """Train ``config`` on ``spec`` (2-way classifier) for ``settings.steps`` steps at ``lr`` from ``seed``.

    ``step_clock``, if given, receives each step's (wall seconds, process CPU seconds).
    """
    tokenizer = load_tokenizer(spec)
    rows = encode_pairs(train_pairs, tokenizer, settings.max_length)
    set_seed(seed)
    model = get_peft_model(load_model(spec, num_labels=2), config).to(run_device())
    device = next(model.parameters()).device
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    first = collate_pairs(rows[: settings.batch_size], tokenizer.pad_token_id, device)
    first.pop("labels")
    start_distance = distance_from_base(model, **first).as_dict()
    optimizer = _optimizer(model, lr, settings.weight_decay)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    tokens = 0
    model.train()
    start = time.perf_counter()
    loss = None
    for step in range(settings.steps):
        step_start = (time.perf_counter(), time.process_time())
        if len(order) < settings.batch_size:
            order += torch.randperm(len(rows), generator=generator).tolist()
        picked, order = order[: settings.batch_size], order[settings.batch_size :]
        batch = collate_pairs([rows[i] for i in picked], tokenizer.pad_token_id, device)
        tokens += int(batch["attention_mask"].sum())
        for group, base_lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base_lr * _lr_scale(step, settings)
        set_training_step(model, step)
        with compute_precision(settings):
            loss = _loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step_clock is not None:
            step_clock.append((time.perf_counter() - step_start[0], time.process_time() - step_start[1]))
    wall = time.perf_counter() - start
    probe = collate_pairs(rows[: settings.batch_size], tokenizer.pad_token_id, device)
    per_token = step_flops(lambda: _loss(model, probe)) / int(probe["attention_mask"].sum())
    model.zero_grad(set_to_none=True)
    model.eval()
    return TrainedModel(
        model=model,
        tokenizer=tokenizer,
        train_wall_s=wall,
        train_flops=per_token * tokens,
        trainable_params=trainable,
        train_examples_used=len(rows),
        train_examples_dropped=0,
        final_loss=None if loss is None else float(loss.detach()),
        start_distance=start_distance,
    )


@torch.no_grad()
def predict(model, tokenizer, pairs: list[tuple[str, str | None, int]], max_length: int, batch_size: int = 32):
    """Predicted labels of the pairs, batched in the given order, computed where ``model``'s weights are."""
    rows = encode_pairs(pairs, tokenizer, max_length)
    device = next(model.parameters()).device
    model.eval()
    predictions: list[int] = []
    for begin in range(0, len(rows), batch_size):
        batch = collate_pairs(rows[begin : begin + batch_size], tokenizer.pad_token_id, device)
        batch.pop("labels")
        predictions += model(**batch).logits.argmax(-1).tolist()
    return predictions
