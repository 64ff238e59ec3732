"""Sharing peft-depth adapters: model cards, safe loading and the hooks that join them to peft.

``import peft_depth`` installs the hooks (:func:`install`), so ``save_pretrained`` / ``push_to_hub`` write the
method's model card and ``PeftModel.from_pretrained`` / ``load_adapter`` load peft-depth adapters safely:
safetensors only (validated before reading), no partial loads, and a clear error for a config that does not fit the
base model or asks for absurd sizes (see ``core.safety``).

Loading without ``import peft_depth`` fails inside peft with ``KeyError: 'MOLA'`` (or 'MOLEX', 'MOD', 'DLO'): peft
has no plugin discovery, so nothing of peft-depth runs before that lookup. Every card's usage snippet therefore
starts with ``import peft_depth``.
"""

from .model_card import (
    CARD_MARKER,
    get_card_info,
    model_cards_dir,
    render_model_card,
    set_card_info,
    summarise_metrics,
    write_model_card,
)
from .peft_hooks import install, is_depth_adapter_source, resolve_safetensors_file
from .plots import save_routing_plots
from .safetensors_check import check_safetensors_file

__all__ = [
    "CARD_MARKER",
    "check_safetensors_file",
    "get_card_info",
    "install",
    "is_depth_adapter_source",
    "model_cards_dir",
    "render_model_card",
    "resolve_safetensors_file",
    "save_routing_plots",
    "set_card_info",
    "summarise_metrics",
    "write_model_card",
]
