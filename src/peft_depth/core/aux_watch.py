"""One clear warning when a training loop drops what a depth adapter needs besides the LM loss.

A stock ``transformers.Trainer`` / ``trl.SFTTrainer`` trains a depth adapter on the LM loss alone: MoLA's and MoLEx's
balance losses, MoD's distillation and DLO's router loss never reach the gradient, and DLO's capacity annealing never
advances - silently (a 100x coefficient gave an identical curve). The watch sees it from the model's side: a
training forward (train mode, gradients on) starts while the previous one's auxiliary losses were never read
(``peft_depth.aux_losses`` / ``raw_aux_losses``), or while the training step never advanced a schedule. It then warns
once per tuner, naming what is dropped and ``DepthSFTTrainer``. Reading the losses each step (``DepthSFTTrainer``, or a
custom loop adding them) or setting the coefficients to 0 keeps it quiet.

Any other forward that starts before the losses were read (a reference pass under ``disable_adapter()``, an evaluation)
replaces the records they come from, so a read after it finds none: that warns too. A forward nested inside one of
the model's own forwards does not (the outer forward's records stay its own, ``core.forward_context``).
"""

from __future__ import annotations

import threading
import warnings
from typing import Any

import torch
from torch import nn

from .forward_context import calls_in_progress

__all__ = ["AuxReadWatch", "install_aux_watch", "note_aux_read", "note_schedule_advanced"]

_ATTRIBUTE = "_peft_depth_aux_watch"


class AuxReadWatch:
    """Forward pre-hook on a tuner's model that notices auxiliary losses or schedules left behind."""

    def __init__(self, tuner: Any) -> None:
        self.tuner = tuner
        self.aux_unread = False
        self.unread_thread: int | None = None  # the thread whose training forward's losses are unread
        self.schedule_stalled = False
        self.warned = False
        self._handle = tuner.model.register_forward_pre_hook(self._before_forward)

    def _needs(self) -> tuple[list[str], list[str]]:
        losses, schedules = [], []
        for name in getattr(self.tuner, "active_adapters", []):
            config = self.tuner.peft_config.get(name)
            if config is None or not hasattr(config, "training_needs"):
                continue
            adapter_losses, adapter_schedules = config.training_needs()
            losses += [f"{type(config).__name__} {item}" for item in adapter_losses]
            schedules += [f"{type(config).__name__} {item}" for item in adapter_schedules]
        return losses, schedules

    @torch.compiler.disable  # reads the call stack (calls_in_progress), which dynamo does not trace
    def _before_forward(self, module: nn.Module, args: Any) -> None:
        if self.warned:
            return
        training = module.training and torch.is_grad_enabled()
        # records are per thread: a forward in another thread replaces nothing of the unread training forward's
        same_thread = threading.get_ident() == self.unread_thread
        if not (training or (self.aux_unread and same_thread)) or calls_in_progress(module) > 1:
            return
        losses, schedules = self._needs()
        if not training:
            # this forward replaces the records of a training forward whose auxiliary losses were never read
            if losses:
                self._warn(
                    "a forward of the model (a reference pass, an evaluation) started after a training forward and "
                    "before that forward's auxiliary losses were read, and replaces the records they come from: "
                    + "; ".join(losses)
                    + ". Read peft_depth.aux_losses(model) right after the training forward, as "
                    "peft_depth.DepthSFTTrainer does (a stock transformers Trainer / trl.SFTTrainer never reads them)."
                )
            return
        dropped = (losses if self.aux_unread else []) + (schedules if self.schedule_stalled else [])
        if dropped:
            self._warn(
                "this training loop drops what the depth adapter trains with besides the LM loss: "
                + "; ".join(dropped)
                + ". A stock transformers Trainer / trl.SFTTrainer does that. For a causal LM train with "
                "peft_depth.DepthSFTTrainer (a drop-in SFTTrainer); otherwise (a classifier, a custom loop) add "
                "sum(peft_depth.aux_losses(model).values()) to the loss and call "
                "peft_depth.trainer.set_training_step(model, step) every step (README, 'Other task types')."
            )
            return
        self.aux_unread = bool(losses)
        self.unread_thread = threading.get_ident()
        self.schedule_stalled = bool(schedules)

    def _warn(self, message: str) -> None:
        self.warned = True
        warnings.warn(f"peft-depth: {message}", UserWarning, stacklevel=3)

    def remove(self) -> None:
        self._handle.remove()


def install_aux_watch(tuner: Any) -> None:
    """Watch ``tuner`` (idempotent)."""
    if _ATTRIBUTE not in tuner.__dict__:
        tuner.__dict__[_ATTRIBUTE] = AuxReadWatch(tuner)


def remove_aux_watch(tuner: Any) -> None:
    watch = tuner.__dict__.pop(_ATTRIBUTE, None)
    if watch is not None:
        watch.remove()


def note_aux_read(source: Any) -> None:
    """The auxiliary losses of ``source``'s last forward were read."""
    watch = getattr(source, "__dict__", {}).get(_ATTRIBUTE)
    if watch is not None and watch.unread_thread in (None, threading.get_ident()):
        watch.aux_unread = False  # a read in another thread reads that thread's records, not the unread ones


def note_schedule_advanced(tuner: Any) -> None:
    """The training loop set ``tuner``'s training step."""
    watch = getattr(tuner, "__dict__", {}).get(_ATTRIBUTE)
    if watch is not None:
        watch.schedule_stalled = False
