"""``DepthSFTTrainer``: TRL's ``SFTTrainer`` that also trains the depth methods' auxiliary losses.

Why a ``compute_loss`` override: TRL 1.16 swaps in a fused LM-head forward during training and recomputes the loss
from per-token log-probabilities, so anything a model adds to its own ``loss`` is dropped. The depth tuners record
their auxiliary-loss ingredients during the forward instead; this trainer reads them through
``peft_depth.core.aux.raw_aux_losses`` right after the forward and adds them here (see ``hooks`` for every hook).
"""

from __future__ import annotations

import inspect
import json
import os
from typing import Any

import torch
from torch import nn
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SchedulerType
from trl import SFTTrainer

from ..core.config import DepthPeftConfig
from ..core.distributed import refuse_deepspeed_zero3
from ..core.forward_context import labels_outside_the_call
from ..hub.model_card import write_model_card
from .config import AUX_LOSS_OF_ADAPTER_FIELD, DepthSFTConfig
from .hooks import (
    CHECKPOINT_STATE_FILE,
    apply_lr_multipliers,
    checkpoint_state,
    collect_optimizer_groups,
    depth_tuners,
    load_checkpoint_state,
    loss_coefficient_overrides,
    lr_multipliers,
    needs_full_logits,
    routing_health,
    set_sync_routing_stats,
    set_training_step,
    set_training_total_steps,
    weighted_aux_terms,
)

__all__ = ["DepthSFTTrainer"]


def _refuse_compounding_schedule(args: Any, model: nn.Module) -> None:
    """Per-step LR multipliers (DLO's ``capacity_lr_scaling``) ride on a schedule that sets each step's rate afresh
    (every Hugging Face schedule is a ``LambdaLR``: ``initial_lr × lambda(step)``). ``reduce_lr_on_plateau`` instead
    multiplies the rate the group already has, which holds the last multiplier: the multipliers would compound at
    every reduction and the layers would train at silently wrong rates, so the pair is refused before training."""
    schedule = getattr(args, "lr_scheduler_type", None)
    if getattr(schedule, "value", schedule) != SchedulerType.REDUCE_ON_PLATEAU.value:
        return
    scaled = sorted(lr_multipliers(model))
    if scaled:
        raise ValueError(
            f"`lr_scheduler_type='reduce_lr_on_plateau'` cannot be combined with per-step learning-rate multipliers "
            f"(DLO `capacity_lr_scaling=True`, optimizer groups {scaled[:2]}{'...' if len(scaled) > 2 else ''}): "
            "the plateau scheduler scales the already-multiplied rate, so the multipliers would compound. Use a "
            "step schedule (e.g. 'linear', 'cosine', 'constant') or set capacity_lr_scaling=False."
        )


#: Trainer pickles its TrainingArguments next to the saved weights; this trainer writes them as JSON instead.
TRAINING_ARGS_PICKLE = "training_args.bin"
TRAINING_ARGS_JSON = "training_args.json"

_DEFAULTS = DepthSFTConfig.__dataclass_fields__


def _arg(args: Any, name: str) -> Any:
    # A plain SFTConfig also works: missing depth fields take DepthSFTConfig's defaults.
    return getattr(args, name, _DEFAULTS[name].default)


def _refuse_deepspeed_zero3(args: tuple, kwargs: dict[str, Any]) -> None:
    """A depth adapter (already in the model, or in ``peft_config``) under DeepSpeed ZeRO-3 stops here, naming FSDP2."""
    try:
        bound = inspect.signature(SFTTrainer.__init__).bind_partial(None, *args, **kwargs).arguments
    except TypeError:
        return  # SFTTrainer reports its own arguments
    model, peft_config = bound.get("model"), bound.get("peft_config")
    if isinstance(peft_config, DepthPeftConfig) or (isinstance(model, nn.Module) and depth_tuners(model)):
        refuse_deepspeed_zero3("DepthSFTTrainer with a peft-depth adapter", bound.get("args"))


class DepthSFTTrainer(SFTTrainer):
    """``SFTTrainer`` for peft-depth adapters (MoLA, MoLEx, MoD, DLO), and for any plain peft adapter.

    On top of ``SFTTrainer`` it:

    - adds every auxiliary loss of the last forward, weighted by the adapter config's coefficient or its
      ``DepthSFTConfig`` override, scaled for gradient accumulation by the rule ``Trainer`` applies to the LM loss (the
      rule TRL uses for native MoE aux losses);
    - logs ``loss/lm`` and ``loss/<name>`` per auxiliary loss (weighted; they add up to the logged ``loss``; in
      evaluation they are means over the eval batches, where Trainer weights ``eval_loss`` by each batch's rows, so
      the two agree when every eval batch has the same number of rows),
      ``aux/<name>`` (unweighted), and routing health under ``routing/...``;
    - sets ``sync_routing_stats`` on every depth tuner (the config is the source of truth), calls the tuners'
      ``set_training_step`` / ``set_training_total_steps`` hooks before each micro-batch, builds the optimizer from
      their ``depth_optimizer_groups`` when they expose any and scales those groups' scheduled learning rates by
      their ``depth_lr_multipliers`` before each optimizer step, and saves / restores their ``depth_checkpoint_state``
      with each checkpoint;
    - computes the LM loss from real logits instead of TRL's fused LM head when an adapter sets
      ``needs_full_logits`` (MoD's log-probability mixing), with the same normalisation;
    - builds DDP without the unused-parameter search (parameters trained only by an auxiliary loss break it), and
      refuses DeepSpeed ZeRO-3 with a depth adapter, naming FSDP2 (``core.distributed``);
    - saves the training arguments as ``training_args.json`` instead of Trainer's pickled ``training_args.bin``
      (Trainer never reads it back; a saved adapter folder then holds no pickle), and makes ``push_to_hub`` upload
      peft-depth's model card (method, usage, config) with TRL's metadata, not TRL's generic SFT card.

    Every hook is duck-typed and optional; ``peft_depth.trainer.hooks`` documents them.

    With a model that carries no depth adapter all of this is a no-op and the trainer is ``SFTTrainer``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _refuse_deepspeed_zero3(args, kwargs)  # before SFTTrainer switches on reentrant checkpointing for ZeRO-3
        super().__init__(*args, **kwargs)
        self._aux_overrides: dict[str, float] = (
            self.args.aux_coefficient_overrides() if isinstance(self.args, DepthSFTConfig) else {}
        )
        set_sync_routing_stats(self.model, _arg(self.args, "sync_routing_stats"))
        self._has_depth_tuners = bool(depth_tuners(self.model))
        # Adapter names are left out of routing/... metric names when there is only one adapter.
        names = set(getattr(self.model, "peft_config", {}) or {})
        self._drop_path_names = names if len(names) == 1 else set()
        self._lr_scaled_at_step: int | None = None  # the global step whose rates apply_lr_multipliers last set
        _refuse_compounding_schedule(self.args, self.model)

    def _build_accelerator_args(self, **kwargs: Any) -> dict[str, Any]:
        args = super()._build_accelerator_args(**kwargs)
        if self.args.ddp_find_unused_parameters is None and depth_tuners(self.model):
            # DDP's unused-parameter search walks back from the forward's outputs only. Parameters that learn only
            # from an auxiliary loss added after the forward (MoLEx's gates learn only from the balance loss) look
            # unused to it: DDP marks them ready at the end of the forward, and the aux gradient arriving in backward
            # then fails ("marked as ready twice"). Every depth-adapter parameter gets a gradient each step (expert
            # weights are stacked tensors), so the search is not needed; set ddp_find_unused_parameters to override.
            # Except when an auxiliary loss is off for this run: the parameters that learn only from it (MoLEx's
            # gates) then get no gradient at all, and only the search lets DDP go on without them.
            search = self._an_auxiliary_loss_is_off()
            for handler in args.get("kwargs_handlers", []):
                if hasattr(handler, "find_unused_parameters"):
                    handler.find_unused_parameters = search
        return args

    def _an_auxiliary_loss_is_off(self) -> bool:
        """Whether some depth adapter's auxiliary loss has coefficient 0 in this run (its config's, or the override)."""
        overrides = self.args.aux_coefficient_overrides() if isinstance(self.args, DepthSFTConfig) else {}
        configs = getattr(self.model, "peft_config", None) or {}
        active = getattr(self.model, "active_adapters", None) or list(configs)
        # the active adapters only: an inactive one trains nothing, and the search would break the active one's
        for config in (configs[name] for name in active if name in configs):
            for field_name in getattr(config, "aux_loss_fields", ()):
                loss_name = AUX_LOSS_OF_ADAPTER_FIELD.get(field_name)
                if float(overrides.get(loss_name, getattr(config, field_name))) == 0:
                    return True
        return False

    # ------------------------------------------------------------------------------------------- training step

    def training_step(self, model, inputs, num_items_in_batch=None):
        # Before the forward: schedules such as DLO's capacity annealing follow the trainer's global step (and, given
        # as a fraction of training, the run's total: max_steps, or the epochs × steps per epoch).
        set_training_total_steps(self.model, self.state.max_steps)
        set_training_step(self.model, self.state.global_step)
        if self.optimizer is not None and self._lr_scaled_at_step != self.state.global_step:
            # Once per optimizer step, at its first micro-batch: the LR scheduler has just set this step's rates, and
            # the capacities are those this step's forwards run at (the official code rescales right after the
            # scheduler's step, from the same capacities).
            apply_lr_multipliers(self.model, self.optimizer)
            self._lr_scaled_at_step = self.state.global_step
        # forward and backward (checkpointed layers recompute in backward): this run's loss coefficients throughout
        with loss_coefficient_overrides(self.model, self._aux_overrides):
            return super().training_step(model, inputs, num_items_in_batch=num_items_in_batch)

    def _loss_is_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        # The same decision as `Trainer.training_step`: if it holds, Trainer will NOT divide the returned loss by the
        # accumulation steps, because the LM loss is already normalised by the token count of the whole step.
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool(
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with loss_coefficient_overrides(self.model, self._aux_overrides):  # also for evaluation's forwards
            return self._compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _compute_loss(self, model, inputs, return_outputs, num_items_in_batch):
        mode = "train" if self.model.training else "eval"
        if needs_full_logits(self.model) or (self._has_depth_tuners and self._loss_from_logits()):
            lm_loss = self._logits_path_loss(model, inputs, num_items_in_batch, mode)
        else:
            # The loss only: with return_outputs, SFTTrainer runs an extra no-grad forward for the logits, which
            # would overwrite the tuners' records of the forward that produced the loss (that forward is done below).
            lm_loss = super().compute_loss(model, inputs, return_outputs=False, num_items_in_batch=num_items_in_batch)
        terms = weighted_aux_terms(self.model, self._aux_overrides)

        # Each auxiliary loss is a mean over its micro-batch (like the MoE aux loss). When Trainer leaves the
        # accumulation scaling to the loss (the LM loss is divided by the token count of all micro-batches of the
        # step), divide it by the accumulation steps here; otherwise Trainer divides the whole sum.
        scaled = mode == "train" and self._loss_is_scaled_for_ga(num_items_in_batch)
        steps = self.current_gradient_accumulation_steps if scaled else 1
        loss = lm_loss
        contributions = {}
        for name, term in terms.items():
            contributions[name] = term.weighted / steps
            loss = loss + contributions[name]

        self._log_depth_metrics(mode, lm_loss, contributions, terms, steps)

        if return_outputs:
            logits_inputs = {k: v for k, v in inputs.items() if k != "labels"}
            with torch.no_grad():
                outputs = model(**logits_inputs)
            return loss, outputs
        return loss

    def _loss_from_logits(self) -> bool:
        """Whether SFTTrainer computes this loss from full logits (a ``compute_loss_func``, or label smoothing with
        ``loss_type="nll"``). It then runs a second, no-grad forward with its fused head for its metrics, and the
        depth adapters' records (balance losses, DLO's router labels) would be read from that forward: without a
        gradient, or missing. So for depth adapters the loss is computed here, from one forward."""
        smoothed = self.label_smoother is not None and self.args.loss_type == "nll"
        return self.compute_loss_func is not None or smoothed

    def _logits_path_loss(self, model, inputs, num_items_in_batch, mode: str) -> torch.Tensor:
        """The LM loss through the model's own LM head, in one forward whose records the auxiliary losses read.

        Used for adapters that must see full logits (TRL's fused LM head never materialises them, so an adapter that
        transforms them, MoD's ``mix_space="log_probs"``, cannot run under it) and for losses SFTTrainer computes
        from full logits (``_loss_from_logits``). Without a custom loss this is SFTTrainer's token-mean NLL from
        ``logits`` instead of ``log_probs``; otherwise SFTTrainer's ``compute_loss_func`` or label smoother on this
        forward's outputs. The normalisation is SFTTrainer's (``num_items_in_batch``, tokens of every process).
        """
        custom = self._loss_from_logits()
        if self.args.loss_type != "nll" and not custom:
            raise ValueError(
                f"An active adapter needs the full-logits forward (e.g. MoD with mix_space='log_probs'), which "
                f"DepthSFTTrainer supports with loss_type='nll' (or a compute_loss_func), not {self.args.loss_type!r}."
            )
        labels = inputs["labels"]
        logits_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "fused_lm_head")}
        logits_inputs["use_cache"] = False
        # without labels, so the model computes no loss of its own; MoD still distils the labelled positions
        with labels_outside_the_call(labels):
            outputs = model(**logits_inputs)
        logits = outputs.logits[:, :-1]
        targets = labels[:, 1:].to(logits.device)
        mask = targets.flatten() != -100
        if self.compute_loss_func is not None:
            loss = self.compute_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
        elif custom:
            loss = self.label_smoother(outputs, labels, shift_labels=True, num_items_in_batch=num_items_in_batch)
        else:
            per_token = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="none"
            )
            num_tokens = mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = per_token.sum() / torch.as_tensor(num_tokens, device=per_token.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        if not custom:
            loss = loss + self._router_aux_term(outputs, num_items_in_batch, mode)
        with torch.no_grad():
            # SFTTrainer's metrics, from these logits: entropy and top-1 accuracy over the labelled positions
            valid = self.accelerator.gather_for_metrics(mask.sum()).sum()
            correct = (logits.argmax(dim=-1).flatten() == targets.flatten()) & mask
            correct = self.accelerator.gather_for_metrics(correct.sum()).sum()
            labelled = logits.flatten(0, 1)[mask].float()
            entropy = (torch.logsumexp(labelled, dim=-1) - (labelled.softmax(dim=-1) * labelled).sum(dim=-1)).sum()
            entropy = self.accelerator.gather_for_metrics(entropy).sum()
        self._metrics[mode]["entropy"].append((entropy / valid).item() if valid > 0 else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append((correct / valid).item() if valid > 0 else 0.0)
        self._count_tokens(mode, inputs)
        return loss

    def _router_aux_term(self, outputs: Any, num_items_in_batch, mode: str) -> torch.Tensor | float:
        """A mixture-of-experts model's load-balancing loss, weighted and logged as SFTTrainer's own NLL path adds it
        (``router_aux_loss_coef``; over the accumulation steps when the loss is scaled by ``num_items_in_batch``).
        Its custom-loss paths add none, and neither does this one for them."""
        aux = getattr(outputs, "aux_loss", None)
        if not getattr(self, "aux_loss_enabled", False) or aux is None:
            return 0.0
        self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux.detach()).mean().item())
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        return self.router_aux_loss_coef * aux / steps

    def predict(self, *args: Any, **kwargs: Any):
        # predict() never calls log(), which is where SFTTrainer empties its metric buffer: without this, the
        # prediction batches' loss parts and routing statistics were averaged into the next evaluate()'s metrics
        try:
            return super().predict(*args, **kwargs)
        finally:
            self._metrics["eval"].clear()

    def _count_tokens(self, mode: str, inputs: dict[str, Any]) -> None:
        """SFTTrainer's ``num_tokens`` metric (tokens trained on so far), which its own loss path keeps."""
        if not hasattr(self, "_total_train_tokens"):
            return
        if mode == "train":
            if "attention_mask" in inputs:
                local = inputs["attention_mask"].sum()
            elif "position_ids" in inputs:  # padding-free: one packed row
                local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
            else:
                return
            tokens = int(self.accelerator.gather_for_metrics(local).sum().item())
            self._total_train_tokens += tokens // max(int(getattr(self, "_tp_size", 1)), 1)
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    # ------------------------------------------------------------------------------------------- logging

    def _log_depth_metrics(self, mode, lm_loss, contributions, terms, steps) -> None:
        # Logged per micro-batch on the scale of one whole step (x steps), so that the window average TRL's `log`
        # takes equals the window average of Trainer's logged `loss`: `loss` == `loss/lm` + sum of `loss/<name>`.
        names: list[str] = ["loss/lm"]
        values: list[torch.Tensor] = [lm_loss.detach().float().reshape(()) * steps]
        for name, contribution in contributions.items():
            names.append(f"loss/{name}")
            values.append(contribution.detach().float().reshape(()) * steps)
            names.append(f"aux/{name}")
            values.append(terms[name].value.detach().float().reshape(()))
        if _arg(self.args, "log_routing_health") and self._has_depth_tuners:
            from ..core.aux import routing_stats

            for name, value in routing_health(routing_stats(self.model), self._drop_path_names).items():
                names.append(name)
                values.append(torch.tensor(float(value)))
        if len(names) == 1 and not self._has_depth_tuners:
            return  # a plain peft adapter: SFTTrainer already logs everything there is
        device = lm_loss.device
        stacked = torch.stack([v.to(device) for v in values]).reshape(1, -1)
        # one collective for all metrics; every process computes the same names in the same order
        gathered = self.accelerator.gather(stacked).reshape(-1, len(names)).mean(dim=0).tolist()
        for name, value in zip(names, gathered):
            self._metrics[mode][name].append(value)

    # ------------------------------------------------------------------------------------------- saving

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        folder = output_dir if output_dir is not None else self.args.output_dir
        pickled = os.path.join(folder, TRAINING_ARGS_PICKLE)
        if self._has_depth_tuners and os.path.isfile(pickled):
            with open(os.path.join(folder, TRAINING_ARGS_JSON), "w", encoding="utf-8") as f:
                json.dump(json.loads(self.args.to_json_string()), f, indent=2, sort_keys=True)
            os.remove(pickled)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None) -> None:
        # Trainer.push_to_hub saves the model (which writes peft-depth's card) and then calls this, which writes TRL's
        # SFT card over it: keep TRL's metadata (tags, base model, datasets) and put peft-depth's text back.
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if self._has_depth_tuners and self.is_world_process_zero():
            write_model_card(self.model, self.args.output_dir, repo_id=self.hub_model_id, replace_text=True)

    # ------------------------------------------------------------------------------------------- checkpoints

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        states = checkpoint_state(self.model)
        if states and self.args.should_save:
            # the folder Trainer just wrote
            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            torch.save(states, os.path.join(folder, CHECKPOINT_STATE_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        path = os.path.join(resume_from_checkpoint, CHECKPOINT_STATE_FILE)
        if os.path.isfile(path):
            load_checkpoint_state(self.model, torch.load(path, weights_only=True))

    # ------------------------------------------------------------------------------------------- optimizer

    def create_optimizer(self, model=None):
        opt_model = self.model if model is None else model
        if self.optimizer is not None:
            return self.optimizer
        depth_groups = collect_optimizer_groups(
            opt_model,
            self.args.learning_rate,
            self.args.weight_decay,
            gate_learning_rate=_arg(self.args, "gate_learning_rate"),
            gate_weight_decay=_arg(self.args, "gate_weight_decay"),
        )
        if not depth_groups:
            return super().create_optimizer(model)

        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        if "params" in optimizer_kwargs or "model" in optimizer_kwargs or not isinstance(optimizer_cls, type):
            raise ValueError(
                f"The optimizer `{self.args.optim}` builds its own parameter groups, which cannot be combined with the "
                "depth adapter's parameter groups (e.g. MoLEx gates). Use a standard optimizer such as adamw_torch."
            )
        claimed = {id(p) for group in depth_groups for p in group["params"]}
        decay_names = set(self.get_decay_parameter_names(opt_model))
        rest = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad and id(p) not in claimed]
        groups = [
            {"params": [p for n, p in rest if n in decay_names], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in rest if n not in decay_names], "weight_decay": 0.0},
            *depth_groups,
        ]
        groups = [group for group in groups if group["params"]]
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer
