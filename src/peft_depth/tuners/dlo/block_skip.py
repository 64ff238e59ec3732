"""``skip_mode='block'``: a routed layer runs, attention included, on each row's selected tokens only.

The selected tokens of every row are packed to the front (in their order) and the layer runs on the packed batch with
its own mask taken at them (causal, as in the official code, and the model's window and sequence boundaries); the others pass through unchanged. No KV cache can be kept, since
each layer's attention sees another subset of the tokens.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.forward_context import additive_mask_allows
from ...core.layer_call import bind_block_call, checkpointing_active
from ...core.output_capture import output_recording_paused

__all__ = ["as_layer_output", "forward_block_skip"]

#: How many outputs a layer class returns besides its hidden states (Falcon's returns ``(hidden, attn_weights)``),
#: learned at a first call: the block's output must have the layer's own structure, since the stack reads
#: ``outputs[0]``. Kept here, by class, so that nothing is written on the user's layers.
_EXTRA_OUTPUTS: dict[type, int] = {}


def _run(layer: nn.Module, hidden_states: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """``layer``'s hidden-state output (the first element where it returns a tuple)."""
    if kwargs.get("alibi") is not None:
        raise ValueError(
            f"DLO skip_mode='block' cannot run {type(layer).__name__} with ALiBi position biases: each routed layer "
            "attends over a packed subset of the tokens, and the bias is not packed with them. Use skip_mode='mlp'."
        )
    output = layer(hidden_states, **kwargs)
    _EXTRA_OUTPUTS[type(layer)] = len(output) - 1 if isinstance(output, tuple) else 0
    return output[0] if isinstance(output, tuple) else output


def as_layer_output(layer: nn.Module, output: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> Any:
    """``output`` in the structure ``layer`` returns (a tuple for Falcon-style layers, extras None: block skip has
    no per-layer attention map and keeps no cache). A layer that has not run yet runs once, without gradient, to
    tell."""
    extra = _EXTRA_OUTPUTS.get(type(layer))
    if extra is None:
        with torch.no_grad(), output_recording_paused():  # a probe, no layer of this forward
            _run(layer, output, bind_block_call(layer, layer.forward, (output, *args), kwargs).arguments)
        extra = _EXTRA_OUTPUTS[type(layer)]
    return (output, *([None] * extra)) if extra else output


def _recorded_once(forward: Callable[..., tuple[torch.Tensor, Any]]) -> Callable[..., tuple[torch.Tensor, Any]]:
    """The layer runs up to three times in ``forward`` (the packed, label and base-path calls), and transformers
    records ``output_hidden_states`` with a hook at each of its calls: those hooks are paused, and the block's output
    is recorded once, as one layer's."""

    @functools.wraps(forward)
    def recorded(
        layer: nn.Module, hidden_states: torch.Tensor, *rest: Any, **options: Any
    ) -> tuple[torch.Tensor, Any]:
        with _output_recording_paused() as collected:
            output, cos = forward(layer, hidden_states, *rest, **options)
        if collected is not None and "hidden_states" in collected:
            states, selection = collected["hidden_states"], collected.get("_hidden_states_layers")
            for state in ([hidden_states] if not states else []) + [output]:  # the first layer also gives its input
                states.append(state if selection is None or len(states) in selection else None)
        return output, cos

    return recorded


@contextlib.contextmanager
def _output_recording_paused() -> Iterator[dict[str, Any] | None]:
    """transformers' per-layer output recording paused; only hidden states can be reported for a packed layer."""
    with output_recording_paused() as collected:
        others = sorted(set(collected or ()) - {"hidden_states", "_hidden_states_layers"})
        if others:
            raise ValueError(
                f"DLO skip_mode='block' cannot report {', '.join(others)}: each routed layer attends over a packed "
                "subset of the tokens, so it has no per-layer map over the sequence. Drop output_attentions (and "
                "the like), or use skip_mode='mlp'."
            )
        yield collected


@_recorded_once
def forward_block_skip(
    layer: nn.Module,
    hidden_states: torch.Tensor,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    chosen: torch.Tensor,
    base_path: torch.Tensor,
    scale: torch.Tensor,
    want_cos: bool,
    every_process_differentiates: bool = False,
    branch_scaling: Callable[[torch.Tensor], contextlib.AbstractContextManager] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(output, cos)`` of ``layer`` run on the ``[N]`` ``chosen`` tokens, with ``scale`` on their MLP branch.

    ``branch_scaling(s)``: a context in which the layer's MLP branch output is multiplied by ``s`` (one entry per
    token of the call), so the chosen tokens get ``h + attn + ŝ·mlp``, the official non-ExAttn layer. None (a layer
    whose MLP DLO cannot find): their whole update is scaled, ``h + ŝ·(attn + mlp)``.
    ``base_path`` tokens (non-finite router scores) run the layer as the base model does (full attention over their
    row, unscaled), in a call of their own, so the chosen tokens' call is the one a batch without them makes. ``cos``
    (``want_cos``): per token, cosine similarity of the residual stream before and after the whole layer.
    """
    # the cache by what it is, under whichever keyword (or position) this transformers release passes it
    call = bind_block_call(layer, layer.forward, (hidden_states, *args), kwargs)
    if call.cache is not None or (call.arguments.get("use_cache") and not checkpointing_active(layer)):
        raise ValueError(
            "DLO with skip_mode='block' runs each routed layer's attention over its selected tokens only, so no KV "
            "cache can be kept (as in the official code). Call the model / generate with use_cache=False, or use "
            "skip_mode='mlp'."
        )
    # every argument by name from here on: the attention mask and positions are replaced for the packed call, and
    # blocks that take them positionally (GPT-2) would otherwise receive them twice
    kwargs = dict(call.arguments)
    batch, seq, dim = hidden_states.shape
    chosen_rows = chosen.view(batch, seq)
    counts = chosen_rows.sum(dim=1)
    # one device sync: the packing needs its width
    width, fewest, num_base = (int(v) for v in torch.stack([counts.max(), counts.min(), base_path.sum()]).tolist())
    cos = None
    if want_cos:
        with torch.no_grad():
            full = _run(layer, hidden_states, kwargs)
            before = hidden_states.reshape(-1, dim).float()
            cos = F.cosine_similarity(before, full.reshape(-1, dim).float(), dim=-1)
    if num_base == 0:
        if width == 0:
            if every_process_differentiates:
                hidden_states = hidden_states + _zero_tie(layer, scale).to(hidden_states.dtype)
            return hidden_states, cos
        if fewest == seq:  # every token chosen: one plain call
            if branch_scaling is not None:
                with branch_scaling(scale):
                    return _run(layer, hidden_states, kwargs), cos
            output = _run(layer, hidden_states, kwargs)
            return hidden_states + scale.view(batch, seq, 1).to(output.dtype) * (output - hidden_states), cos
        delta = _packed_delta(layer, hidden_states, kwargs, chosen_rows, counts, width, scale, branch_scaling)
        return hidden_states + delta, cos
    delta = (
        _packed_delta(layer, hidden_states, kwargs, chosen_rows, counts, width, scale, branch_scaling)
        if width
        else torch.zeros_like(hidden_states)
    )
    base_output = _run(layer, hidden_states, kwargs)
    delta = torch.where(base_path.view(batch, seq, 1), base_output - hidden_states, delta)
    return hidden_states + delta, cos


def _zero_tie(layer: nn.Module, scale: torch.Tensor) -> torch.Tensor:
    """A zero that depends on every trainable parameter of ``layer`` and on ``scale`` (the router's output).

    With ``sync_routing_stats`` the batch-wide top-k can leave this process's shard no token of a layer that other
    processes run; DDP (``find_unused_parameters=False``) then waits for gradients this process never produces, and
    training crashed (gloo) or hung (NCCL). Tying them in gives those parameters a zero gradient, which DDP averages
    with the other processes' real ones."""
    tie = scale.sum()
    for param in layer.parameters():
        if param.requires_grad:
            tie = tie + param.sum()
    return tie * 0


def _packed_delta(
    layer: nn.Module,
    hidden_states: torch.Tensor,
    kwargs: dict[str, Any],
    chosen_rows: torch.Tensor,
    counts: torch.Tensor,
    width: int,
    scale: torch.Tensor,
    branch_scaling: Callable[[torch.Tensor], contextlib.AbstractContextManager] | None,
) -> torch.Tensor:
    """The update ``layer`` makes to each row's chosen tokens (zero elsewhere), run on the packed tokens, with the
    scale on their MLP branch (``branch_scaling``) or on the whole update."""
    batch, seq, dim = hidden_states.shape
    positions = torch.arange(seq, device=hidden_states.device)
    # chosen positions first, in their original order, then the rest
    order = torch.where(chosen_rows, positions, positions + seq).argsort(dim=1)[:, :width]  # [B, K]
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
    # Among the chosen tokens of each row, what the layer's own mask allows (causal, and its sliding window, padding
    # and packed-sequence boundaries) and the bias it adds there (Falcon's ALiBi, which transformers >= 5.25 folds
    # into the mask); empty slots see only themselves so that no row of the softmax is empty.
    allowed, bias = _packed_mask(kwargs.get("attention_mask"), order, seq)
    allowed = allowed & slot_valid[:, None, None, :] & slot_valid[:, None, :, None]
    allowed = allowed | torch.eye(width, dtype=torch.bool, device=hidden_states.device)
    bias = (
        torch.zeros(allowed.shape, dtype=hidden_states.dtype, device=hidden_states.device)
        if bias is None
        else bias.to(hidden_states.dtype).expand(allowed.shape).clone()
    )
    kwargs["attention_mask"] = bias.masked_fill(~allowed, torch.finfo(hidden_states.dtype).min)
    packed_scale = scale.view(batch, seq).gather(1, order)
    if branch_scaling is not None:
        with branch_scaling(packed_scale.reshape(-1)):
            out_packed = _run(layer, packed, kwargs)
        update = (out_packed - packed) * slot_valid.to(out_packed.dtype).unsqueeze(-1)
    else:
        out_packed = _run(layer, packed, kwargs)
        weight = packed_scale.to(out_packed.dtype) * slot_valid.to(out_packed.dtype)
        update = (out_packed - packed) * weight.unsqueeze(-1)
    return torch.zeros_like(hidden_states).scatter(1, order.unsqueeze(-1).expand(-1, -1, dim), update)


def _packed_mask(mask: Any, order: torch.Tensor, seq: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the layer's own mask says between packed tokens: ``[B, heads, K, K]`` booleans (may packed token i attend
    to packed token j) and the additive bias it puts there (None for a boolean mask or plain causal attention).

    The layer's mask is ``[B or 1, heads or 1, seq, seq]`` (booleans, or an additive bias with a large negative value
    for "cannot attend"), or None when transformers found plain causal attention enough (then it is). An additive
    mask's values where attention is allowed are kept, not only where it is allowed: a mask that carries a position
    bias (transformers >= 5.25 adds Falcon's ALiBi to it) must give the packed tokens the bias of their original
    positions, and reading "allowed" as ``mask == 0`` dropped every key with a bias (``additive_mask_allows``).
    Anything else (a flex-attention block mask, a dict) is refused: a causal mask in its place dropped the model's
    sliding window and packed-sequence boundaries.
    """
    batch, width = order.shape
    if mask is None:
        causal = torch.ones(width, width, dtype=torch.bool, device=order.device).tril()
        return causal.expand(batch, 1, width, width), None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[-2:] != (seq, seq):
        description = f"shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(
            "DLO skip_mode='block' runs each routed layer on its chosen tokens with the layer's own attention mask "
            f"taken at those tokens, but the layer received a mask it cannot read ({description}; expected a 4-D "
            "tensor over the sequence, as the eager and sdpa attention implementations get). Load the model with "
            "attn_implementation='sdpa' or 'eager', or use skip_mode='mlp'."
        )
    mask = mask.expand(batch, -1, -1, -1)
    heads = mask.shape[1]
    packed = mask.gather(2, order[:, None, :, None].expand(batch, heads, width, seq))
    packed = packed.gather(3, order[:, None, None, :].expand(batch, heads, width, width))
    if packed.dtype == torch.bool:
        return packed, None
    allowed = additive_mask_allows(packed)
    return allowed, packed.masked_fill(~allowed, 0)
