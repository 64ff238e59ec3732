"""MoD tuner: the late-layer ensemble wired into a causal LM with module hooks, plus optional LoRA.

How a forward runs (all per adapter that is active; nothing happens inside ``disable_adapter()``):

1. A forward pre-hook on the top-level model records what the backbone never sees: ``labels`` / ``shift_labels``
   (which positions the distillation uses), the KV-cache length (the sequence router's running state), whether
   TRL's fused LM head is used, and ``logits_to_keep``.
2. Forward hooks on the K−1 earlier late blocks keep their output hidden states h_l for this forward.
3. A forward hook on the final norm, whose output is N_L(h_L), replaces that output with
   ``N_L(h_L) + g · Σ_l w_l (N_l(h_l) − N_L(h_L))`` (logit-space mixing through a linear head is exactly mixing the
   normalised states before one head projection). Every consumer of ``last_hidden_state`` (the model's own LM head,
   ``logits_to_keep``, generate, TRL's fused LM head) therefore sees the ensemble. The same hook computes the
   distillation loss through the frozen head in chunks (``distill.py``) and the routing record
   (``ensemble_head.py``); the sequence router's running mean is in ``sequence_router.py``.
4. For ``mix_space="log_probs"`` step 3 leaves the state alone and a forward hook on the LM head adds
   ``g · Σ_l w_l (log_softmax(z_l) − log_softmax(z_L))`` to its logits.

Everything a forward keeps between these hooks, and its records, lives in that forward's ``ForwardContext``
(``forward_state.py``), never on the tuner: concurrent inference on one model equals serial inference, and
``routing_stats`` / ``aux_losses`` read the calling thread's last forward.

Final-logit soft-capping (Gemma 2/3) and other post-head logit transforms act on the mixed logits, because mixing
happens before the head; the distillation compares soft-capped per-layer logits.

Which positions are distilled: the model never receives labels inside the backbone, so the pre-hook reads the
``labels`` keyword of the top-level call (causal shift: position t counts when ``labels[t+1] != -100``), or
``shift_labels`` when given pre-shifted (TRL under context parallelism). Without labels it uses the real tokens of
the attention mask. The loss is computed in training mode, or in eval mode when labels are passed; plain inference
(eval, no labels: scoring, generate) skips it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.constants import DUMMY_TARGET_MODULES
from torch import nn

from ...core.aux import AuxLossTerm
from ...core.cache_state import attach_state, attached_states
from ...core.forward_context import outside_labels
from ...core.layer_call import output_cache
from ...core.lora_layer import DepthLoraLayer
from ...core.targets import ALL_PROJECTIONS_TARGET_MODULES_MAPPING
from ...core.tuner import DepthTuner
from .base_parts import final_logit_multiplier, final_logit_softcap, find_base_parts
from .config import MoDConfig
from .ensemble_head import PendingLogProbMix, distill_mask, log_prob_mix, make_record, mix_delta, route
from .forward_state import CallInfo, MoDForwardState, MoDRecord, begin_forward_state, forward_state
from .layer import MoDEnsemble
from .optimizer_groups import ensembles_of, mod_optimizer_groups
from .sequence_router import segment_starts, sequence_router_input

__all__ = ["MoDModel"]

_ENSEMBLE = "mod_ensemble"


class MoDModel(DepthTuner):
    """Creates a MoD model from a pretrained causal LM (https://arxiv.org/abs/2410.13077).

    Use through ``peft.get_peft_model(model, MoDConfig(...))`` after ``import peft_depth``. The distillation loss is
    read with ``peft_depth.aux_losses(model)`` (key ``"distill"``; ``"distill.<adapter>"`` when several adapters are
    active) and the routing weights with ``peft_depth.routing_stats(model)["mod"][adapter]``: ``layers`` (the K block
    indices), ``mean_weight`` (router weight per late layer, averaged over real tokens), ``final_layer_weight``,
    ``gate``, ``num_tokens`` (the real tokens averaged over), ``nonfinite_rows`` (real tokens, or sequences for
    ``router_granularity="sequence"``, whose routing scores were NaN or infinite: they took the base path and are not
    in the averages; see ``ensemble_head``), and when the distillation ran ``distill_kl`` (per earlier late layer),
    ``distill_kl_sum`` and ``distill_positions``. Both read the calling thread's last forward.
    """

    prefix: str = "mod_"
    tuner_layer_cls = DepthLoraLayer
    target_module_mapping = ALL_PROJECTIONS_TARGET_MODULES_MAPPING
    tuner_module_names = (_ENSEMBLE,)
    merge_refusal_reason = (
        "the MoD ensemble is extra computation after the backbone (new norms on earlier layers' hidden states, a "
        "router and a gate), not a weight delta, so it cannot be folded into the base weights. Keep the adapter "
        "unmerged for inference (it costs one LM-head projection, like the base model); `unload()` removes it."
    )

    # ------------------------------------------------------------------ injection

    def _prepare_adapter_config(self, peft_config: MoDConfig, model_config: dict) -> MoDConfig:
        if not peft_config.uses_lora:
            # MoD alone: nothing to inject per layer. peft's dummy target lets inject_adapter run its bookkeeping
            # (trainability, modules_to_save) without matching a module; the stored config keeps the user's value.
            prepared = copy.copy(peft_config)
            prepared.target_modules = DUMMY_TARGET_MODULES
            return prepared
        return super()._prepare_adapter_config(peft_config, model_config)

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        config: MoDConfig = self.peft_config[adapter_name]
        # The fields were checked against this model (config.check_against_base, run by DepthTuner's injection guard
        # before this method): from here on nothing can fail for a reason the config or the model could have told.
        parts = find_base_parts(model)
        stack, final_norm, head = parts.stack, parts.final_norm, parts.head
        self.routing_context  # noqa: B018 - install the padding-mask tracker before our hooks run
        layer_indices = list(range(stack.num_layers - config.num_late_layers, stack.num_layers))
        ensemble = MoDEnsemble(
            final_norm,
            layer_indices,
            head.in_features,
            granularity=config.router_granularity,
            temperature=config.router_temperature,
            gate_init=config.gate_init,
            dtype=head.weight.dtype,
            device=head.weight.device,
        )
        ensemble.train(model.training)
        container = self.ensure_tuner_module_dict(_ENSEMBLE)
        container.training = model.training  # the dict itself is born in training mode
        container[adapter_name] = ensemble
        try:
            super().inject_adapter(model, adapter_name, **kwargs)
        except Exception:
            del container[adapter_name]
            if not container:  # the first adapter failed: the caller's model keeps no tracker hook either
                self._release_forward_tracking()
            raise
        self._install_hooks(model, stack, final_norm, head, layer_indices)

    def _create_and_replace(
        self,
        config: MoDConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        if head is not None and target is head:
            raise ValueError(
                f"`target_modules` matches the output head `{current_key}`: MoD shares the frozen LM head across the "
                "late layers (and the final layer is the teacher), so it cannot carry LoRA. Exclude it."
            )
        self.inject_depth_lora(config, adapter_name, target, target_name, parent)

    def _install_hooks(
        self, model: nn.Module, stack, final_norm: nn.Module, head: nn.Module, layer_indices: list[int]
    ) -> None:
        handles: dict[str, Any] = self.__dict__.setdefault("_mod_handles", {})
        if "call" not in handles:
            handles["call"] = model.register_forward_pre_hook(self._record_call, with_kwargs=True)
            handles["cache"] = model.register_forward_hook(self._attach_sequence_state)
            handles["norm"] = final_norm.register_forward_hook(self._mix_hook)
            handles["head"] = head.register_forward_hook(self._log_prob_mix_hook)
        for index in layer_indices[:-1]:
            key = f"block{index}"
            if key not in handles:
                handles[key] = stack.layers[index].register_forward_hook(self._capture_hook(index))

    def _remove_hooks(self) -> None:
        for handle in self.__dict__.pop("_mod_handles", {}).values():
            handle.remove()

    def _release_forward_tracking(self) -> None:
        """Take the per-forward context's pre-hook off the model (``routing_context`` is made again on next use)."""
        context = self.__dict__.pop("routing_context", None)
        if context is not None:
            context.tracker.remove()

    def _unload_and_optionally_merge(self, merge: bool = True, *args: Any, **kwargs: Any) -> nn.Module:
        if merge:
            self._check_merge_allowed()
        model = super()._unload_and_optionally_merge(merge, *args, **kwargs)
        # the base model goes back exactly as it came: no MoD hook, no forward-context hook, and no statistics left
        self._remove_hooks()
        self._release_forward_tracking()
        return model

    # ------------------------------------------------------------------ hooks

    def _frozen_head(self) -> nn.Linear:
        head = self.model.get_output_embeddings()
        return head.get_base_layer() if isinstance(head, BaseTunerLayer) else head

    def _active_ensembles(self) -> list[tuple[str, MoDEnsemble]]:
        if not self.depth_adapters_enabled:
            return []
        container = self._modules.get(_ENSEMBLE)
        if container is None:
            return []
        return [(name, container[name]) for name in self.active_adapters if name in container]

    @property
    def needs_full_logits(self) -> bool:
        """True while an active ensemble mixes log-probabilities: its mix is applied to the LM head's logits, so
        ``DepthSFTTrainer`` must compute the LM loss from the model's own logits, not TRL's fused LM head."""
        return any(self.peft_config[name].mix_space == "log_probs" for name, _ in self._active_ensembles())

    def _record_call(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        # the cache by what it is (its keyword was renamed in transformers 5.24): ``core.forward_context`` made it
        forward = self.routing_context.forward
        labels, shift_labels = kwargs.get("labels"), kwargs.get("shift_labels")
        if labels is None and shift_labels is None:
            labels = outside_labels()  # DepthSFTTrainer's full-logits loss calls the model without them
        info = CallInfo(
            labels=labels,
            shift_labels=shift_labels,
            past_length=forward.past_length,
            cache=forward.cache,
            fused_lm_head=bool(kwargs.get("fused_lm_head", False)),
            logits_to_keep=kwargs.get("logits_to_keep", 0),
            position_ids=kwargs.get("position_ids"),
        )
        log_prob_adapters = [
            name for name, _ in self._active_ensembles() if self.peft_config[name].mix_space == "log_probs"
        ]
        if log_prob_adapters and info.fused_lm_head:
            raise ValueError(
                f"MoD adapter(s) {log_prob_adapters} mix in log-probability space, which needs the model's own LM-head "
                "call, but this forward uses TRL's fused LM head (it never materialises logits). Use "
                "`mix_space`='logits' (exact and faster) or turn the fused head off."
            )
        if log_prob_adapters and isinstance(info.logits_to_keep, torch.Tensor):
            raise ValueError(
                "MoD `mix_space`='log_probs' supports an int `logits_to_keep` only (it must know which positions the "
                "LM head receives); use `mix_space`='logits' for index tensors."
            )
        begin_forward_state(forward, info)

    def _forward_state(self) -> MoDForwardState | None:
        """MoD's state of this thread's latest forward of the model (None after ``unload()``)."""
        # not ``self.routing_context``: reading statistics after unload() must not hook the model again
        context = self.__dict__.get("routing_context")
        return None if context is None else forward_state(context.forward)

    @property
    def _sequence_state_key(self) -> tuple[str, int]:
        # per tuner: a cache filled by another model's MoD must not pass for ours (an int survives deepcopy)
        return ("mod_sequence_router", id(self))

    def _attach_sequence_state(self, module: nn.Module, args: tuple, output: Any) -> None:
        """A cache created inside the forward (``use_cache=True`` without ``past_key_values``) gets the sequence
        router's state of that forward, so that the next forward can continue it."""
        state = self._forward_state()
        pending = None if state is None else state.pending_sequence_state
        if pending is None:
            return
        state.pending_sequence_state = None
        cache = output_cache(output)
        if cache is not None and self._sequence_state_key not in attached_states(cache):
            attach_state(cache, self._sequence_state_key, pending)

    def _capture_hook(self, index: int) -> _CaptureBlockOutput:
        return _CaptureBlockOutput(self, index)

    def _mix_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        # a final norm called outside a model forward gets a state of its own (and fails below if MoD is active)
        state = self._forward_state() or begin_forward_state(self.routing_context.forward, CallInfo())
        captured, state.captured = state.captured or {}, None
        info = state.call
        state.records, state.pending_log_probs = {}, None
        ensembles = self._active_ensembles()
        if not ensembles:
            return None
        mix_spaces = {self.peft_config[name].mix_space for name, _ in ensembles}
        if len(mix_spaces) > 1:
            raise ValueError(
                "Active MoD adapters mix in different spaces (`mix_space` 'logits' and 'log_probs'); activate adapters "
                "with the same `mix_space` together."
            )
        base = output
        batch, seq = base.shape[0], base.shape[1]
        for name, ensemble in ensembles:
            for index in ensemble.earlier_layers:
                hidden = captured.get(index)
                if hidden is None or hidden.shape[:2] != base.shape[:2]:
                    raise RuntimeError(
                        f"MoD adapter {name!r} did not see block {index}'s output in this forward (was the final norm "
                        "called outside the model's forward?)."
                    )
        flat_mask = self.routing_context.flat_mask(base.shape)
        mask = None if flat_mask is None else flat_mask.view(batch, seq)
        granularities = {self.peft_config[name].router_granularity for name, _ in ensembles}
        sequence_input = None
        if "sequence" in granularities:
            starts = segment_starts(info.position_ids, batch, seq)
            sequence_input, pending_state = sequence_router_input(
                base, mask, info.cache, info.past_length, self._sequence_state_key, starts
            )
            state.pending_sequence_state = pending_state
        distilled = distill_mask(info, mask, batch, seq, self.model.training, base.device)
        head = self._frozen_head()
        logit_transform = (final_logit_multiplier(self.model), final_logit_softcap(self.model))
        records: dict[str, MoDRecord] = {}
        reduce = self.routing_context.reduce_sum if self.routing_context.syncing else None
        pending = []
        delta_total = None
        for name, ensemble in ensembles:
            config: MoDConfig = self.peft_config[name]
            states = ensemble.normalised_states(captured)  # [K-1, B, T, d]
            router_input = {"token": base, "sequence": sequence_input, "static": None}[config.router_granularity]
            where = f"MoD adapter {name!r} (router over layers {ensemble.layer_indices})"
            weights, nonfinite = route(ensemble, router_input, (batch, seq), config.nonfinite_routing, where)
            if config.mix_space == "logits":
                delta = mix_delta(states, base, weights, ensemble.gate, nonfinite)
                delta_total = delta if delta_total is None else delta_total + delta
            else:
                pending.append(PendingLogProbMix(states, weights, ensemble.gate, nonfinite))
            distill_coef = self.routing_context.loss_coefficient("distill", config.distill_loss_coef)
            records[name] = make_record(
                ensemble,
                config,
                states,
                base,
                weights,
                nonfinite,
                mask,
                distilled,
                head,
                logit_transform,
                distill_coef,
                reduce,
                subsample=self.model.training,
            )
        state.pending_log_probs = pending or None
        state.records = records
        if delta_total is None:
            return None
        return (base.to(delta_total.dtype) + delta_total).to(base.dtype)

    def _log_prob_mix_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        state = self._forward_state()
        pending = None if state is None else state.pending_log_probs
        if not pending:
            return None
        state.pending_log_probs = None
        return log_prob_mix(module, args[0], output, pending)

    # ------------------------------------------------------------------ aux losses and statistics

    def _records(self) -> dict[str, MoDRecord]:
        state = self._forward_state()
        return {} if state is None else state.records

    def depth_aux_terms(self) -> dict[str, AuxLossTerm]:
        records = {name: rec for name, rec in self._records().items() if rec.distill_loss is not None}
        terms = {}
        for name, record in records.items():
            key = "distill" if len(records) == 1 else f"distill.{name}"
            terms[key] = AuxLossTerm(record.distill_loss, float(self.peft_config[name].distill_loss_coef))
        return terms

    def depth_optimizer_groups(self, base_lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """The gate and router/norm groups of adapters that set ``gate_lr`` / ``router_lr`` (``optimizer_groups``)."""
        return mod_optimizer_groups(
            ensembles_of(self._modules.get(_ENSEMBLE)), self.peft_config, base_lr, weight_decay
        )

    def depth_routing_stats(self) -> dict[str, Any]:
        report = {name: record.as_stats() for name, record in self._records().items()}
        return {"mod": report} if report else {}


class _CaptureBlockOutput:
    """Forward hook of a late block: keeps its output for the ensemble in the current forward's state.

    An object rather than a closure: ``copy.deepcopy(peft_model)`` copies it with the model, pointing at the copy's
    tuner (a closure is copied as the same function, so the copy's blocks fed the original's state and the copy's
    forward failed).
    """

    def __init__(self, tuner: MoDModel, index: int) -> None:
        self.tuner = tuner
        self.index = index

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        state = self.tuner._forward_state()
        if state is not None and state.captured is not None:  # None: recomputation after the forward
            state.captured[self.index] = output[0] if isinstance(output, (tuple, list)) else output
