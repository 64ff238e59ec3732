"""DLO's per-layer machinery: the routed block, the MLP that runs on selected tokens only, and LoRA for new layers.

A routed layer of the expanded stack is a ``DLOBlock`` around the decoder layer (original or new). The block scores
each token's residual stream with its router, decides which tokens execute, and hands that *plan* to two shadows it
installs on the decoder layer for the duration of DLO (see ``core.rewiring``: instance attributes that hide the
registered modules without changing any state-dict key):

- ``mlp`` -> ``SkipMLP``: in eval it gathers the selected tokens, runs the real MLP on those alone and scatters the
  scaled result back (skipped tokens get exactly zero: the residual passes through); in training it runs every token,
  because the router labels need every token's MLP output, and zeroes the unselected ones.
- the pre-MLP norm -> ``ResidualTap``: records the residual stream ``h'`` entering the MLP, for the cosine labels.

The shadows are shared by every forward; the plan is not. It lives in the calling thread's forward context
(``forward_state``), where the shadows look it up by the block's position, so concurrent forwards never see each
other's plans.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.context import RoutingContext
from ...core.layer_call import bind_block_call, checkpointing_active
from ...core.low_rank import init_low_rank, low_rank_delta
from .forward_state import DLORecord, RoutingPlan, read_forward_state, write_forward_state
from .selection import select_top_fraction

__all__ = ["DLOBlock", "DLORecord", "NewLayerLoraLinear", "ResidualTap", "RoutingPlan", "SkipMLP"]

#: Names of the norm that feeds the MLP, by architecture family (Llama/Qwen/Mistral, Gemma, GPT-2, OLMo-2 has none).
PRE_MLP_NORM_NAMES = ("post_attention_layernorm", "pre_feedforward_layernorm", "ln_2")
MLP_NAMES = ("mlp", "feed_forward")


def find_mlp_and_norm(layer: nn.Module) -> tuple[str, str]:
    """Attribute names of a decoder layer's MLP and the norm in front of it; ValueError if not found."""
    mlp = next((name for name in MLP_NAMES if isinstance(getattr(layer, name, None), nn.Module)), None)
    norm = next((name for name in PRE_MLP_NORM_NAMES if isinstance(getattr(layer, name, None), nn.Module)), None)
    if mlp is None or norm is None:
        raise ValueError(
            f"skip_mode='mlp' needs a decoder layer with an MLP ({'/'.join(MLP_NAMES)}) behind a pre-MLP norm "
            f"({'/'.join(PRE_MLP_NORM_NAMES)}); {type(layer).__name__} has neither pair. Use skip_mode='block'."
        )
    return mlp, norm


class _Delegating(nn.Module):
    """Unregistered wrapper that forwards unknown attributes to the module it wraps (``inner``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)


class SkipMLP(_Delegating):
    """Runs the wrapped MLP on the plan's selected tokens only (eval) or on all and masks (training).

    The plan is the current forward's, read through the block that owns this shadow (``DLOBlock.current_plan``).
    """

    def __init__(self, mlp: nn.Module, block: DLOBlock) -> None:
        super().__init__()
        self.inner = mlp
        self._block = (block,)  # a plain tuple, not a child: the block wraps the layer this shadow sits in

    @property
    def plan(self) -> RoutingPlan | None:
        return self._block[0].current_plan()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.plan
        if plan is None:
            return self.inner(x)
        shape = x.shape
        if plan.training:
            out = self.inner(x)
            if plan.want_cos and plan.residual is not None:
                with torch.no_grad():
                    residual = plan.residual.reshape(-1, shape[-1]).float()
                    plan.cos = F.cosine_similarity(residual, residual + out.reshape(residual.shape).float(), dim=-1)
            gate = plan.selected.to(out.dtype) * plan.scale.to(out.dtype)
            return out * gate.view(*shape[:-1], 1)
        if plan.index is None:
            return self.inner(x) * plan.scale.to(x.dtype).view(*shape[:-1], 1)
        flat = x.reshape(-1, shape[-1])
        result = flat.new_zeros(flat.shape)
        if plan.index.numel():
            # Only the selected tokens go through the MLP: this is where inference saves compute.
            chosen = self.inner(flat.index_select(0, plan.index).unsqueeze(0)).squeeze(0)
            chosen = chosen * plan.scale.index_select(0, plan.index).to(chosen.dtype).unsqueeze(-1)
            result = result.index_copy(0, plan.index, chosen.to(result.dtype))
        return result.view(shape)


class ResidualTap(_Delegating):
    """The pre-MLP norm, recording its input (the residual stream ``h'``) into the plan when labels are wanted."""

    def __init__(self, norm: nn.Module, block: DLOBlock) -> None:
        super().__init__()
        self.inner = norm
        self._block = (block,)

    @property
    def plan(self) -> RoutingPlan | None:
        return self._block[0].current_plan()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        plan = self.plan
        if plan is not None and plan.want_cos:
            plan.residual = x.detach()
        return self.inner(x, *args, **kwargs)


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
        self.lora_A = nn.Parameter(lora_A)
        self.lora_B = nn.Parameter(lora_B)

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


class DLOBlock(_Delegating):
    """A decoder layer of the expanded stack, with its router (None: always runs) and skip logic.

    Args:
        layer: the decoder layer (an original one, or a new copy held by the tuner).
        router: ``Linear(d, 1, bias=False)`` or None.
        position: index in the expanded stack.
        is_new: whether the layer is one of the inserted copies.
        skip_mode: 'mlp' or 'block'.
        scale_gap: the ŝ = 1 + scale_gap·(s − 0.5) slope.
        context: the tuner's routing context (padding mask, cross-process sums).
        owner: the tuner; ``owner.dlo_layer_settings(adapter_name, position)`` returns ``(training_capacity,
            want_labels, inference_capacity_or_None)`` for this layer right now (the tuner owns the annealing
            schedule and the per-layer capacities).
        adapter_name: the adapter this block belongs to.
        installation: which installation of the expanded stack this block belongs to (stamps what it records).
        checkpoint_reference: an original decoder layer whose gradient-checkpointing switch a new layer follows
            (``gradient_checkpointing_enable`` only reaches modules registered in the transformers model).
    """

    def __init__(
        self,
        layer: nn.Module,
        router: nn.Linear | None,
        *,
        position: int,
        is_new: bool,
        skip_mode: str,
        scale_gap: float,
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
        self._context = context
        # plain tuples, not children: the owner and the reference layer are registered elsewhere (and a deep copy of
        # the model then maps them to their copies)
        self._owner = (owner,)
        self._adapter_name = adapter_name
        self._installation = installation
        # a plain tuple: registering the reference as a child would renumber its layer_idx with this block's
        self._checkpoint_reference = (checkpoint_reference,)
        self._mlp_shadow: SkipMLP | None = None
        self._norm_shadow: ResidualTap | None = None
        if router is not None and skip_mode == "mlp":
            mlp_name, norm_name = find_mlp_and_norm(layer)
            self._mlp_name, self._norm_name = mlp_name, norm_name
            self._mlp_shadow = SkipMLP(layer._modules[mlp_name], self)
            self._norm_shadow = ResidualTap(layer._modules[norm_name], self)

    # ----------------------------------------------------------------- this thread's current forward

    def current_plan(self) -> RoutingPlan | None:
        """This layer's plan in the calling thread's current forward (None outside a routed forward)."""
        state = read_forward_state(self._context.tracker.current, self._installation)
        return None if state is None else state.plans.get(self.position)

    @property
    def last_record(self) -> DLORecord | None:
        """This layer's routing in the calling thread's last forward through the installed stack."""
        state = read_forward_state(self._context.tracker.current, self._installation)
        return None if state is None else state.records.get(self.position)

    # ----------------------------------------------------------------- shadows on the decoder layer

    def attach(self) -> None:
        if self._mlp_shadow is not None:
            object.__setattr__(self.inner, self._mlp_name, self._mlp_shadow)
            object.__setattr__(self.inner, self._norm_name, self._norm_shadow)

    def detach(self) -> None:
        if self._mlp_shadow is not None:
            self.inner.__dict__.pop(self._mlp_name, None)
            self.inner.__dict__.pop(self._norm_name, None)

    # ----------------------------------------------------------------- forward

    def _sync_checkpointing(self) -> None:
        reference = self._checkpoint_reference[0]
        if self.is_new and reference is not None and hasattr(reference, "gradient_checkpointing"):
            self.inner.gradient_checkpointing = reference.gradient_checkpointing
            if hasattr(reference, "_gradient_checkpointing_func"):
                self.inner._gradient_checkpointing_func = reference._gradient_checkpointing_func

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._sync_checkpointing()
        if self.router is None:
            return self.inner(hidden_states, *args, **kwargs)
        training = self.inner.training
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        logits = self.router(flat.to(self.router.weight.dtype)).float().squeeze(-1)  # [N]
        scores = torch.sigmoid(logits)
        valid = self._context.flat_mask(hidden_states.shape)
        if valid is not None:
            valid = valid.to(scores.device)
        capacity, want_cos, inference_capacity = self._owner[0].dlo_layer_settings(self._adapter_name, self.position)
        sync = self._context if self._context.syncing else None
        if training:
            selected = select_top_fraction(scores, valid, capacity, sync)
        elif inference_capacity is not None:
            selected = select_top_fraction(scores, valid, inference_capacity, sync)
        else:
            # Execute when s >= 0.5 (official: s > 0.5). A zero-initialised router gives s = 0.5 exactly, so with the
            # official strict test a fresh adapter would skip every MLP; >= makes it run everything and equal the base.
            selected = scores >= 0.5
            if self.skip_mode == "block" and valid is not None:
                selected = selected & valid
        scale = 1.0 + self.scale_gap * (scores - 0.5)
        want_cos = want_cos and training
        if self.skip_mode == "mlp":
            output, cos = self._forward_mlp_skip(hidden_states, args, kwargs, training, selected, scale, want_cos)
        else:
            output, cos = self._forward_block_skip(hidden_states, args, kwargs, training, selected, scale, want_cos)
        # Publish at the end only: checkpoint recomputation may stop part-way through a forward.
        write_forward_state(self._context.forward, self._installation).records[self.position] = DLORecord(
            logits=logits,
            valid=valid,
            selected=selected.detach(),
            cos=cos,
            capacity=capacity if training else inference_capacity,
            training=training,
        )
        return output

    def _forward_mlp_skip(self, hidden_states, args, kwargs, training, selected, scale, want_cos):
        index = None
        if not training and not bool(selected.all()):
            index = selected.nonzero().squeeze(-1)
        plan = RoutingPlan(training=training, selected=selected, index=index, scale=scale, want_cos=want_cos)
        # read by this layer's MLP and norm shadows, now and when checkpointing recomputes the layer in backward
        write_forward_state(self._context.forward, self._installation).plans[self.position] = plan
        output = self.inner(hidden_states, *args, **kwargs)
        return output, plan.cos

    def _forward_block_skip(self, hidden_states, args, kwargs, training, selected, scale, want_cos):
        # the cache by what it is, under whichever keyword (or position) this transformers release passes it
        call = bind_block_call(self.inner, self.inner.forward, (hidden_states, *args), kwargs)
        if call.cache is not None or (call.arguments.get("use_cache") and not checkpointing_active(self.inner)):
            raise ValueError(
                "DLO with skip_mode='block' runs each routed layer's attention over its selected tokens only, so no KV "
                "cache can be kept (as in the official code). Call the model / generate with use_cache=False, or use "
                "skip_mode='mlp'."
            )
        # every argument by name from here on: the attention mask and positions are replaced below, and blocks that take
        # them positionally (GPT-2) would otherwise receive them twice
        args, kwargs = (), dict(call.arguments)
        batch, seq, dim = hidden_states.shape
        chosen = selected.view(batch, seq)
        counts = chosen.sum(dim=1)
        width = int(counts.max())
        cos = None
        if want_cos:
            with torch.no_grad():
                full = self.inner(hidden_states, *args, **kwargs)
                before = hidden_states.reshape(-1, dim).float()
                cos = F.cosine_similarity(before, full.reshape(-1, dim).float(), dim=-1)
        if width == 0:
            return hidden_states, cos
        if bool(chosen.all()):
            output = self.inner(hidden_states, *args, **kwargs)
            return hidden_states + scale.view(batch, seq, 1).to(output.dtype) * (output - hidden_states), cos
        positions = torch.arange(seq, device=hidden_states.device)
        # selected positions first, in their original order, then the rest
        order = torch.where(chosen, positions, positions + seq).argsort(dim=1)[:, :width]  # [B, K]
        slot_valid = torch.arange(width, device=hidden_states.device) < counts.unsqueeze(1)  # [B, K]
        packed = hidden_states.gather(1, order.unsqueeze(-1).expand(-1, -1, dim))
        kwargs = dict(kwargs)
        cos_sin = kwargs.get("position_embeddings")
        if cos_sin is not None:
            kwargs["position_embeddings"] = tuple(
                t.expand(batch, -1, -1).gather(1, order.unsqueeze(-1).expand(-1, -1, t.shape[-1])) for t in cos_sin
            )
        position_ids = kwargs.get("position_ids")
        if position_ids is not None:
            kwargs["position_ids"] = position_ids.expand(batch, -1).gather(1, order)
        # Causal attention among the selected tokens of each row (packing keeps their order); empty slots see only
        # themselves so that no row of the softmax is empty.
        causal = torch.ones(width, width, dtype=torch.bool, device=hidden_states.device).tril()
        allowed = causal & slot_valid.unsqueeze(1) & slot_valid.unsqueeze(2)
        allowed = allowed | torch.eye(width, dtype=torch.bool, device=hidden_states.device)
        bias = torch.zeros(allowed.shape, dtype=hidden_states.dtype, device=hidden_states.device)
        kwargs["attention_mask"] = bias.masked_fill(~allowed, torch.finfo(hidden_states.dtype).min).unsqueeze(1)
        out_packed = self.inner(packed, *args, **kwargs)
        packed_scale = scale.view(batch, seq).gather(1, order).to(out_packed.dtype)
        update = (out_packed - packed) * (packed_scale * slot_valid.to(out_packed.dtype)).unsqueeze(-1)
        delta = torch.zeros_like(hidden_states).scatter(1, order.unsqueeze(-1).expand(-1, -1, dim), update)
        return hidden_states + delta, cos
