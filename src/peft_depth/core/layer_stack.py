"""Find a model's stack of transformer blocks across architectures, and map module names to layer indices.

Every depth method needs to know "which block is this module in": MoLA allocates experts per block, MoLEx mixes
blocks, MoD taps the last K blocks, DLO inserts and skips blocks. The stack is the ``nn.ModuleList`` of blocks, e.g.
``model.layers`` (Llama, Qwen, Mistral, Gemma), ``transformer.h`` (GPT-2) or ``bert.encoder.layer`` (BERT, RoBERTa).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["LayerStack", "find_layer_stack", "find_final_norm", "text_config"]

# Attribute paths tried first, in order; the generic search below covers the rest.
_KNOWN_STACK_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "model.decoder.layers",
    "transformer.h",
    "transformer.layers",
    "gpt_neox.layers",
    "bert.encoder.layer",
    "roberta.encoder.layer",
    "deberta.encoder.layer",
    "distilbert.transformer.layer",
    "encoder.layer",
    "layers",
    "h",
)
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "final_norm")


@dataclass(frozen=True)
class LayerStack:
    """The block stack of a model.

    Attributes:
        path: dotted module path of the ``nn.ModuleList`` relative to the searched model.
        layers: the ``nn.ModuleList`` itself.
        backbone_path: dotted path of the module that owns the stack's forward loop (``model`` for Llama,
            ``bert`` for BERT, ``transformer`` for GPT-2); empty for a bare stack.
    """

    path: str
    layers: nn.ModuleList
    backbone_path: str

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_index(self, module_name: str) -> int | None:
        """Index of the block that contains ``module_name`` (a ``named_modules`` key), or ``None`` if outside."""
        match = re.match(rf"^(?:.*\.)?{re.escape(self.path)}\.(\d+)(?:\.|$)", module_name)
        return int(match.group(1)) if match else None


def _get_submodule(model: nn.Module, path: str) -> nn.Module | None:
    module = model
    for part in path.split("."):
        module = getattr(module, part, None)
        if not isinstance(module, nn.Module):
            return None
    return module


def _is_block_stack(module: nn.Module | None) -> bool:
    if not isinstance(module, nn.ModuleList) or len(module) == 0:
        return False
    first_type = type(module[0])
    return all(type(block) is first_type for block in module) and any(
        isinstance(sub, nn.Linear) or type(sub).__name__ == "Conv1D" for sub in module[0].modules()
    )


def _backbone_path(stack_path: str) -> str:
    parts = stack_path.split(".")[:-1]
    # encoders keep their layers one level down (bert.encoder.layer): the backbone is the module above "encoder"
    if parts and parts[-1] == "encoder":
        parts = parts[:-1]
    return ".".join(parts)


def find_layer_stack(model: nn.Module) -> LayerStack | None:
    """Locate the transformer block stack of ``model``, or ``None`` if it has none (e.g. a plain MLP)."""
    for path in _KNOWN_STACK_PATHS:
        candidate = _get_submodule(model, path)
        if _is_block_stack(candidate):
            return LayerStack(path=path, layers=candidate, backbone_path=_backbone_path(path))
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if name and _is_block_stack(module) and (best is None or len(module) > best[0]):
            best = (len(module), name, module)
    if best is None:
        return None
    return LayerStack(path=best[1], layers=best[2], backbone_path=_backbone_path(best[1]))


def find_final_norm(model: nn.Module, stack: LayerStack) -> tuple[nn.Module, str, str] | None:
    """Return ``(norm_module, parent_path, attribute)`` of the norm applied after the last block, if any."""
    parent = _get_submodule(model, stack.backbone_path) if stack.backbone_path else model
    if parent is None:
        return None
    for name in _FINAL_NORM_NAMES:
        module = getattr(parent, name, None)
        if isinstance(module, nn.Module):
            return module, stack.backbone_path, name
    return None


def text_config(model: nn.Module) -> Any:
    """The config that describes ``model``'s block stack: ``config.get_text_config()`` (a multimodal model's text
    part; the config itself otherwise), or None for a model without a config."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


def attends_causally(layers: nn.ModuleList) -> bool:
    """Whether the blocks attend causally (a decoder), read from their attention modules' ``is_causal`` flags.

    Encoders (BERT) say False; so do decoders that bias attention with ALiBi instead of masking through transformers'
    mask functions (BLOOM, MPT), which the methods that rebuild layer calls do not support.
    """
    return any(getattr(module, "is_causal", False) is True for module in layers[0].modules())
