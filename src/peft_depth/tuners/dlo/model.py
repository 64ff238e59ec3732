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
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTuner
from peft.utils.constants import DUMMY_TARGET_MODULES
from torch import nn

from ...core.aux import AuxLossTerm
from ...core.lora_layer import DepthLoraLayer
from ...core.rewiring import StackRewiring, plain_layer_copy, plain_state_dict
from ...core.targets import ALL_PROJECTIONS_TARGET_MODULES_MAPPING
from ...core.tuner import DepthTuner
from .config import DLOConfig, expansion_plan
from .layer import DLOBlock, DLORecord, NewLayerLoraLinear, find_mlp_and_norm
from .selection import select_top_fraction

__all__ = ["DLOModel", "expanded_layout"]

#: Output projections zeroed by init='zero_out' when `zero_out_modules` is not set (suffix match inside a layer).
DEFAULT_ZERO_OUT_MODULES = ("o_proj", "down_proj", "c_proj", "out_proj", "fc2", "dense_4h_to_h", "w2")
_NEW_KEY = re.compile(r"(^|\.)dlo_new_layers\.(?P<adapter>[^.]+)\.(?P<layer>new\d+)\.(?P<rest>.+)$")


def expanded_layout(plan: list[tuple[int, int]], num_layers: int) -> list[tuple[str, int]]:
    """The expanded stack as ``("orig", i)`` / ``("new", source)`` entries, new layers right after their anchor."""
    inserts: dict[int, list[int]] = defaultdict(list)
    for after, source in plan:
        inserts[after].append(source)
    layout: list[tuple[str, int]] = []
    for index in range(num_layers):
        layout.append(("orig", index))
        layout.extend(("new", source) for source in inserts[index])
    return layout


def _matches(module_path: str, names: list[str] | tuple[str, ...]) -> bool:
    return any(module_path == name or module_path.endswith("." + name) for name in names)


class DLOModel(DepthTuner):
    """Creates a DLO model (Dynamic Layer Operation, https://arxiv.org/abs/2407.11030) from a transformers model.

    Use through ``peft.get_peft_model(model, DLOConfig(...))`` after ``import peft_depth``.

    Training-time state the trainer drives:

    - ``dlo_step`` / ``set_dlo_step(step)`` (alias ``set_training_step``, which ``DepthSFTTrainer`` calls before each
      micro-batch): the optimizer step that capacity annealing follows.
    - per-layer capacities set by ``loss_type='cos_global'`` after each training forward (read with
      ``dlo_layer_capacities()``); they take effect from the next forward, as in the official code.

    Readers: ``peft_depth.aux_losses(model)["router"]`` (the BCE router loss of the last training forward) and
    ``peft_depth.routing_stats(model)["dlo"]`` (per-layer executed fraction of the last forward).
    """

    prefix: str = "dlo_"
    tuner_layer_cls = DepthLoraLayer
    target_module_mapping = ALL_PROJECTIONS_TARGET_MODULES_MAPPING
    tuner_module_names = ("dlo_new_layers", "dlo_routers")

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
                "loss": {},  # adapter -> router loss of the last training forward
                "hook": None,
                "suspended": 0,
            }
            self.__dict__["_dlo_state"] = state
        return state

    #: The optimizer step capacity annealing follows (set by the trainer, or by hand with ``set_dlo_step``).
    dlo_step: int = 0

    def set_dlo_step(self, step: int) -> None:
        """Tell DLO the number of optimizer steps done; the training capacity anneals from 1.0 along it."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"`step` must be an integer >= 0, got {step!r}.")
        self.dlo_step = step

    def set_training_step(self, step: int) -> None:
        """Hook called by ``DepthSFTTrainer`` before every training micro-batch (same as ``set_dlo_step``)."""
        self.set_dlo_step(int(step))

    def depth_checkpoint_state(self) -> dict[str, Any]:
        """Non-parameter training state a resume needs: the annealing step and the cos_global per-layer capacities."""
        return {
            "dlo_step": int(self.dlo_step),
            "capacities": {
                adapter: {str(position): float(c) for position, c in layers.items()}
                for adapter, layers in self._dlo["capacities"].items()
            },
        }

    def load_depth_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Restore what ``depth_checkpoint_state`` saved (JSON-style string keys back to layer positions)."""
        self.set_dlo_step(int(state.get("dlo_step", 0)))
        self._dlo["capacities"] = {
            adapter: {int(position): float(c) for position, c in layers.items()}
            for adapter, layers in state.get("capacities", {}).items()
        }

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
        if not peft_config.lora_on_original_layers:
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
        if state["rewiring"] is None:
            state["rewiring"] = StackRewiring(model, stack)
            state["hook"] = model.register_forward_hook(self._after_forward)
        rewiring: StackRewiring = state["rewiring"]
        originals = rewiring.original_blocks
        plan = expansion_plan(config.expansion, len(originals), config.expand_every, config.stack_range)
        layout = expanded_layout(plan, len(originals))
        if config.routed_layers != "none" and config.skip_mode == "mlp":
            find_mlp_and_norm(originals[0])  # ValueError before anything is built
        with self._rewiring_suspended():
            self._build_new_layers(adapter_name, config, layout, originals)
            self._build_routers(adapter_name, config, layout, originals)
            state["layouts"][adapter_name] = layout
            try:
                super().inject_adapter(model, adapter_name, **kwargs)
            except Exception:
                self._drop_adapter_state(adapter_name)
                raise
        self._sync_tuner_module_trainability()

    def marked_adapters(self) -> set[str]:
        return set(self._dlo["layouts"])

    def _hidden_size(self, originals: list[nn.Module]) -> int:
        config = getattr(self.model, "config", None)
        text_config = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
        hidden = getattr(text_config, "hidden_size", None) or getattr(text_config, "n_embd", None)
        if hidden is None:
            raise ValueError("DLO could not read the hidden size from the model config (`hidden_size`).")
        return int(hidden)

    def initial_new_layer_state(self, adapter_name: str, position: int) -> dict[str, torch.Tensor] | None:
        """State dict (plain keys) a new layer starts from, rebuilt from the current base weights; None if random."""
        config: DLOConfig = self.peft_config[adapter_name]
        kind, source = self._dlo["layouts"][adapter_name][position]
        if kind != "new":
            raise ValueError(f"Position {position} of adapter {adapter_name!r} is an original layer.")
        if config.init == "random":
            return None
        return _initial_state(config, self._dlo["rewiring"].original_blocks, source)

    def _build_new_layers(
        self, adapter_name: str, config: DLOConfig, layout: list[tuple[str, int]], originals: list[nn.Module]
    ) -> None:
        new_layers = nn.ModuleDict()
        for position, (kind, source) in enumerate(layout):
            if kind != "new":
                continue
            layer = plain_layer_copy(originals[source])
            if config.init == "random":
                self._random_init(layer)
            else:
                if config.init == "zero_out":
                    names = config.zero_out_modules or DEFAULT_ZERO_OUT_MODULES
                    if not any(_matches(n, names) for n, m in layer.named_modules() if isinstance(m, nn.Module) and n):
                        raise ValueError(
                            f"`zero_out_modules` ({list(names)}) matches no module of {type(layer).__name__}; name "
                            "its attention-output and MLP-down projections."
                        )
                # Built exactly as `initial_new_layer_state` rebuilds it when loading, so unchanged tensors need not
                # be saved.
                layer.load_state_dict(_initial_state(config, originals, source))
            if config.new_layer_training == "lora":
                self._wrap_new_layer_lora(layer, config)
            layer.train(originals[source].training)
            new_layers[f"new{position}"] = layer
        self.ensure_tuner_module_dict("dlo_new_layers")[adapter_name] = new_layers

    def _random_init(self, layer: nn.Module) -> None:
        init_weights = getattr(self.model, "_init_weights", None)
        for module in layer.modules():
            for param in module.parameters(recurse=False):
                # transformers skips modules it has marked as initialised (loaded from a checkpoint)
                param.__dict__.pop("_is_hf_initialized", None)
            module.__dict__.pop("_is_hf_initialized", None)
            if callable(init_weights):
                init_weights(module)
            elif hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def _wrap_new_layer_lora(self, layer: nn.Module, config: DLOConfig) -> None:
        targets = config.new_layer_target_modules
        for name, module in list(layer.named_modules()):
            if not isinstance(module, nn.Linear) or not name:
                continue
            if targets is not None and not _matches(name, targets):
                continue
            parent_name, _, child = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            wrapped = NewLayerLoraLinear(module, config.r, config.lora_alpha, config.lora_dropout)
            wrapped.to(module.weight.device)
            setattr(parent, child, wrapped)
        if not any(isinstance(m, NewLayerLoraLinear) for m in layer.modules()):
            raise ValueError(
                f"`new_layer_target_modules` ({targets}) matches no linear of the new layers; list some of their "
                "linear layers (e.g. q_proj, v_proj)."
            )

    def _build_routers(
        self, adapter_name: str, config: DLOConfig, layout: list[tuple[str, int]], originals: list[nn.Module]
    ) -> None:
        routers = nn.ModuleDict()
        if config.routed_layers != "none":
            hidden = self._hidden_size(originals)
            reference = next(originals[0].parameters())
            for position, (kind, _) in enumerate(layout):
                if config.routed_layers == "new" and kind != "new":
                    continue
                router = nn.Linear(hidden, 1, bias=False, device=reference.device, dtype=reference.dtype)
                nn.init.zeros_(router.weight)  # s = 0.5 for every token: a fresh adapter runs every layer
                router.train(originals[0].training)
                routers[f"l{position}"] = router
        self.ensure_tuner_module_dict("dlo_routers")[adapter_name] = routers

    def _drop_adapter_state(self, adapter_name: str) -> None:
        for _, container in self.tuner_modules():
            if adapter_name in container:
                del container[adapter_name]
        self._dlo["layouts"].pop(adapter_name, None)

    # ------------------------------------------------------------------ trainability and dtype

    def _sync_tuner_module_trainability(self) -> None:
        super()._sync_tuner_module_trainability()
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
        # LoRA on the original layers: peft's usual upcast. New layers keep the base dtype (they are whole decoder
        # layers and must run in the model's dtype); their LoRA and the routers are upcast like adapter weights.
        BaseTuner._cast_adapter_dtype(self, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        if not autocast_adapter_dtype:
            return
        params = []
        if adapter_name in getattr(self, "dlo_routers", {}):
            params += list(self.dlo_routers[adapter_name].parameters())
        if adapter_name in getattr(self, "dlo_new_layers", {}):
            params += [
                p for n, p in self.dlo_new_layers[adapter_name].named_parameters() if n.endswith(("lora_A", "lora_B"))
            ]
        for param in params:
            if param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.float()

    # ------------------------------------------------------------------ installing the expansion

    @contextlib.contextmanager
    def _rewiring_suspended(self) -> Iterator[None]:
        """Run with the original stack in place (peft walks the model by registered module names)."""
        state = self._dlo
        state["suspended"] += 1
        self._uninstall()
        try:
            yield
        finally:
            state["suspended"] -= 1
            self._reinstall()

    def _active_dlo_adapter(self) -> str | None:
        names = [n for n in self.active_adapters if n in self._dlo["layouts"]]
        if len(names) > 1:
            raise ValueError(
                f"DLO adapters {names} are active together, but each one defines its own layer stack; activate one "
                "DLO adapter at a time."
            )
        return names[0] if names else None

    def _uninstall(self) -> None:
        state = self._dlo
        for block in state["blocks"]:
            block.detach()
        state["blocks"] = []
        if state["rewiring"] is not None:
            state["rewiring"].uninstall()
        state["installed"] = None

    def _reinstall(self) -> None:
        state = self._dlo
        if state["suspended"] or state["rewiring"] is None:
            return
        self._uninstall()
        if not self.depth_adapters_enabled:
            return
        adapter_name = self._active_dlo_adapter()
        if adapter_name is None:
            return
        config: DLOConfig = self.peft_config[adapter_name]
        rewiring: StackRewiring = state["rewiring"]
        originals = rewiring.original_blocks
        new_layers = self.dlo_new_layers[adapter_name]
        routers = self.dlo_routers[adapter_name]
        blocks: list[nn.Module] = []
        sources: list[int] = []
        wrappers: list[DLOBlock] = []
        for position, (kind, source) in enumerate(state["layouts"][adapter_name]):
            layer = originals[source] if kind == "orig" else new_layers[f"new{position}"]
            if kind == "new":
                _install_output_capture(rewiring.parent, layer, f"{rewiring.stack.path}.{position}")
            router = routers[f"l{position}"] if f"l{position}" in routers else None
            if router is None and kind == "orig":
                blocks.append(layer)
            else:
                block = DLOBlock(
                    layer,
                    router,
                    position=position,
                    is_new=kind == "new",
                    skip_mode=config.skip_mode,
                    scale_gap=config.scale_gap,
                    context=self.routing_context,
                    owner=self,
                    adapter_name=adapter_name,
                    checkpoint_reference=originals[0],
                )
                block.attach()
                wrappers.append(block)
                blocks.append(block)
            sources.append(source)
        extra = {"use_cache": False} if config.skip_mode == "block" and config.routed_layers != "none" else None
        rewiring.install(blocks, sources, extra_config=extra)
        state["blocks"] = wrappers
        state["installed"] = adapter_name

    def dlo_layer_settings(self, adapter_name: str, position: int) -> tuple[float, bool, float | None]:
        """``(training capacity, whether router labels are wanted, eval capacity or None)`` of one routed layer."""
        config: DLOConfig = self.peft_config[adapter_name]
        capacity = self._dlo["capacities"].get(adapter_name, {}).get(position)
        if capacity is None or config.loss_type != "cos_global":
            capacity = config.capacity_at(self.dlo_step)
        inference = None
        if config.inference_selection == "capacity":
            inference = config.inference_capacity if config.inference_capacity is not None else config.capacity
        return capacity, config.router_loss_coef > 0, inference

    # ------------------------------------------------------------------ peft operations that walk the model

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        self._reinstall()

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._reinstall()

    def delete_adapter(self, adapter_name: str) -> None:
        previous = [name for name in self.active_adapters if name != adapter_name]
        with self._rewiring_suspended():
            super().delete_adapter(adapter_name)
            if not self.active_adapters and self.peft_config:
                # peft reads the new active adapter off the adapter layers; with r=0 DLO has none in the model
                remaining = [name for name in previous if name in self.peft_config] or list(self.peft_config)[:1]
                self.active_adapter = remaining[0] if len(remaining) == 1 else remaining
            self._dlo["layouts"].pop(adapter_name, None)
            self._dlo["capacities"].pop(adapter_name, None)
            self._dlo["loss"].pop(adapter_name, None)

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
        model = super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        if merge and adapter_name is not None:
            # Dense expansion becomes the model's real stack: new layers (LoRA merged in) registered in the ModuleList.
            rewiring: StackRewiring = state["rewiring"]
            blocks, sources = [], []
            for position, (kind, source) in enumerate(state["layouts"][adapter_name]):
                if kind == "orig":
                    blocks.append(rewiring.original_blocks[source])
                else:
                    layer = self.dlo_new_layers[adapter_name][f"new{position}"]
                    for name, module in list(layer.named_modules()):
                        if isinstance(module, NewLayerLoraLinear):
                            parent_name, _, child = name.rpartition(".")
                            parent = layer.get_submodule(parent_name) if parent_name else layer
                            setattr(parent, child, module.merged_linear())
                    blocks.append(layer)
                sources.append(source)
            rewiring.install(blocks, sources)
            rewiring.make_permanent()
        if state["hook"] is not None:
            state["hook"].remove()
            state["hook"] = None
        self.routing_context.tracker.remove()
        return model

    # ------------------------------------------------------------------ saving and loading

    @classmethod
    def _find_tuner(cls, model: nn.Module) -> DLOModel | None:
        for module in model.modules():
            if isinstance(module, DLOModel):
                return module
        return None

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """The adapter's keys are fixed by its config, never by tensor values: with ``new_layer_training='full'``
        every weight of the new layers is saved; with ``'lora'`` the frozen copies are left out (a load rebuilds them
        from the base model) and their LoRA is saved. A load then refuses any missing key."""
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        if config.new_layer_training == "full":
            return selected
        kept = {}
        for key, value in selected.items():
            match = _NEW_KEY.search(key)
            if match is not None and match.group("adapter") == adapter_name and "lora_" not in match.group("rest"):
                continue  # a frozen copy of an original layer: rebuilt from the base model on load
            kept[key] = value
        return kept

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        tuner = cls._find_tuner(model)
        if tuner is None or adapter_name not in getattr(tuner, "dlo_new_layers", {}):
            return remapped
        # Tensors left out of the checkpoint were rebuilt from the base model when the adapter was injected: load
        # them as they are, so that peft does not report them missing.
        own_prefix = next((n for n, m in model.named_modules() if m is tuner.dlo_new_layers[adapter_name]), None)
        if own_prefix is None:
            return remapped
        for name, tensor in tuner.dlo_new_layers[adapter_name].state_dict(keep_vars=True).items():
            key = f"{own_prefix}.{name}"
            if key not in remapped:
                remapped[key] = tensor.detach()
        return remapped

    # ------------------------------------------------------------------ after each forward: the router loss

    def _records(self) -> dict[int, DLORecord]:
        return {block.position: block.last_record for block in self._dlo["blocks"] if block.last_record is not None}

    def _after_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        state = self._dlo
        adapter_name = state["installed"]
        if adapter_name is None:
            return
        config: DLOConfig = self.peft_config[adapter_name]
        records = {
            p: r for p, r in self._records().items() if r.training and r.cos is not None and r.logits.requires_grad
        }
        if not records or config.router_loss_coef == 0:
            state["loss"].pop(adapter_name, None)
            return
        state["loss"][adapter_name] = self._router_loss(adapter_name, config, records)

    def _router_loss(self, adapter_name: str, config: DLOConfig, records: dict[int, DLORecord]) -> torch.Tensor:
        context = self.routing_context
        sync = context if context.syncing else None
        reduce = context.reduce_sum if sync is not None else None
        positions = sorted(records)
        labels: dict[int, torch.Tensor] = {}
        if config.loss_type == "cos":
            for position in positions:
                record = records[position]
                labels[position] = select_top_fraction(-record.cos, record.valid, record.capacity, sync)
        else:
            # One ranking over every (layer, token): the lowest cosine similarities overall are labelled "execute";
            # each layer's share becomes its capacity for the next forward.
            scores = torch.stack([-records[p].cos for p in positions])  # [layers, N]
            first_valid = records[positions[0]].valid
            valid = (
                torch.ones_like(scores, dtype=torch.bool)
                if first_valid is None
                else first_valid.unsqueeze(0).expand_as(scores)  # every layer sees the same tokens
            )
            chosen = select_top_fraction(scores, valid, config.capacity_at(self.dlo_step), sync)
            counts = torch.stack([chosen.sum(dim=1), valid.sum(dim=1)], dim=1).to(torch.float64)  # [layers, 2]
            if reduce is not None:
                counts = reduce(counts)
            capacities = {}
            for row, position in enumerate(positions):
                labels[position] = chosen[row]
                fraction = float(counts[row, 0] / counts[row, 1].clamp_min(1))
                capacities[position] = max(config.min_capacity, min(1.0, fraction))
            self._dlo["capacities"][adapter_name] = capacities
        losses = []
        for position in positions:
            record = records[position]
            target = labels[position].to(record.logits.dtype)
            per_token = F.binary_cross_entropy_with_logits(record.logits, target, reduction="none")
            if record.valid is not None:
                weight = record.valid.to(per_token.dtype)
                total, count = (per_token * weight).sum(), weight.sum()
            else:
                total = per_token.sum()
                count = torch.tensor(float(per_token.numel()), device=per_token.device)
            if reduce is not None:
                total, count = reduce(total), reduce(count.detach())
            losses.append(total / count.clamp_min(1))
        return torch.stack(losses).mean()

    def depth_aux_terms(self) -> dict[str, AuxLossTerm]:
        state = self._dlo
        adapter_name = state["installed"]
        if adapter_name is None or adapter_name not in state["loss"]:
            return {}
        config: DLOConfig = self.peft_config[adapter_name]
        return {"router": AuxLossTerm(state["loss"][adapter_name], float(config.router_loss_coef))}

    def depth_routing_stats(self) -> dict[str, Any]:
        state = self._dlo
        adapter_name = state["installed"]
        records = self._records()
        if adapter_name is None or not records:
            return {}
        config: DLOConfig = self.peft_config[adapter_name]
        layout = state["layouts"][adapter_name]
        rows = []
        executed_total, tokens_total = 0, 0
        for position in sorted(records):
            record = records[position]
            selected = record.selected
            if record.valid is not None:
                executed = int((selected & record.valid).sum())
                tokens = int(record.valid.sum())
                mean_score = float(torch.sigmoid(record.logits.detach())[record.valid].mean()) if tokens else 0.0
            else:
                executed, tokens = int(selected.sum()), selected.numel()
                mean_score = float(torch.sigmoid(record.logits.detach()).mean())
            executed_total += executed
            tokens_total += tokens
            rows.append(
                {
                    "layer": position,
                    "new": layout[position][0] == "new",
                    "num_tokens": tokens,
                    "executed_fraction": executed / tokens if tokens else 0.0,
                    "capacity": record.capacity if record.capacity is not None else float("nan"),
                    "mean_score": mean_score,
                }
            )
        summary = {
            "layers": rows,
            "executed_fraction": executed_total / tokens_total if tokens_total else 0.0,
            "capacity_target": config.capacity_at(self.dlo_step),
            "step": self.dlo_step,
        }
        return {"dlo": {adapter_name: summary}}

    # ------------------------------------------------------------------ helpers for users and the trainer

    def dlo_layer_capacities(self, adapter_name: str | None = None) -> dict[int, float]:
        """Training capacity each routed layer uses in the next forward."""
        adapter_name = adapter_name or self._active_dlo_adapter()
        if adapter_name is None:
            return {}
        return {
            int(key[1:]): self.dlo_layer_settings(adapter_name, int(key[1:]))[0]
            for key in self.dlo_routers[adapter_name]
        }

    def dlo_lr_multipliers(self, adapter_name: str | None = None) -> dict[int, float]:
        """Official dynamic LR: per routed layer, capacity_l + (1 − mean capacity)."""
        capacities = self.dlo_layer_capacities(adapter_name)
        if not capacities:
            return {}
        mean = sum(capacities.values()) / len(capacities)
        return {position: capacity + (1.0 - mean) for position, capacity in capacities.items()}

    def depth_optimizer_groups(self, base_lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """With ``capacity_lr_scaling``: one parameter group per routed layer (its router and, for a new layer, its
        weights) at ``base_lr`` × that layer's multiplier, taken when the optimizer is built."""
        adapter_name = self._active_dlo_adapter()
        if adapter_name is None or not self.peft_config[adapter_name].capacity_lr_scaling:
            return []
        multipliers = self.dlo_lr_multipliers(adapter_name)
        groups = []
        for position, multiplier in sorted(multipliers.items()):
            params = list(self.dlo_routers[adapter_name][f"l{position}"].parameters())
            key = f"new{position}"
            if key in self.dlo_new_layers[adapter_name]:
                params += list(self.dlo_new_layers[adapter_name][key].parameters())
            groups.append(
                {
                    "params": params,
                    "lr": base_lr * multiplier,
                    "weight_decay": weight_decay,
                    "name": f"dlo_layer_{position}",
                }
            )
        return groups


def replace_config(config: DLOConfig, **changes: Any) -> DLOConfig:
    """A shallow copy of ``config`` with ``changes`` (no re-validation; used for peft-internal views)."""
    duplicate = copy.copy(config)
    for key, value in changes.items():
        object.__setattr__(duplicate, key, value)
    return duplicate


def _initial_state(config: DLOConfig, originals: list[nn.Module], source: int) -> dict[str, torch.Tensor]:
    """What a new copy of ``originals[source]`` starts as (plain keys), computed the same way at build and at save."""
    state = plain_state_dict(originals[source])
    if config.init == "mean" and source > 0:
        previous = plain_state_dict(originals[source - 1])
        return {k: (v + previous[k]) / 2 if torch.is_floating_point(v) else v.clone() for k, v in state.items()}
    if config.init == "zero_out":
        names = config.zero_out_modules or DEFAULT_ZERO_OUT_MODULES
        return {k: torch.zeros_like(v) if _matches(k.rpartition(".")[0], names) else v for k, v in state.items()}
    return state


def _install_output_capture(backbone: nn.Module, layer: nn.Module, name: str) -> None:
    """Give a new layer the output-recording hooks transformers puts on the registered layers.

    transformers collects ``output_hidden_states`` / ``output_attentions`` through forward hooks it installs once on
    the modules registered in the model; the new layers live on the tuner, so they get the same hooks here.
    """
    if getattr(layer, "_dlo_output_capture", False):
        return
    try:
        from transformers.utils.output_capturing import (
            _CAN_RECORD_REGISTRY,
            OutputRecorder,
            recursively_install_hooks,
        )
    except ImportError:  # another transformers layout: hidden states of new layers are then not reported
        return
    tasks = []
    for key, specs in _CAN_RECORD_REGISTRY.get(backbone).items():
        for spec in specs if isinstance(specs, list) else [specs]:
            if not isinstance(spec, OutputRecorder):
                spec = OutputRecorder(
                    target_class=None if isinstance(spec, str) else spec,
                    index=0 if "hidden_states" in key else 1,
                    class_name=spec if isinstance(spec, str) else None,
                )
            tasks.append((key, spec))
    recursively_install_hooks(layer, name, tasks)
    layer._dlo_output_capture = True
