"""DLO's routed block and the LoRA of new layers.

A routed layer of the expanded stack is a ``DLOBlock`` around the decoder layer (original or new). The block scores
each token's residual stream with its router, decides which tokens execute, and hands that *plan* to the layer:
with ``skip_mode='mlp'`` to the shadows it installs on the decoder layer's MLP branch for the duration of DLO
(``mlp_branch``), with ``skip_mode='block'`` to ``block_skip``.

The shadows are shared by every forward; the plan is not. It belongs to the block's call in progress on the calling
thread (``forward_state.running_plan``), also when checkpointing replays the layer in backward, so concurrent
forwards never see each other's plans.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from ...core.context import RoutingContext
from ...core.distributed import sharded_across_processes, sharded_by_fsdp
from ...core.layer_call import bind_block_call
from ...core.low_rank import init_low_rank, low_rank_delta
from ...core.nonfinite import check_routing_scores
from .block_skip import as_layer_output, forward_block_skip
from .delegating import Delegating
from .forward_state import (
    DLORecord,
    RoutingPlan,
    carry_plans_into_checkpointing,
    read_forward_state,
    running_plan,
    running_plan_of,
    stop_carrying_plans,
    write_forward_state,
)
from .mlp_branch import BranchOutputGate, MLPBranch, ResidualTap, SkipMLP, find_branch_output, find_mlp_branch
from .selection import select_top_fraction

__all__ = [
    "BranchOutputGate",
    "DLOBlock",
    "DLORecord",
    "MLPBranch",
    "NewLayerLoraLinear",
    "ResidualTap",
    "RoutingPlan",
    "SkipMLP",
    "find_mlp_branch",
]

#: Why fully_shard refuses a DLOBlock, and what to shard instead.
SHARDED_BLOCK_MESSAGE = (
    "fully_shard was applied to a DLOBlock, DLO's routing wrapper around a decoder layer: while a DLO adapter is "
    "active, the model's layer list (e.g. `model.model.layers`) is the expanded stack of these wrappers and the new "
    "layers, rebuilt on every set_adapter / disable_adapter, so FSDP would shard a module the model no longer runs "
    "and the registered layer inside would be sharded twice. Shard the decoder layers themselves, found by class as "
    "accelerate's TRANSFORMER_BASED_WRAP does, which reaches DLO's inserted layers too: `for module in "
    "model.modules(): if isinstance(module, LlamaDecoderLayer): fully_shard(module)`, then `fully_shard(model)`. "
    "The layers inside the wrappers are sharded by now: build the model again."
)

#: Why skip_mode='block' stops when the layer is sharded over processes.
SHARDED_BLOCK_SKIP_MESSAGE = (
    "skip_mode='block' runs the layer once, twice or not at all, depending on which of this process's tokens its "
    "router selected, but FSDP2 gathers the layer's shards with a collective that every process must join equally "
    "often (the processes would deadlock or crash). Train with skip_mode='mlp' (the default) under FSDP2, or with "
    "skip_mode='block' under DDP."
)


class NewLayerLoraLinear(nn.Module):
    """A frozen copied linear plus a trainable LoRA (``new_layer_training='lora'``): ``W x + B A dropout(x) · α/r``.

    Lives inside a new layer, which already belongs to one adapter, so it holds a single LoRA (no adapter dicts).
    """

    def __init__(self, base_layer: nn.Linear, r: int, lora_alpha: float, lora_dropout: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.scaling = lora_alpha / r
        self.dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        weight = base_layer.weight
        lora_A = torch.empty(r, base_layer.in_features, device=weight.device)
        lora_B = torch.empty(base_layer.out_features, r, device=weight.device)
        init_low_rank(lora_A, lora_B, r, zero_B=True)
        # in the copied linear's dtype, as peft builds a LoRA: the tuner's _cast_adapter_dtype upcasts it to float32
        # under autocast_adapter_dtype, and without it the LoRA stays in the base's half precision
        dtype = weight.dtype if weight.dtype.is_floating_point else None
        self.lora_A = nn.Parameter(lora_A.to(dtype))
        self.lora_B = nn.Parameter(lora_B.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        flat = x.reshape(-1, self.base_layer.in_features).to(self.lora_A.dtype)
        delta = low_rank_delta(flat, self.lora_A, self.lora_B, self.scaling, self.dropout)
        return result + delta.view(result.shape).to(result.dtype)

    def merged_linear(self) -> nn.Linear:
        """The base linear with the LoRA update added to its weight."""
        base = self.base_layer
        with torch.no_grad():
            delta = (self.lora_B @ self.lora_A) * self.scaling
            base.weight.data = base.weight.data + delta.to(base.weight.dtype)
        return base


def gather_indices(chosen: torch.Tensor, base_path: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(chosen positions, base-path positions)`` of ``[N]`` masks, each ascending; ``(None, None)`` when every
    token runs. One device sync (the two counts), as the gather needs sizes."""
    num_chosen, num_base = (int(n) for n in torch.stack([chosen.sum(), (base_path & ~chosen).sum()]).tolist())
    if num_chosen + num_base == chosen.numel():
        return None, None
    group = torch.where(chosen, 0, torch.where(base_path, 1, 2))  # chosen first, then base path, then skipped
    order = torch.argsort(group, stable=True)
    return order[:num_chosen], order[num_chosen : num_chosen + num_base]


class DLOBlock(Delegating):
    """A decoder layer of the expanded stack, with its router (None: always runs) and skip logic.

    Args:
        layer: the decoder layer (an original one, or a new copy held by the tuner).
        router: ``Linear(d, 1, bias=False)`` or None.
        position: index in the expanded stack.
        is_new: whether the layer is one of the inserted copies.
        skip_mode: 'mlp' or 'block'.
        scale_gap: the ŝ = 1 + scale_gap·(s − 0.5) slope.
        nonfinite_routing: what a token whose router score is NaN or infinite does ('base_path': the layer runs on
            it unscaled and it stays out of every batch-wide selection; 'raise': ``NonFiniteRoutingError``).
        context: the tuner's routing context (padding mask, cross-process sums).
        owner: the tuner; ``owner.dlo_layer_settings(adapter_name, position, training=...)`` returns ``(capacity,
            want_labels, inference_capacity_or_None)`` for this layer right now (the tuner owns the annealing
            schedule and the per-layer capacities).
        adapter_name: the adapter this block belongs to.
        installation: which installation of the expanded stack this block belongs to (stamps what it records).
        checkpoint_reference: an original decoder layer whose gradient-checkpointing switch a new layer follows
            (``gradient_checkpointing_enable`` only reaches modules registered in the transformers model).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # FSDP2's fully_shard ends by re-classing the module it wraps as a subclass (``FSDP<Name>``): this is the one
        # place to stop a DLOBlock from being sharded, at the user's own call.
        if sharded_by_fsdp(cls):
            raise TypeError(SHARDED_BLOCK_MESSAGE)

    def __init__(
        self,
        layer: nn.Module,
        router: nn.Linear | None,
        *,
        position: int,
        is_new: bool,
        skip_mode: str,
        scale_gap: float,
        nonfinite_routing: str,
        context: RoutingContext,
        owner: nn.Module,
        adapter_name: str,
        installation: int,
        checkpoint_reference: nn.Module | None,
    ) -> None:
        super().__init__()
        self.inner = layer
        self.router = router
        self.position = position
        self.is_new = is_new
        self.skip_mode = skip_mode
        self.scale_gap = scale_gap
        self.nonfinite_routing = nonfinite_routing
        self._where = f"DLO layer {position} ({'new' if is_new else 'original'}) of adapter {adapter_name!r}"
        self._context = context
        # plain tuples, not children: the owner and the reference layer are registered elsewhere (and a deep copy of
        # the model then maps them to their copies)
        self._owner = (owner,)
        self._adapter_name = adapter_name
        self._installation = installation
        # a plain tuple: registering the reference as a child would renumber its layer_idx with this block's
        self._checkpoint_reference = (checkpoint_reference,)
        # attribute name on the decoder layer -> the shadow that hides its module while DLO is attached
        self._shadows: dict[str, nn.Module] = {}
        if router is not None and skip_mode == "mlp":
            branch = find_mlp_branch(layer)
            self._shadows[branch.mlp] = SkipMLP(
                layer._modules[branch.mlp],
                self,
                gates_output=branch.post_norm is None,
                taps_residual=branch.pre_norm is None,
            )
            if branch.pre_norm is not None:
                self._shadows[branch.pre_norm] = ResidualTap(layer._modules[branch.pre_norm], self)
            if branch.post_norm is not None:
                self._shadows[branch.post_norm] = BranchOutputGate(layer._modules[branch.post_norm], self)
        elif router is not None:
            # skip_mode='block': the selected tokens run the whole layer, and its MLP branch is scaled by ŝ there, as
            # the official non-ExAttn layer computes h + attn + ŝ·mlp (forward_block_skip's `branch_scaling`)
            found = find_branch_output(layer)
            if found is not None:
                name, is_post_norm = found
                module = layer._modules[name]
                self._shadows[name] = (
                    BranchOutputGate(module, self)
                    if is_post_norm
                    else SkipMLP(module, self, gates_output=True, taps_residual=False, runs_whole=True)
                )

    # ----------------------------------------------------------------- this thread's current forward

    def current_plan(self) -> RoutingPlan | None:
        """This layer's plan for its call in progress on the calling thread (None outside one)."""
        return running_plan_of(self)

    @property
    def last_record(self) -> DLORecord | None:
        """This layer's routing in the calling thread's last forward through the installed stack."""
        state = read_forward_state(self._context.tracker.current, self._installation)
        return None if state is None else state.records.get(self.position)

    # ----------------------------------------------------------------- shadows on the decoder layer

    def attach(self) -> None:
        for name, shadow in self._shadows.items():
            object.__setattr__(self.inner, name, shadow)

    def detach(self) -> None:
        if self._shadows:
            for name in self._shadows:
                self.inner.__dict__.pop(name, None)
            stop_carrying_plans(self.inner)

    # ----------------------------------------------------------------- forward

    def _sync_checkpointing(self) -> None:
        reference = self._checkpoint_reference[0]
        if self.is_new and reference is not None and hasattr(reference, "gradient_checkpointing"):
            self.inner.gradient_checkpointing = reference.gradient_checkpointing
            if hasattr(reference, "_gradient_checkpointing_func"):
                self.inner._gradient_checkpointing_func = reference._gradient_checkpointing_func
        if self._shadows:
            # the shadows need the plan again when checkpointing replays the layer, maybe on another thread
            carry_plans_into_checkpointing(self.inner)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._sync_checkpointing()
        if self.router is None:
            return self.inner(hidden_states, *args, **kwargs)
        training = self.inner.training
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        logits = self.router(flat.to(self.router.weight.dtype)).float().squeeze(-1)  # [N]
        # [N] device mask, no sync (one under nonfinite_routing='raise'): those tokens take the base path below
        nonfinite = check_routing_scores(logits.detach().unsqueeze(-1), self.nonfinite_routing, self._where)
        scores = torch.sigmoid(logits.masked_fill(nonfinite, 0.0))  # finite everywhere, so no NaN reaches a gradient
        valid = self._context.flat_mask(hidden_states.shape)
        if valid is not None:
            valid = valid.to(scores.device)
        settings = self._owner[0].dlo_layer_settings(self._adapter_name, self.position, training=training)
        capacity, want_cos, inference_capacity = settings
        if not training and inference_capacity is not None:
            self._refuse_decoding_on_a_cache(hidden_states, args, kwargs)
        elif training and capacity is not None and capacity < 1.0:
            self._refuse_decoding_on_a_cache(hidden_states, args, kwargs, training_capacity=capacity)
        chosen = self._select(scores, valid, ~nonfinite, training, capacity, inference_capacity)
        # The base path of a token with non-finite scores: the layer runs on it, unscaled, as in the base model. It
        # joins the selection only after the batch-wide choice above, which never saw it.
        base_path = nonfinite if self.skip_mode == "mlp" or valid is None else nonfinite & valid
        selected = chosen | base_path
        scale = torch.where(nonfinite, 1.0, 1.0 + self.scale_gap * (scores - 0.5))
        want_cos = want_cos and training
        if self.skip_mode == "mlp":
            output, cos = self._forward_mlp_skip(
                hidden_states, args, kwargs, training, chosen, base_path, scale, want_cos
            )
        else:
            if sharded_across_processes(self.inner):
                raise NotImplementedError(f"{self._where}: {SHARDED_BLOCK_SKIP_MESSAGE}")
            output, cos = forward_block_skip(
                self.inner,
                hidden_states,
                args,
                kwargs,
                chosen,
                base_path,
                scale,
                want_cos,
                every_process_differentiates=self._context.syncing and torch.is_grad_enabled(),
                branch_scaling=self._scaled_branch if self._shadows else None,
            )
            output = as_layer_output(self.inner, output, args, kwargs)
        # Publish at the end only: checkpoint recomputation may stop part-way through a forward.
        write_forward_state(self._context.forward, self._installation).records[self.position] = DLORecord(
            logits=logits,
            valid=valid,
            selected=selected.detach(),
            cos=cos,
            capacity=capacity if training else inference_capacity,
            training=training,
            nonfinite=nonfinite,
        )
        return output

    def _refuse_decoding_on_a_cache(
        self, hidden_states: torch.Tensor, args: tuple, kwargs: dict, training_capacity: float | None = None
    ) -> None:
        """A capacity budget (inference_selection='capacity' in eval, the training capacity below 1 in training)
        picks a fraction of all the tokens of a forward: a forward that adds tokens to a cache would pick among the
        new tokens alone (every one of them, for one token per row)."""
        call = bind_block_call(self.inner, self.inner.forward, (hidden_states, *args), kwargs)
        if call.past_length(self.position) > 0:
            rule = "inference_selection='capacity'"
            if training_capacity is not None:
                rule = f"a training-mode capacity of {training_capacity:.3g}"
            raise ValueError(
                f"{self._where}: {rule} executes a fixed fraction of all the tokens of a forward, so a step that "
                "reads a KV cache would choose among its new tokens alone (all of them, one token per row) and "
                "cached generation would differ from uncached. Generate with use_cache=False (DLOModel.generate does "
                "so), or, in eval, use inference_selection='threshold'."
            )

    def _select(
        self,
        scores: torch.Tensor,
        valid: torch.Tensor | None,
        finite: torch.Tensor,
        training: bool,
        capacity: float,
        inference_capacity: float | None,
    ) -> torch.Tensor:
        """``[N]`` tokens the router chooses; batch-wide selections rank and count real tokens with finite scores."""
        sync = self._context if self._context.syncing else None
        ranked = finite if valid is None else valid & finite
        if training:  # the official rule: every token tied with the k-th score runs too
            return select_top_fraction(scores, ranked, capacity, sync, keep_ties=True)
        if inference_capacity is not None:  # a fixed budget: exactly k tokens
            return select_top_fraction(scores, ranked, inference_capacity, sync, keep_ties=False)
        # Execute when s >= 0.5 (official: s > 0.5). A zero-initialised router gives s = 0.5 exactly, so with the
        # official strict test a fresh adapter would skip every MLP; >= makes it run everything and equal the base.
        selected = (scores >= 0.5) & finite
        if self.skip_mode == "block" and valid is not None:
            selected = selected & valid
        return selected

    def _scaled_branch(self, scale: torch.Tensor) -> contextlib.AbstractContextManager:
        """A context in which this layer's MLP branch output is multiplied by ``scale`` (one entry per token of the
        call made inside it), through the shadows of ``skip_mode='block'``; every token of that call runs."""
        plan = RoutingPlan(
            training=True,  # every token runs and is gated: the shadows' training path
            selected=torch.ones_like(scale, dtype=torch.bool),
            index=None,
            base_index=None,
            scale=scale,
            want_cos=False,
        )
        return running_plan(self, plan)

    def _forward_mlp_skip(self, hidden_states, args, kwargs, training, chosen, base_path, scale, want_cos):
        index = base_index = None
        if not training:
            index, base_index = gather_indices(chosen, base_path)
        plan = RoutingPlan(
            training=training,
            selected=chosen | base_path,
            index=index,
            base_index=base_index,
            scale=scale,
            want_cos=want_cos,
            residual_multiplier=float(getattr(self.inner, "residual_multiplier", 1.0)),
        )
        with running_plan(self, plan):  # read by this layer's MLP and norm shadows during the call
            output = self.inner(hidden_states, *args, **kwargs)
        return output, plan.cos
