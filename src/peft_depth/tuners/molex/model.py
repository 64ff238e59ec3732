"""MoLEx tuner: LoRA on every block plus a routed mixture of each MoLEx layer with another layer of the model."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from ...core.distributed import calls_on_every_process, fsdp_gathered
from ...core.layer_call import BlockCall, bind_block_call
from ...core.lora_layer import DepthLoraLayer
from ...core.nonfinite import check_routing_scores
from ...core.quantization import floating_parameter
from ...core.tuner import DepthTuner
from .config import MoLExConfig
from .expert_cache import expert_cache_state
from .layer import SHARED_GATE_KEY, MoLExAlpha, build_gate, layer_key
from .routing import LayerRecord, MoLExDecision, decide, layer_statistics
from .statistics import MoLExStatistics

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


def _is_causal(stack_layers: nn.ModuleList) -> bool:
    """Whether the blocks attend causally (decoder), read from the attention modules' ``is_causal`` flags."""
    return any(getattr(module, "is_causal", False) is True for module in stack_layers[0].modules())


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


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


class MoLExModel(MoLExStatistics, DepthTuner):
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
        causal = _is_causal(layers)
        molex_layers, expert_layers = config.resolve_layers(num_layers, causal=causal)
        text_config = _text_config(self.model)
        layer_types = getattr(text_config, "layer_types", None)
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
        hidden_size = getattr(_text_config(self.model), "hidden_size", None)
        if hidden_size is None:
            raise ValueError("MoLEx needs `config.hidden_size` to size its gates.")
        keys = [SHARED_GATE_KEY] if config.shared_gate else [layer_key(i) for i in plan.molex_layers]
        gates = nn.ModuleDict(
            {key: build_gate(config.gate_type, hidden_size, len(layers), config.gate_proj_dim) for key in keys}
        )
        self.ensure_tuner_module_dict("molex_gate")[adapter_name] = _placed(gates, reference, self.model.training)
        if config.learn_alpha:
            alpha = MoLExAlpha(plan.molex_layers, plan.alpha)
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

    def _mix(self, adapter: str, index: int, original, call: BlockCall) -> Any:
        """Block ``index``'s output mixed with the expert layer its gate picks: ``α·u_i + (1−α)·u_j``."""
        config: MoLExConfig = self.peft_config[adapter]
        self._check_cache_allowed(config, call, index)
        decision = self._route(adapter, index, call.hidden)
        # Expert calls must never write the model's cache: without token routing they get none; with it, each
        # expert pass (index, j) gets its own slot in a side cache.
        expert_state = None
        if config.routing == "token" and call.cache is not None:
            key = (id(self), adapter, index)
            expert_state = expert_cache_state(call.cache, key, _text_config(self.model), call.past_length(index))
        own = original(call.hidden, **call.arguments)
        own_hidden = _first(own)
        # Sharded blocks: every process also runs the layers only other processes chose (their shards are gathered
        # collectively), and mixes as one process holding all rows would.
        experts = calls_on_every_process(self.layer_stack.layers, decision.experts, call.hidden.device)
        other = self._expert_outputs(index, call, decision, experts, own_hidden, expert_state)
        if expert_state is not None:
            expert_state.append(call.hidden, call.arguments)
        mixed, alpha = self._combine(adapter, index, own_hidden, other, decision, experts)
        self._record(adapter, index, decision, alpha)
        return (mixed, *own[1:]) if isinstance(own, tuple) else mixed

    @staticmethod
    def _check_cache_allowed(config: MoLExConfig, call: BlockCall, index: int) -> None:
        if config.routing != "token" and call.cache is not None and call.past_length(index) > 0:
            raise ValueError(
                f"MoLEx routing={config.routing!r} chooses the expert from all tokens of the input, so it cannot "
                "continue from a KV cache (the choice would change with every new token). Generate with "
                "`use_cache=False` (PeftModel.generate does this for you), or use routing='token'."
            )

    def _route(self, adapter: str, index: int, hidden: torch.Tensor) -> MoLExDecision:
        """The gate's decision for the tokens of block ``index`` (non-finite scores handled by the config's policy)."""
        config: MoLExConfig = self.peft_config[adapter]
        gates = self.molex_gate[adapter]
        gate = gates[SHARED_GATE_KEY] if config.shared_gate else gates[layer_key(index)]
        logits = gate(hidden.reshape(-1, hidden.shape[-1]))
        nonfinite = check_routing_scores(logits, config.nonfinite_routing, f"MoLEx adapter {adapter!r}, layer {index}")
        return decide(
            logits,
            self._plans[adapter].candidate_masks[index].to(logits.device),
            config.routing,
            (hidden.shape[0], hidden.shape[1]),
            self.routing_context.flat_mask(hidden.shape),
            nonfinite,
            index,
            self.routing_context,
        )

    def _expert_outputs(self, index, call: BlockCall, decision: MoLExDecision, experts, own_hidden, expert_state):
        """``u_j`` per token: the output of the expert layer it chose (its own output where it chose block ``index``).

        One pass per layer of ``experts`` (the distinct chosen layers; with sharded blocks, those of every process);
        with per-sequence choices, a layer only runs on the rows that chose it.
        """
        batch, seq = call.hidden.shape[0], call.hidden.shape[1]
        other = own_hidden
        layers = self.layer_stack.layers
        for j in experts:
            if j == index:
                continue
            # block j's own forward, past its hooks (it is no layer of this forward), but with its FSDP shards gathered
            expert_forward = fsdp_gathered(layers[j], self._original_forward(j))
            rows = None if decision.row_choice is None else decision.row_choice == j
            if expert_state is not None:
                out_j = self._run_expert_with_cache(expert_forward, j, call, expert_state)
            elif rows is not None and 0 < int(rows.sum()) < batch:
                out_j = _run_on_rows(expert_forward, call.hidden, call.without_cache(), rows)
                other = torch.where(rows.view(batch, 1, 1), out_j, other)
                continue
            else:
                out_j = _first(expert_forward(call.hidden, **call.without_cache()))
            selected = (decision.chosen == j).view(batch, seq, 1)
            other = torch.where(selected, out_j.to(other.dtype), other)
        return other

    def _combine(self, adapter: str, index: int, own_hidden, other, decision: MoLExDecision, experts: list[int]):
        """``(α·u_i + (1−α)·u_j, α)``; tokens on the base path keep ``u_i`` exactly."""
        config: MoLExConfig = self.peft_config[adapter]
        batch, seq = own_hidden.shape[0], own_hidden.shape[1]
        if config.learn_alpha:
            alpha = self.molex_alpha[adapter](index)
        else:
            alpha = torch.tensor(self._plans[adapter].alpha, device=own_hidden.device)
        mixes = any(j != index for j in experts)
        if config.straight_through_gate:
            # forward value unchanged (ratio 1), gradient of the chosen probability reaches the gate
            chosen_prob = decision.probs.gather(1, decision.chosen[:, None])
            detached = chosen_prob.detach()
            ratio = torch.where(detached > 0, chosen_prob / detached.clamp_min(1e-30), torch.ones_like(detached))
            other = other * ratio.view(batch, seq, 1).to(other.dtype)
            mixes = True
        if not mixes:
            # every token chose its own layer: α·u_i + (1−α)·u_i is u_i, computed once
            return own_hidden, alpha
        alpha_cast = alpha.to(own_hidden.dtype)
        mixed = alpha_cast * own_hidden + (1 - alpha_cast) * other
        return torch.where(decision.base_path.view(batch, seq, 1), own_hidden, mixed), alpha

    def _record(self, adapter: str, index: int, decision: MoLExDecision, alpha: torch.Tensor) -> None:
        """Keep this layer's statistics in this thread's forward context (published last: gradient-checkpoint
        recomputation may stop part-way through a forward)."""
        config: MoLExConfig = self.peft_config[adapter]
        prob_sums, counts, num_tokens = layer_statistics(decision)
        if config.routing == "batch_vote":
            chosen: int | list[int] = decision.experts[0]
        elif config.routing == "sequence":
            chosen = decision.row_choice.tolist()
        else:
            chosen = [j for j in decision.experts if counts[j] > 0]
        record = LayerRecord(
            prob_sums=prob_sums,
            counts=counts,
            num_tokens=num_tokens,
            num_candidates=len(self._plans[adapter].candidates[index]),
            alpha=float(alpha.detach()),
            chosen=chosen,
            base_path=decision.base_path,
        )
        records = self._records
        records[adapter] = {**records.get(adapter, {}), index: record}

    @staticmethod
    def _run_expert_with_cache(expert_forward, j: int, call: BlockCall, state) -> torch.Tensor:
        """Block j on the call's input with its own side-cache slot, after catching up on positions it has not seen."""
        expert_kwargs = call.with_cache(state.cache)
        seen = state.cache.get_seq_length(j)
        if seen < state.past_length:
            caught = state.catch_up_kwargs(seen, state.past_length, expert_kwargs)
            expert_forward(state.inputs[:, seen:], **caught)
        return _first(expert_forward(call.hidden, **expert_kwargs))

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


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _run_on_rows(forward, hidden: torch.Tensor, kwargs: dict[str, Any], rows: torch.Tensor) -> torch.Tensor:
    """Run ``forward`` on the selected sequences only and scatter back (other rows: zeros, overwritten by caller)."""
    batch = hidden.shape[0]
    index = rows.nonzero().squeeze(-1)

    def select(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == batch:
            return value.index_select(0, index)
        if isinstance(value, tuple):
            return tuple(select(v) for v in value)
        return value

    out = _first(forward(hidden.index_select(0, index), **{k: select(v) for k, v in kwargs.items()}))
    full = torch.zeros_like(hidden, dtype=out.dtype)
    return full.index_copy(0, index, out)
