"""The parts of a base model MoD builds on, found once and refused with a clear error before anything is built.

MoD needs the model's stack of blocks (the late layers), its final norm (copied into the new per-layer norms, and
hooked to mix the states) and a linear LM head shared, frozen, by every late layer. ``MoDConfig.check_against_base``
calls ``find_base_parts`` before injection, so a model without them (or a config that does not fit it) fails before
a single module or hook is added; injection calls it again to build on the parts.
"""

from __future__ import annotations

from dataclasses import dataclass

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...core.layer_stack import LayerStack, find_final_norm, find_layer_stack
from ...core.output_head import final_logit_multiplier, final_logit_softcap

__all__ = ["MoDBaseParts", "find_base_parts", "final_logit_multiplier", "final_logit_softcap"]


@dataclass
class MoDBaseParts:
    """Where MoD plugs into a causal LM.

    Attributes:
        stack: the block stack.
        final_norm: the norm applied after the last block.
        head: the output head (its base layer, if a tuner wrapped it).
        head_name: the head's module path in the model (what ``target_modules`` would match).
    """

    stack: LayerStack
    final_norm: nn.Module
    head: nn.Linear
    head_name: str


def find_base_parts(model: nn.Module) -> MoDBaseParts:
    """The stack, final norm and linear head of ``model``; ValueError saying what is missing."""
    stack = find_layer_stack(model)
    if stack is None:
        raise ValueError("MoD needs a model with a stack of transformer blocks; none was found in this model.")
    found = find_final_norm(model, stack)
    if found is None:
        raise ValueError(
            "MoD needs the model's final norm (applied after the last block) to copy into the new per-layer norms; "
            f"none was found next to `{stack.path}`."
        )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_name = next((name for name, module in model.named_modules() if module is head), "")
    if isinstance(head, BaseTunerLayer):
        head = head.get_base_layer()
    if not isinstance(head, nn.Linear):
        raise ValueError(
            "MoD needs a causal LM with a linear output head (`get_output_embeddings()`), shared by the late layers; "
            f"this model has {type(head).__name__}. Use an *ForCausalLM model."
        )
    return MoDBaseParts(stack=stack, final_norm=found[0], head=head, head_name=head_name)
