"""DLO tuner: expands the layer stack, routes tokens past layers, and turns the routing into the router loss.

How the expansion lives inside a PEFT model
-------------------------------------------
The new layers are deep copies held by the tuner (``dlo_new_layers[adapter]["new<position>"]``) and the routers too
(``dlo_routers[adapter]["l<position>"]``). The model's registered ``nn.ModuleList`` of blocks is never changed, so
every base-model and LoRA state-dict key stays as it is. While an adapter is active, ``core.rewiring.StackRewiring``
shadows the stack attribute with the expanded order (``DLOBlock`` wrappers around routed layers), renumbers every
``layer_idx`` and updates ``config.num_hidden_layers`` / ``layer_types``; ``disable_adapter()`` removes the shadow,
which restores the original model exactly (indices and config included). peft operations that walk the model by
module name (injecting, unloading, deleting) run with the shadow removed, so names always mean the original layers.

What is saved
-------------
Routers, LoRA weights, and only those new-layer tensors that differ from what loading rebuilds from the base model
with the config's recipe (``expansion`` + ``init``). A freshly expanded zero-out layer saves nothing but its routers;
after training, its changed tensors are saved in full. ``init='random'`` layers cannot be rebuilt and are saved whole.

Quantized and half-precision bases
----------------------------------
A new layer copied from a bitsandbytes 4-bit / 8-bit layer is built from its dequantized weights, as plain linears in
the dtype the copied layer computes in (``core.rewiring.plain_layer_copy``): a full-precision layer's memory each
(202 M parameters for a Llama-2-7B layer, 0.75 GiB in float32), while the original layers stay quantized. Trained in
full, new layers are adapter weights: with peft's ``autocast_adapter_dtype=True`` (the default) they are kept in
float32 on a bf16/fp16 base, like the routers and every LoRA, and run in float32 behind a ``PrecisionBridge`` that
hands their output back in the stack's dtype. Merging into a quantized base is refused (``core.quantization``).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils.constants import DUMMY_TARGET_MODULES
from torch import nn

from ...core.aux import AuxLossTerm
from ...core.lora_layer import DepthLoraLayer
from ...core.output_capture import refuse_unrecorded_outputs
from ...core.rewiring import StackRewiring
from ...core.targets import ALL_PROJECTIONS_TARGET_MODULES_MAPPING
from ...core.trainability import requires_grad_kept
from ...core.tuner import DepthTuner
from .capacities import CapacitySchedule
from .config import DLOConfig
from .expansion import build_new_layers, build_routers, checked_layout, expanded_layout, initial_state
from .forward_state import DLOForwardState, DLORecord, read_forward_state
from .installation import StackInstallation
from .learning_rates import CapacityLearningRates
from .original_training import (
    check_lora_outside_trained_modules,
    trained_original_module_paths,
    unwrap_trained_modules,
)
from .router_loss import router_labels, router_loss
from .state_dict import AdapterStateDict
from .statistics import routing_summary

__all__ = ["DLOModel", "expanded_layout"]


class DLOModel(CapacitySchedule, CapacityLearningRates, StackInstallation, AdapterStateDict, DepthTuner):
    """Creates a DLO model (Dynamic Layer Operation, https://arxiv.org/abs/2407.11030) from a transformers model.

    Use through ``peft.get_peft_model(model, DLOConfig(...))`` after ``import peft_depth``.

    Training-time state the trainer drives (``capacities.CapacitySchedule``):

    - ``dlo_step`` / ``set_dlo_step(step)`` (alias ``set_training_step``, which ``DepthSFTTrainer`` calls before each
      micro-batch): the optimizer step that capacity annealing follows.
    - ``dlo_total_steps`` / ``set_dlo_total_steps(n)`` (alias ``set_training_total_steps``, called by the trainer):
      the run's length, for ``capacity_annealing_fraction``.
    - per-layer capacities set by ``loss_type='cos_global'`` after each training forward (read with
      ``dlo_layer_capacities()``); they take effect from the next forward, as in the official code.
    - with ``capacity_lr_scaling``: per-layer optimizer groups and their per-step learning-rate multipliers
      (``learning_rates.CapacityLearningRates``).

    Readers: ``peft_depth.aux_losses(model)["router"]`` (the BCE router loss of the last training forward) and
    ``peft_depth.routing_stats(model)["dlo"]`` (per-layer executed fraction of the last forward).

    The rest lives next door: building the new layers and routers (``expansion``), putting the expanded stack into
    the forward (``installation``), the router loss (``router_loss``), the statistics (``statistics``) and the saved
    keys (``state_dict``).
    """

    prefix: str = "dlo_"
    tuner_layer_cls = DepthLoraLayer
    target_module_mapping = ALL_PROJECTIONS_TARGET_MODULES_MAPPING
    tuner_module_names = ("dlo_new_layers", "dlo_routers")
    # the new layers are copies of quantized layers, dequantized from packed storage a meta build cannot read
    low_cpu_mem_usage_refused_for = ("8bit", "4bit")

    # ------------------------------------------------------------------ state

    @property
    def _dlo(self) -> dict[str, Any]:
        state = self.__dict__.get("_dlo_state")
        if state is None:
            state = {
                "layouts": {},  # adapter -> expanded layout
                "rewiring": None,
                "installed": None,  # adapter whose expansion is installed
                "blocks": [],
                "capacities": {},  # adapter -> {position: capacity} from cos_global
                "installation": 0,  # stamps each forward's records with the installation that wrote them
                "hook": None,
                "suspended": 0,
            }
            self.__dict__["_dlo_state"] = state
        return state

    @property
    def merge_refusal_reason(self) -> str | None:  # type: ignore[override]
        for name in self.active_adapters:
            config = self.peft_config.get(name)
            if isinstance(config, DLOConfig) and not config.is_dense:
                return (
                    "its routers decide per token which layers run, so the expanded model is not a fixed set of "
                    "weights. Only dense expansion (routed_layers='none', the LLaMA-Pro baseline) can be merged into a "
                    "plain transformers model; keep a routed DLO adapter unmerged."
                )
        return None

    # ------------------------------------------------------------------ injection

    def _prepare_adapter_config(self, peft_config: DLOConfig, model_config: dict) -> DLOConfig:
        if not peft_config.lora_on_originals:
            # No LoRA on the original layers: peft injects nothing (the stored config keeps its target_modules).
            return replace_config(peft_config, target_modules=DUMMY_TARGET_MODULES)
        return super()._prepare_adapter_config(peft_config, model_config)

    def _create_and_replace(
        self,
        config: DLOConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        self.inject_depth_lora(config, adapter_name, target, target_name, parent)

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        config: DLOConfig = self.peft_config[adapter_name]
        stack = self.layer_stack
        if stack is None:
            raise ValueError("DLO needs a model with a stack of transformer blocks; none was found in this model.")
        state = self._dlo
        first = state["rewiring"] is None
        originals = list(stack.layers) if first else state["rewiring"].original_blocks
        layout = checked_layout(config, originals, model)  # every check against the base, before anything is built
        saved_modules = self._declare_trained_original_modules(config, originals, model, stack.path)
        if first:
            state["rewiring"] = StackRewiring(model, stack)
            state["hook"] = model.register_forward_hook(self._after_forward)
        with self._rewiring_suspended():
            try:
                new_layers = build_new_layers(config, layout, originals, getattr(self.model, "_init_weights", None))
                self.ensure_tuner_module_dict("dlo_new_layers")[adapter_name] = new_layers
                routers = build_routers(config, layout, originals, self.model)
                self.ensure_tuner_module_dict("dlo_routers")[adapter_name] = routers
                state["layouts"][adapter_name] = layout
                super().inject_adapter(model, adapter_name, **kwargs)
            except Exception:
                config.modules_to_save = saved_modules
                self._drop_adapter_state(adapter_name)
                if first:
                    self._release_model()  # nothing of DLO stays on the caller's model
                raise
        self._sync_tuner_module_trainability()

    def marked_adapters(self) -> set[str]:
        return set(self._dlo["layouts"])

    def _declare_trained_original_modules(
        self, config: DLOConfig, originals: list[nn.Module], model: nn.Module, stack_path: str
    ) -> list[str] | None:
        """Add the full paths of the ``trained_original_modules`` to ``config.modules_to_save``, which peft then wraps
        as trained copies (``original_training``); returns the previous value, for a failed injection to restore."""
        previous = config.modules_to_save
        paths = trained_original_module_paths(config, originals, stack_path)
        if not paths:
            return previous
        if config.lora_on_originals:
            lora_view = self._prepare_adapter_config(replace_config(config), self.get_model_config(model))
            check_lora_outside_trained_modules(model, lora_view, paths)
        config.modules_to_save = list(dict.fromkeys([*(previous or []), *paths]))
        return previous

    def initial_new_layer_state(self, adapter_name: str, position: int) -> dict[str, torch.Tensor] | None:
        """State dict (plain keys) a new layer starts from, rebuilt from the current base weights; None if random."""
        config: DLOConfig = self.peft_config[adapter_name]
        kind, source = self._dlo["layouts"][adapter_name][position]
        if kind != "new":
            raise ValueError(f"Position {position} of adapter {adapter_name!r} is an original layer.")
        if config.init == "random":
            return None
        return initial_state(config, self._dlo["rewiring"].original_blocks, source)

    def _drop_adapter_state(self, adapter_name: str) -> None:
        for _, container in self.tuner_modules():
            if adapter_name in container:
                del container[adapter_name]
        self._dlo["layouts"].pop(adapter_name, None)

    # ------------------------------------------------------------------ trainability and dtype

    def _freeze_untrained_parts(self) -> None:
        new_layers = getattr(self, "dlo_new_layers", None)
        if new_layers is None:
            return
        for adapter_name, layers in new_layers.items():
            config = self.peft_config.get(adapter_name)
            if config is not None and config.new_layer_training == "lora":
                for name, param in layers.named_parameters():
                    if not name.endswith(("lora_A", "lora_B")):
                        param.requires_grad_(False)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # LoRA on the original layers: peft's usual upcast. What trains of the new layers (every weight with
        # new_layer_training='full', their LoRA with 'lora') and the routers are upcast like adapter weights; frozen
        # copies keep the base dtype, like the frozen base. A float32 new layer runs in float32 behind a
        # PrecisionBridge (installed by _reinstall), its output handed back in the stack's dtype.
        with requires_grad_kept(self):
            BaseTuner._cast_adapter_dtype(self, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        if autocast_adapter_dtype:
            self._upcast_trained_parts(adapter_name)
        self._finish_trl_reference_copy(adapter_name)

    def _upcast_trained_parts(self, adapter_name: str) -> None:
        config: DLOConfig = self.peft_config[adapter_name]
        tensors = []
        if adapter_name in getattr(self, "dlo_routers", {}):
            tensors += list(self.dlo_routers[adapter_name].parameters())
        if adapter_name in getattr(self, "dlo_new_layers", {}):
            new_layers = self.dlo_new_layers[adapter_name]
            if config.new_layer_training == "full":
                tensors += list(new_layers.parameters()) + list(new_layers.buffers())
            else:
                tensors += [p for n, p in new_layers.named_parameters() if n.endswith(("lora_A", "lora_B"))]
        cast = False
        for tensor in tensors:
            if tensor.dtype in (torch.float16, torch.bfloat16):
                tensor.data = tensor.data.float()
                cast = True
        if cast:
            self._reinstall()  # bridges the new layers that now run in another dtype than the stack

    # ------------------------------------------------------------------ peft operations that walk the model

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        self._refuse_restacking_inside_a_forward("enable_adapter_layers / disable_adapter")
        super()._enable_adapter_layers(enabled)
        self._reinstall()

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        self._refuse_restacking_inside_a_forward("set_adapter")
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._reinstall()

    def _refuse_restacking_inside_a_forward(self, what: str) -> None:
        # A forward of the model running in this thread (a reference pass from a layer hook) still iterates the
        # installed blocks: swapping the stack under it ran its remaining MLPs unrouted and lost its router loss.
        context = self.__dict__.get("routing_context")
        if context is not None and context.tracker.running_context() is not None:
            raise RuntimeError(
                f"DLO cannot {what} while a forward of this model is running (this is a call from inside that "
                "forward, e.g. from a layer hook): it runs the installed layer stack, which this would swap. Switch "
                "adapters before or after the forward."
            )

    def delete_adapter(self, adapter_name: str) -> None:
        with self._rewiring_suspended():
            super().delete_adapter(adapter_name)
            self._dlo["layouts"].pop(adapter_name, None)
            self._dlo["capacities"].pop(adapter_name, None)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        if merge:
            self._check_merge_allowed()
        adapter_name = self._active_dlo_adapter() if merge else None
        state = self._dlo
        state["suspended"] += 1  # stay uninstalled from here on
        self._uninstall()
        unwrap_trained_modules(self.model, merge=merge)  # trained copies of original modules (modules_to_save)
        model = super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        if merge and adapter_name is not None:
            self._make_expansion_permanent(adapter_name)
        self._release_model()
        return model

    def _release_model(self) -> None:
        """Take DLO's hooks off the model (the forward-context pre-hook and the router-loss hook) and forget the
        rewiring; the stack must already be uninstalled."""
        state = self._dlo
        if state["hook"] is not None:
            state["hook"].remove()
            state["hook"] = None
        state["rewiring"] = None
        if "routing_context" in self.__dict__:  # a cached_property: only remove what was made
            self.routing_context.tracker.remove()

    # ------------------------------------------------------------------ generation

    def _uncached_generation_reason(self) -> str | None:
        adapter = self._active_dlo_adapter()
        if adapter is None or not self.depth_adapters_enabled:
            return None
        config = self.peft_config[adapter]
        if config.routed_layers == "none":
            return None
        if config.skip_mode == "block":
            return "skip_mode='block' runs each routed layer's attention over its selected tokens only"
        if config.inference_selection == "capacity":
            return "inference_selection='capacity' executes a fraction of all the tokens of each forward"
        if self.model.training and any(c < 1.0 for c in self.dlo_layer_capacities(adapter).values()):
            # TRL's GRPO/RLOO generate in training mode: a cached step chose among its new tokens alone, so tokens
            # were sampled from another policy than the loss forward scores (log-probs up to 0.2 apart)
            return "in training mode executes the top `capacity` fraction (now below 1) of all the tokens of a forward"
        return None

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``model.generate``; without KV cache where DLO cannot keep one (``skip_mode='block'``, or
        ``inference_selection='capacity'``, whose choice is not causal), with a warning unless asked for."""
        reason = self._uncached_generation_reason()
        if reason is not None:
            if kwargs.get("use_cache", True):
                warnings.warn(
                    f"DLO {reason}, so no KV cache can be kept: generating with use_cache=False.",
                    UserWarning,
                    stacklevel=2,
                )
            kwargs["use_cache"] = False
        return self.model.generate(*args, **kwargs)

    # ------------------------------------------------------------------ after each forward: the router loss

    def _forward_state(self) -> DLOForwardState | None:
        """What the calling thread's last forward through the installed stack recorded (None: nothing yet)."""
        state = self._dlo
        if state["installed"] is None:
            return None
        return read_forward_state(self.routing_context.tracker.current, state["installation"])

    def _records(self) -> dict[int, DLORecord]:
        forward = self._forward_state()
        return {} if forward is None else dict(forward.records)

    # Eager under torch.compile: the labels depend on the optimizer step (a Python int, static to dynamo), so a
    # traced hook recompiled at every annealing step until dynamo's recompile limit, then ran eager with a warning.
    @torch.compiler.disable
    def _after_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        installed = self._dlo["installed"]
        if installed is not None:
            refuse_unrecorded_outputs(list(self.dlo_new_layers[installed].values()), output)
        forward = self._forward_state()
        if forward is None:
            return
        adapter_name = self._dlo["installed"]
        config: DLOConfig = self.peft_config[adapter_name]
        records = {
            p: r for p, r in forward.records.items() if r.training and r.cos is not None and r.logits.requires_grad
        }
        if not records or self.routing_context.loss_coefficient("router", config.router_loss_coef) == 0:
            return
        context = self.routing_context
        sync = context if context.syncing else None
        reduce = context.reduce_sum if sync is not None else None
        labels, capacities = router_labels(config, records, self.dlo_annealed_capacity(adapter_name), sync, reduce)
        if capacities is not None:
            # training state, not per forward: the next forward's capacities (training is single-threaded)
            self._dlo["capacities"][adapter_name] = capacities
        forward.router_loss = router_loss(records, labels, reduce)

    def depth_aux_terms(self) -> dict[str, AuxLossTerm]:
        forward = self._forward_state()
        if forward is None or forward.router_loss is None:
            return {}
        config: DLOConfig = self.peft_config[self._dlo["installed"]]
        return {"router": AuxLossTerm(forward.router_loss, float(config.router_loss_coef))}

    def depth_routing_stats(self) -> dict[str, Any]:
        records = self._records()
        if not records:
            return {}
        adapter_name = self._dlo["installed"]
        summary = routing_summary(
            records, self._dlo["layouts"][adapter_name], self.dlo_capacity_target(adapter_name), self.dlo_step
        )
        return {"dlo": {adapter_name: summary}}


def replace_config(config: DLOConfig, **changes: Any) -> DLOConfig:
    """A shallow copy of ``config`` with ``changes`` (no re-validation; used for peft-internal views)."""
    duplicate = copy.copy(config)
    for key, value in changes.items():
        object.__setattr__(duplicate, key, value)
    return duplicate
