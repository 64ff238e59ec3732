"""MoLEx tuner: LoRA on every block plus a routed mixture of each MoLEx layer with another layer of the model."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from ...core.layer_call import bind_block_call
from ...core.layer_stack import attends_causally, text_config
from ...core.lora_layer import DepthLoraLayer
from ...core.quantization import floating_parameter
from ...core.tuner import DepthTuner
from .config import MoLExConfig
from .layer import SHARED_GATE_KEY, MoLExAlpha, build_gate, layer_key
from .mixing import MoLExMixing
from .routing import LayerRecord
from .statistics import MoLExStatistics, generates

__all__ = ["MoLExModel"]

#: Key of MoLEx's records in a forward context's state.
_STATE_KEY = "molex"


@dataclass
class _AdapterPlan:
    """Resolved per-adapter layout: which blocks mix, their candidate experts, α."""

    molex_layers: list[int]
    candidates: dict[int, list[int]]  # MoLEx layer -> candidate expert layers
    candidate_masks: dict[int, torch.Tensor]  # MoLEx layer -> [L] bool
    alpha: float
    causal: bool


class _BlockForward:
    """Installed as ``block.forward`` of every MoLEx layer: runs the mixture, or the plain block when not routing.

    Replacing the instance's ``forward`` (rather than the module in the stack) keeps the model tree, state-dict keys,
    ``layer_types`` lookups and transformers' ``output_hidden_states`` hooks (which see the mixed output once) as they
    are. The expert block is called through its original ``forward``, so its own hooks do not record it as a layer.
    """

    def __init__(self, tuner: MoLExModel, index: int) -> None:
        self.tuner = tuner
        self.index = index

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.tuner._block_forward(self.index, args, kwargs)


class MoLExModel(MoLExMixing, MoLExStatistics, DepthTuner):
    """Creates a MoLEx model from a pretrained transformers model (https://arxiv.org/abs/2503.11144).

    Use through ``peft.get_peft_model(model, MoLExConfig(...))`` after ``import peft_depth``.

    Routing statistics of the last forward (``peft_depth.routing_stats``) are under ``"molex"``: per adapter, one row
    per MoLEx layer with the chosen expert(s), expert fractions, mean gate probabilities, α and the balance loss.
    Gates and α have their own optimizer group (``depth_optimizer_groups``; lr ``gate_lr``, ``gate_weight_decay``).
    """

    prefix: str = "molex_"
    tuner_layer_cls = DepthLoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    tuner_module_names = ("molex_gate", "molex_alpha")
    merge_refusal_reason = (
        "each MoLEx layer mixes its output with another layer chosen by a gate from the input, so the adapted model "
        "is not the base model plus a fixed weight delta. Keep the adapter unmerged."
    )

    # ------------------------------------------------------------------ injection

    @property
    def _plans(self) -> dict[str, _AdapterPlan]:
        return self.__dict__.setdefault("_molex_plans", {})

    @property
    def _records(self) -> dict[str, dict[int, LayerRecord]]:
        """Per adapter and MoLEx layer, the records of this thread's last forward (``core.forward_context``)."""
        return self.routing_context.forward.state.setdefault(_STATE_KEY, {})

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        config: MoLExConfig = self.peft_config[adapter_name]
        stack = self.layer_stack
        if stack is None:
            raise ValueError(
                "MoLEx mixes transformer blocks, but no block stack (e.g. `model.layers`, `transformer.h`, "
                "`encoder.layer`) was found in this model."
            )
        plan = self._build_plan(config, stack.layers)
        # created now, so that its padding-mask hook sees the very first forward
        _ = self.routing_context
        super().inject_adapter(model, adapter_name, **kwargs)
        self._create_tuner_modules(adapter_name, config, plan)
        self._plans[adapter_name] = plan
        self._install_block_forwards()

    def _build_plan(self, config: MoLExConfig, layers: nn.ModuleList) -> _AdapterPlan:
        num_layers = len(layers)
        causal = attends_causally(layers)
        if not causal and generates(self.model):
            raise ValueError(
                f"MoLEx: {type(self.model).__name__} generates text, but its layers do not declare causal attention "
                "(an ALiBi decoder such as BLOOM or MPT passes its position bias per call): MoLEx would treat it as an "
                "encoder and run expert layers without that bias. Supported: decoders whose attention declares "
                "`is_causal` (Llama, Qwen, Mistral, Gemma, GPT-2, ...) and encoders (BERT, RoBERTa)."
            )
        molex_layers, expert_layers = config.resolve_layers(num_layers, causal=causal)
        layer_types = getattr(text_config(self.model), "layer_types", None)
        if layer_types is not None and len(layer_types) != num_layers:
            layer_types = None
        candidates, masks = {}, {}
        device = next(layers[0].parameters()).device
        for i in molex_layers:
            allowed = [j for j in expert_layers if layer_types is None or layer_types[j] == layer_types[i]]
            if not allowed:
                raise ValueError(
                    f"MoLEx layer {i} has no candidate experts: `expert_layers` {expert_layers} holds no layer of its "
                    f"type {layer_types[i]!r} (only layers of the same `layer_types` entry can be mixed)."
                )
            candidates[i] = allowed
            mask = torch.zeros(num_layers, dtype=torch.bool, device=device)
            mask[allowed] = True
            masks[i] = mask
        return _AdapterPlan(
            molex_layers=molex_layers,
            candidates=candidates,
            candidate_masks=masks,
            alpha=config.resolve_alpha(causal=causal),
            causal=causal,
        )

    def _create_tuner_modules(self, adapter_name: str, config: MoLExConfig, plan: _AdapterPlan) -> None:
        layers = self.layer_stack.layers
        # a floating parameter: a quantized weight's dtype (uint8) is storage, not the dtype the block computes in
        reference = floating_parameter(layers[0])
        if reference is None:
            raise ValueError(
                f"MoLEx could not tell the dtype the blocks compute in: {type(layers[0]).__name__} has no floating-point "
                "parameter outside quantized weights and adapters."
            )
        hidden_size = getattr(text_config(self.model), "hidden_size", None)
        if hidden_size is None:
            raise ValueError("MoLEx needs `config.hidden_size` to size its gates.")
        keys = [SHARED_GATE_KEY] if config.shared_gate else [layer_key(i) for i in plan.molex_layers]
        gates = nn.ModuleDict(
            {key: build_gate(config.gate_type, hidden_size, len(layers), config.gate_proj_dim) for key in keys}
        )
        self.ensure_tuner_module_dict("molex_gate")[adapter_name] = _placed(gates, reference, self.model.training)
        if config.learn_alpha:
            alpha = MoLExAlpha(plan.molex_layers, plan.alpha, shared=config.shared_alpha)
            self.ensure_tuner_module_dict("molex_alpha")[adapter_name] = _placed(alpha, reference, self.model.training)
        # an added adapter trains only once it is activated
        trainable = adapter_name in self.active_adapters and not config.inference_mode
        for _, container in self.tuner_modules():
            if adapter_name in container:
                container[adapter_name].requires_grad_(trainable)

    def _create_and_replace(
        self,
        config: MoLExConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        self.inject_depth_lora(config, adapter_name, target, target_name, parent)

    # ------------------------------------------------------------------ block forwards

    def _install_block_forwards(self) -> None:
        """Wrap exactly the blocks that are MoLEx layers of some adapter; unwrap the others."""
        wanted = {i for plan in self._plans.values() for i in plan.molex_layers}
        for index, block in enumerate(self.layer_stack.layers):
            installed = isinstance(block.__dict__.get("forward"), _BlockForward)
            if index in wanted and not installed:
                # keep whatever forward the block had (its class's, or one accelerate installed on the instance)
                block.__dict__["_molex_original_forward"] = block.__dict__.get("forward")
                block.forward = _BlockForward(self, index)
            elif index not in wanted and installed:
                self._uninstall_block(block)

    @staticmethod
    def _uninstall_block(block: nn.Module) -> None:
        original = block.__dict__.pop("_molex_original_forward", None)
        del block.__dict__["forward"]
        if original is not None:
            block.__dict__["forward"] = original

    def _original_forward(self, index: int):
        block = self.layer_stack.layers[index]
        original = block.__dict__.get("_molex_original_forward")
        if original is not None:
            return original
        current = block.__dict__.get("forward")
        if current is not None and not isinstance(current, _BlockForward):
            return current
        # A function of the block, not ``block.forward``: a bound method of a module's ``forward`` is traced by
        # torch.compile as a call to the instance's ``forward`` attribute, which is this wrapper (infinite recursion).
        return functools.partial(type(block).forward, block)

    def _routing_adapter(self) -> str | None:
        if not self.depth_adapters_enabled:
            return None
        active = [name for name in self.active_adapters if name in self._plans]
        if len(active) > 1:
            raise ValueError(
                f"MoLEx routes with one adapter's gates at a time, but {active} are active; activate one of them with "
                "`set_adapter`."
            )
        return active[0] if active else None

    def _block_forward(self, index: int, args: tuple, kwargs: dict[str, Any]) -> Any:
        original = self._original_forward(index)
        adapter = self._routing_adapter()
        if adapter is None or index not in self._plans[adapter].candidates:
            return original(*args, **kwargs)
        call = bind_block_call(self.layer_stack.layers[index], original, args, kwargs)
        return self._mix(adapter, index, original, call)

    # ------------------------------------------------------------------ generation

    def _needs_uncached_generation(self) -> bool:
        adapter = self._routing_adapter()
        return adapter is not None and self.peft_config[adapter].routing != "token"

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``model.generate``; without KV cache for ``"batch_vote"`` / ``"sequence"`` routing (not causal)."""
        if self._needs_uncached_generation():
            if kwargs.get("use_cache", True):
                warnings.warn(
                    "MoLEx routing='batch_vote'/'sequence' chooses each layer's expert from all tokens, so a KV cache "
                    "would freeze choices that later tokens change: generating with use_cache=False. Use "
                    "routing='token' for cached generation.",
                    UserWarning,
                    stacklevel=2,
                )
            kwargs["use_cache"] = False
        return self.model.generate(*args, **kwargs)

    # ------------------------------------------------------------------ unloading

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge:
            self._check_merge_allowed()
        model = super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        for block in self.layer_stack.layers:
            if isinstance(block.__dict__.get("forward"), _BlockForward):
                self._uninstall_block(block)
        return model

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._plans.pop(adapter_name, None)
        self._records.pop(adapter_name, None)
        self._install_block_forwards()


# ---------------------------------------------------------------------- helpers


def _placed(module: nn.Module, reference: torch.Tensor, training: bool) -> nn.Module:
    """``module`` in the base model's dtype and device, in its train/eval mode.

    Under ``low_cpu_mem_usage`` peft creates adapter modules on the meta device and assigns the loaded tensors
    afterwards; meta tensors cannot be copied to a device, so they only get the dtype here.
    """
    module.to(dtype=reference.dtype)
    if not any(p.device.type == "meta" for p in module.parameters()):
        module.to(device=reference.device)
    return module.train(training)
