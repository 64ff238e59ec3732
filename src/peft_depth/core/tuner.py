"""What every peft-depth tuner shares on top of peft's ``BaseTuner``."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from functools import cached_property
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from .adapter_copy import TRL_SOURCE_ADAPTER, copies_trl_reference_adapter, copy_adapter
from .adapter_keys import adapter_key_prefixes, select_adapter_entries
from .adapter_placement import saved_tensors_take_placeholder_dtypes
from .aux import DepthAuxSource
from .aux_watch import install_aux_watch, remove_aux_watch
from .context import RoutingContext
from .distributed import refuse_deepspeed_zero3
from .layer_stack import LayerStack, find_layer_stack
from .lora_layer import DepthLoraLayer, DepthLoraLinear
from .offload import refuse_offloaded_base
from .quantization import check_merge_into_quantized, refuse_low_cpu_mem_usage_on
from .safety import AllocationBudget, adapter_allocation_limit, base_model_facts, check_base_model_facts
from .snapshot import ModelSnapshot
from .state_marker import install_state_marker, remove_state_marker
from .targets import check_targets_are_layers
from .trainability import requires_grad_kept

__all__ = ["DepthTuner"]


def check_adapter_name(adapter_name: Any) -> None:
    """An adapter name becomes a folder name on save (``save_pretrained`` writes ``<dir>/<name>``): it must be one
    plain path component, or a save writes outside the folder it was given."""
    ok = isinstance(adapter_name, str) and adapter_name not in ("", ".", "..")
    ok = ok and not any(sep in adapter_name for sep in ("/", "\\", os.sep, "\0")) and not os.path.isabs(adapter_name)
    if not ok:
        raise ValueError(
            f"Adapter name {adapter_name!r} is not allowed: it must be a non-empty name without path separators "
            "(not '.', '..' or an absolute path), since saving writes the adapter to a folder of that name."
        )


def _guard_injection(inject: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``inject_adapter``: check the base model against the config's recorded facts, then inject under an
    allocation budget, so that an untrusted config fails with a clear error before any module is created."""
    if getattr(inject, "_depth_guarded", False):
        return inject

    @functools.wraps(inject)
    def guarded(self: DepthTuner, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> Any:
        if self.__dict__.get("_depth_injecting"):  # a subclass override calling super(): guarded once, outermost
            return inject(self, model, adapter_name, *args, **kwargs)
        refuse_deepspeed_zero3(f"{type(self).__name__} adapter {adapter_name!r}")
        refuse_offloaded_base(model, f"{type(self).__name__} adapter {adapter_name!r}")
        # low_cpu_mem_usage reaches inject_adapter as a flag (add_adapter, load_adapter) or, for the first adapter of
        # PeftModel.from_pretrained, as accelerate's init_empty_weights around the tuner: new modules land on meta
        low_cpu_mem_usage = kwargs.get("low_cpu_mem_usage", args[1] if len(args) > 1 else False)
        refuse_low_cpu_mem_usage_on(
            model, self.low_cpu_mem_usage_refused_for, f"{type(self).__name__} adapter", low_cpu_mem_usage
        )
        facts = self.__dict__.get("_depth_base_model_facts")
        # The first injection (get_peft_model, PeftModel.from_pretrained) edits the caller's base model in place: if
        # it fails, the caller keeps the model exactly as it was (hooks, swapped layers, configs), whatever failed.
        snapshot = ModelSnapshot(model) if facts is None else None
        if facts is None:
            # First injection: the model is still the pristine base model (DLO changes the depth afterwards).
            facts = self.__dict__["_depth_base_model_facts"] = base_model_facts(model)
        check_adapter_name(adapter_name)
        config = self.peft_config.get(adapter_name)
        check_base_model_facts(getattr(config, "base_model_facts", None), facts, adapter_name=adapter_name)
        if config is not None:
            config.revalidate()  # fields set after the config was built get the constructor's checks
            config.check_against_base(model)
            check_targets_are_layers(model, config)
        budget = AllocationBudget(
            adapter_allocation_limit(model), what=f"{type(self).__name__} adapter {adapter_name!r}"
        )
        self.__dict__["_depth_injecting"] = True
        try:
            with budget:
                result = inject(self, model, adapter_name, *args, **kwargs)
            install_aux_watch(self)
            if copies_trl_reference_adapter(self.peft_config, adapter_name):
                # TRL then copies only names containing ".default.", which misses the ParameterDict weights (its
                # test does match the modules_to_save copies). Copied now and again after peft's dtype cast.
                copy_adapter(self, TRL_SOURCE_ADAPTER, adapter_name, include_modules_to_save=False)
                self.__dict__["_depth_pending_trl_copy"] = adapter_name
            return result
        except BaseException:
            if snapshot is not None:
                snapshot.restore()
            raise
        finally:
            self.__dict__["_depth_injecting"] = False

    guarded._depth_guarded = True
    return guarded


class DepthTuner(BaseTuner, DepthAuxSource):
    """Base class of the peft-depth tuners.

    Adds to ``BaseTuner``:

    - ``layer_stack``: the model's block stack, found once;
    - ``routing_context``: the padding mask of the current forward and cross-process syncing, shared with layers;
    - tuner-level modules: block-level methods keep gates, routers and norms on the tuner as ``nn.ModuleDict``s keyed
      by adapter name, listed in ``tuner_module_names``. peft's machinery only sees per-layer adapter weights, so this
      class keeps those modules' trainability in step with ``set_adapter``, ``disable_adapter``, ``delete_adapter``
      and dtype autocasting, and strips the adapter name from their state-dict keys (``<name>.<adapter>.x`` becomes
      ``<name>.x``) symmetrically on save and load;
    - a clear refusal to merge when the adapted function depends on the input (``merge_refusal_reason``).
    """

    #: Why this method cannot be merged into the base weights; ``None`` means merging is allowed.
    merge_refusal_reason: str | None = None
    #: bitsandbytes weight kinds ("8bit", "4bit") on which a ``low_cpu_mem_usage=True`` load is refused.
    low_cpu_mem_usage_refused_for: tuple[str, ...] = ("8bit",)
    #: Names of tuner-level ``nn.ModuleDict`` attributes keyed by adapter name (each must start with ``prefix``).
    tuner_module_names: tuple[str, ...] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # a low_cpu_mem_usage load assigns the saved tensors: they take the dtype a plain load would copy them into
        self.register_load_state_dict_pre_hook(saved_tensors_take_placeholder_dtypes)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Every method's own inject_adapter runs under the same guard (see _guard_injection).
        if "inject_adapter" in cls.__dict__:
            cls.inject_adapter = _guard_injection(cls.__dict__["inject_adapter"])

    @_guard_injection
    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        # present from the start: torch.compile guards the value of a key in a module's __dict__, not the absence of
        # one, so a model compiled before its first disable_adapter() kept running its adapters inside it
        self.__dict__.setdefault("_depth_adapters_disabled", False)
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        if self.tuner_module_names:
            # so that disable_adapter() / get_model_status() work when every weight lives on the tuner
            install_state_marker(self, model)

    def marked_adapters(self) -> set[str]:
        """Adapters held in tuner-level modules (what the state marker reports to peft as available)."""
        return {name for _, container in self.tuner_modules() for name in container.keys()}

    @property
    def base_model_facts(self) -> dict[str, Any] | None:
        """Architecture, model_type, depth and hidden size of the base model before any adapter was injected."""
        return self.__dict__.get("_depth_base_model_facts")

    @cached_property
    def layer_stack(self) -> LayerStack | None:
        return find_layer_stack(self.model)

    @cached_property
    def routing_context(self) -> RoutingContext:
        """Padding mask of the current forward and cross-process syncing, shared with every adapter layer."""
        return RoutingContext(self.model)

    @property
    def depth_adapters_enabled(self) -> bool:
        """False inside ``disable_adapter()``: block-level methods must then compute the base model exactly."""
        return not self.__dict__.get("_depth_adapters_disabled", False)

    # ------------------------------------------------------------------ tuner-level modules

    def tuner_modules(self) -> Iterator[tuple[str, nn.ModuleDict]]:
        for name in self.tuner_module_names:
            container = getattr(self, name, None)
            if isinstance(container, nn.ModuleDict):
                yield name, container

    def ensure_tuner_module_dict(self, name: str) -> nn.ModuleDict:
        """Return the tuner-level ``ModuleDict`` called ``name``, creating it on first use."""
        if name not in self.tuner_module_names:
            raise KeyError(f"{name!r} is not listed in {type(self).__name__}.tuner_module_names")
        if name not in self._modules:
            self.add_module(name, nn.ModuleDict())
        return self._modules[name]

    def _adapter_frozen(self, adapter_name: str) -> bool:
        """Whether ``adapter_name`` was asked to stay frozen: by its config's ``inference_mode`` (a load without
        ``is_trainable``) until ``set_adapter`` or ``set_requires_grad`` say otherwise, as they do for peft's layers."""
        frozen = self.__dict__.get("_depth_frozen_adapters", {})
        if adapter_name in frozen:
            return frozen[adapter_name]
        config = self.peft_config.get(adapter_name)
        return config is not None and bool(config.inference_mode)

    def _record_frozen(self, adapter_names: str | Sequence[str], frozen: bool) -> None:
        if self.__dict__.get("_depth_injecting"):
            # peft's inject_adapter re-applies the active adapters with the *new* adapter's inference_mode; that is
            # no request about the active ones (peft restores their parameters' flags right after)
            return
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self.__dict__.setdefault("_depth_frozen_adapters", {}).update(dict.fromkeys(names, frozen))

    def _sync_tuner_module_trainability(self) -> None:
        active = set(self.active_adapters)
        for _, container in self.tuner_modules():
            for adapter_name, module in container.items():
                trainable = (
                    adapter_name in active and self.depth_adapters_enabled and not self._adapter_frozen(adapter_name)
                )
                module.requires_grad_(trainable)
        self._freeze_untrained_parts()

    def _freeze_untrained_parts(self) -> None:
        """Refreeze what a method keeps frozen inside its tuner-level modules (DLO's copied weights under LoRA)."""

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        self._sync_tuner_module_trainability()

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        # as peft's layers do: the adapters named become trainable unless inference_mode (an adapter loaded without
        # is_trainable and then activated trains whole, its gates, ensembles, new layers and routers included)
        self._record_frozen(adapter_name, inference_mode)
        self._sync_tuner_module_trainability()

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        self.__dict__["_depth_adapters_disabled"] = not enabled
        self._sync_tuner_module_trainability()

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        self._record_frozen(adapter_names, not requires_grad)
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for _, container in self.tuner_modules():
            for name in names & set(container.keys()):
                container[name].requires_grad_(requires_grad)
        self._freeze_untrained_parts()

    def delete_adapter(self, adapter_name: str) -> None:
        was_active = adapter_name in self.active_adapters
        survivors = [name for name in self.active_adapters if name != adapter_name]
        trainable = {name: param.requires_grad for name, param in self.model.named_parameters()}
        super().delete_adapter(adapter_name)
        for _, container in self.tuner_modules():
            if adapter_name in container:
                del container[adapter_name]
        self.__dict__.get("_depth_frozen_adapters", {}).pop(adapter_name, None)
        if self.__dict__.get("_depth_pending_trl_copy") == adapter_name:
            del self.__dict__["_depth_pending_trl_copy"]
        self._restore_active_adapters(adapter_name, was_active, survivors, trainable)
        self._sync_tuner_module_trainability()

    def _restore_active_adapters(
        self, deleted: str, was_active: bool, survivors: list[str], trainable: dict[str, bool]
    ) -> None:
        """Keep the adapters that were active (or, when the deleted one was, peft's choice: the first remaining name
        in sorted order) active.

        peft reads the new active adapters off the first adapter layer it finds in the model, skipping module names
        that contain the tuner's prefix. An adapter that keeps all its weights on the tuner (MoD or DLO with ``r=0``)
        has no such layer: peft then deactivates every adapter, ``modules_to_save`` wrappers included, so the model
        silently ran as the base (or, when the active adapter was deleted, kept a dangling name).
        """
        if not self.peft_config:
            return
        if not survivors and was_active:
            if self.active_adapters:  # peft's adapter layers chose (and warned)
                survivors = list(self.active_adapters)
            else:  # no adapter layer to choose: peft's rule (BaseTunerLayer._all_available_adapter_names)
                survivors = sorted(self.peft_config)[:1]
                warnings.warn(
                    f"Adapter {deleted} was active which is now deleted. Setting active adapter to {survivors[0]}.",
                    stacklevel=4,
                )
        if not survivors or (self.active_adapters == survivors and not self._wrappers_lost(survivors)):
            return
        frozen = dict(self.__dict__.get("_depth_frozen_adapters", {}))
        self.set_adapter(survivors[0] if len(survivors) == 1 else survivors)
        self.__dict__["_depth_frozen_adapters"] = frozen  # a restoration, not a request to train the survivors
        if not was_active:
            # deleting an inactive adapter changes no adapter's trainability (peft's set_adapter would)
            for name, param in self.model.named_parameters():
                if name in trainable:
                    param.requires_grad_(trainable[name])

    def _wrappers_lost(self, survivors: list[str]) -> bool:
        """Whether a ``modules_to_save`` wrapper holding an active adapter was switched off by peft's deletion."""
        for module in self.model.modules():
            if isinstance(module, AuxiliaryTrainingWrapper) and not module.active_adapters:
                if any(name in getattr(module, "modules_to_save", {}) for name in survivors):
                    return True
        return False

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        with requires_grad_kept(self):
            super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        if autocast_adapter_dtype:
            # as peft does for layer adapters: keep half-precision adapter weights in float32 for stable training
            for _, container in self.tuner_modules():
                if adapter_name in container:
                    for param in container[adapter_name].parameters():
                        if param.dtype in (torch.float16, torch.bfloat16):
                            param.data = param.data.float()
        self._finish_trl_reference_copy(adapter_name)

    def _finish_trl_reference_copy(self, adapter_name: str) -> None:
        """Copy TRL's reference adapter again once peft has upcast it (``add_adapter`` casts after injecting): the
        copy made at injection went into half-precision tensors on a bf16/fp16 base, and the upcast kept the
        rounded values (MoLA's DPO loss at step 0 read 0.689, not ln 2)."""
        if self.__dict__.get("_depth_pending_trl_copy") != adapter_name:
            return
        del self.__dict__["_depth_pending_trl_copy"]
        # still the adapter TRL added (a flag left by a failed add_adapter must not copy into a later one)
        if adapter_name in self.peft_config and self.peft_config[adapter_name] is self.peft_config.get(
            TRL_SOURCE_ADAPTER
        ):
            copy_adapter(self, TRL_SOURCE_ADAPTER, adapter_name, include_modules_to_save=False)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        # peft hands over a state dict already filtered by substrings of the other adapters' names, which can drop
        # this adapter's own entries (core.adapter_keys); when it is the model's own, take the unfiltered one.
        full = model.state_dict()
        if set(state_dict) <= set(full):
            state_dict = {key: state_dict.get(key, value) for key, value in full.items()}
        selected = select_adapter_entries(
            state_dict, adapter_key_prefixes(model, adapter_name, cls.tuner_module_names)
        )
        selected.update(cls._get_learnable_bias_state_dict(model, state_dict, config))
        return selected

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        for name in cls.tuner_module_names:
            pattern = rf"(^|\.){re.escape(name)}\.{re.escape(adapter_name)}(\.|$)"
            if re.search(pattern, key):
                return re.sub(pattern, rf"\g<1>{name}\g<2>", key, count=1).rstrip(".")
        return super()._remove_adapter_name_from_key(key, adapter_name)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        super()._replace_module(parent, child_name, new_module, child)
        # New adapter modules are born in training mode; a model wrapped while in eval() must stay in eval (else
        # adapter dropout silently runs at inference).
        new_module.train(child.training)

    def inject_depth_lora(
        self, config, adapter_name: str, target: nn.Module, target_name: str, parent: nn.Module
    ) -> None:
        """Put a plain LoRA (``DepthLoraLinear``, config fields r, lora_alpha, ...) on ``target``.

        The shared ``_create_and_replace`` body of the methods that carry LoRA next to their block-level machinery.
        """
        update_kwargs = dict(
            r=config.r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            init_lora_weights=config.init_lora_weights,
            inference_mode=config.inference_mode,
        )
        if isinstance(target, DepthLoraLayer):
            target.update_layer(adapter_name, **update_kwargs)
            return
        new_module = DepthLoraLinear(target, adapter_name, **update_kwargs)
        if adapter_name not in self.active_adapters:
            # an additional adapter is not trainable until it is activated
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    # ------------------------------------------------------------------ merging

    def _check_merge_allowed(self) -> None:
        if self.merge_refusal_reason is not None:
            raise ValueError(f"{type(self).__name__} adapters cannot be merged: {self.merge_refusal_reason}")
        check_merge_into_quantized(self.model, f"A {type(self).__name__} adapter")
        super()._check_merge_allowed()

    def merging_adapters(self) -> list[str]:
        """The adapters a merge in progress folds in (its ``adapter_names``), else the active ones: what a merge
        refusal must look at, not every adapter the model holds."""
        return list(self.__dict__.get("_depth_merging") or self.active_adapters)

    @contextlib.contextmanager
    def _merging(self, adapter_names: Sequence[str] | None) -> Iterator[None]:
        self.__dict__["_depth_merging"] = [adapter_names] if isinstance(adapter_names, str) else adapter_names
        try:
            yield
        finally:
            self.__dict__.pop("_depth_merging", None)

    def _unload_and_optionally_merge(self, merge: bool = True, *args: Any, **kwargs: Any) -> nn.Module:
        # peft's signature: (merge, progressbar, safe_merge, adapter_names)
        adapter_names = kwargs.get("adapter_names", args[2] if len(args) > 2 else None)
        with self._merging(adapter_names):
            model = super()._unload_and_optionally_merge(merge, *args, **kwargs)
        remove_state_marker(self, model)
        remove_aux_watch(self)
        context = self.__dict__.get("routing_context")  # only if made; reading the property would make one
        if context is not None:
            context.tracker.remove()  # its pre-hook sits on the base model, which is handed back
        return model

    def merge_adapter(self, adapter_names=None, safe_merge: bool = False) -> None:
        with self._merging(adapter_names):
            self._check_merge_allowed()
            super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        # Without this, peft's attribute fall-through reached the base model and raised "'LlamaForCausalLM' object
        # has no attribute 'add_weighted_adapter'", which reads as a broken install rather than a refusal.
        raise NotImplementedError(
            f"add_weighted_adapter is a LoRA operation (a new LoRA from a weighted sum of LoRA factors); "
            f"{type(self).__name__} adapters hold routers, gates or layers that no weighted sum combines. "
            "Switch between adapters with set_adapter, or train one adapter on the combined data."
        )
