"""How a causal LM turns its head's output into logits: the family's scaling and soft-capping after the head.

Anything that applies a model's LM head to states itself (MoD's distillation, the analysis logit lens) must apply
the same transform the model's own forward does; a scaling attribute of unknown meaning is refused, not ignored.
"""

from __future__ import annotations

from torch import nn

from .layer_stack import text_config

__all__ = ["final_logit_multiplier", "final_logit_softcap"]

#: Families whose causal-LM forward scales the head's output, and how (transformers 5): the config attribute and
#: whether the logits are multiplied or divided by it.
_LOGIT_SCALINGS = {
    "cohere": ("logit_scale", "multiply"),
    "granite": ("logits_scaling", "divide"),
    "minicpm3": ("logits_scaling", "divide"),  # divides the final state before the bias-free head: the same
    "hyperclovax": ("logits_scaling", "multiply"),
    "falcon_h1": ("lm_head_multiplier", "multiply"),
}
_SCALING_ATTRIBUTES = ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier", "logits_multiplier")


def final_logit_multiplier(model: nn.Module) -> float:
    """The factor the model's causal-LM forward applies to its head's output (Cohere's ``logit_scale``, Granite's
    ``1 / logits_scaling``, ...), 1.0 for most families. ValueError for a scaling attribute of unknown meaning."""
    config = text_config(model)
    model_type = str(getattr(config, "model_type", ""))
    family = next((name for name in _LOGIT_SCALINGS if model_type.startswith(name)), None)
    if family is not None:
        attribute, operation = _LOGIT_SCALINGS[family]
        value = getattr(config, attribute, None)
        if value is not None:
            return float(value) if operation == "multiply" else 1.0 / float(value)
    unknown = [a for a in _SCALING_ATTRIBUTES if getattr(config, a, None) not in (None, 1, 1.0)]
    if family is None and unknown:
        raise ValueError(
            f"This {model_type or type(model).__name__} model's config sets {', '.join(unknown)}, a scaling of "
            "its output logits whose convention peft-depth does not know, so logits computed from its head would "
            "not be the model's. Known: "
            + ", ".join(f"{k} ({a}, {op})" for k, (a, op) in _LOGIT_SCALINGS.items())
            + "."
        )
    return 1.0


def final_logit_softcap(model: nn.Module) -> float | None:
    """The model's final-logit soft-capping constant (Gemma 2/3), or None."""
    return getattr(text_config(model), "final_logit_softcapping", None)
