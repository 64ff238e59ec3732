"""Putting the active DLO adapter's expanded stack into the model's forward, and taking it out again.

The expansion is installed as a shadow of the model's block list (``core.rewiring.StackRewiring``): routed layers
are wrapped in ``DLOBlock``s, new layers come from the tuner, every ``layer_idx`` and the config's depth follow. peft
operations that walk the model by module name run with the shadow removed (``_rewiring_suspended``), so names always
mean the original layers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from ...core.output_capture import drop_output_capture, drop_output_capture_mark, install_output_capture
from ...core.quantization import floating_dtype
from ...core.rewiring import StackRewiring
from .config import DLOConfig
from .expansion import merge_new_layer_lora
from .layer import DLOBlock
from .precision import PrecisionBridge, new_layer_weight

__all__ = ["StackInstallation"]


class StackInstallation:
    """Mixin of ``DLOModel``: installs the active adapter's expanded stack.

    Uses the tuner's ``_dlo`` state (``rewiring``, ``layouts``, ``blocks``, ``installed``, ``installation``,
    ``suspended``), its
    ``dlo_new_layers`` / ``dlo_routers`` and its ``routing_context``.
    """

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
        state["installation"] += 1
        for position, (kind, source) in enumerate(state["layouts"][adapter_name]):
            layer = originals[source] if kind == "orig" else new_layers[f"new{position}"]
            if kind == "new":
                install_output_capture(rewiring.parent, layer, f"{rewiring.stack.path}.{position}")
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
                    nonfinite_routing=config.nonfinite_routing,
                    context=self.routing_context,
                    owner=self,
                    adapter_name=adapter_name,
                    installation=state["installation"],
                    checkpoint_reference=originals[0],
                )
                block.attach()
                wrappers.append(block)
                blocks.append(self._bridged(block, layer, originals) if kind == "new" else block)
            sources.append(source)
        extra = {"use_cache": False} if config.skip_mode == "block" and config.routed_layers != "none" else None
        rewiring.install(blocks, sources, extra_config=extra)
        state["blocks"] = wrappers
        state["installed"] = adapter_name

    @staticmethod
    def _bridged(block: nn.Module, layer: nn.Module, originals: list[nn.Module]) -> nn.Module:
        """``block`` of a new layer, bridged to the stack's dtype when the layer is in another (float32 weights
        kept by peft's autocast on a half-precision or quantized base)."""
        weight = new_layer_weight(layer)
        if weight is None or weight.dtype == floating_dtype(originals[0], default=weight.dtype):
            return block
        return PrecisionBridge(block, weight)

    def _make_expansion_permanent(self, adapter_name: str) -> None:
        """Merge-and-unload of dense expansion: the new layers (LoRA merged in) become the model's registered stack."""
        state = self._dlo
        rewiring: StackRewiring = state["rewiring"]
        blocks, sources = [], []
        for position, (kind, source) in enumerate(state["layouts"][adapter_name]):
            if kind == "orig":
                blocks.append(rewiring.original_blocks[source])
            else:
                layer = self.dlo_new_layers[adapter_name][f"new{position}"]
                merge_new_layer_lora(layer)
                # a plain transformers model runs every layer in its own dtype (float32 weights kept by peft's
                # autocast are rounded to it, as peft rounds a LoRA update merged into a half-precision weight)
                layer.to(floating_dtype(rewiring.original_blocks[0], default=floating_dtype(layer)))
                blocks.append(layer)
            sources.append(source)
        rewiring.install(blocks, sources)
        rewiring.make_permanent()
        # the new layers are the model's own now: they record outputs as its other layers do, or not yet, when the
        # model has not installed its hooks (it then hooks every registered layer at its first recording forward)
        hooked = getattr(rewiring.parent, "_output_capturing_hooks_installed", False)
        for position, (kind, _) in enumerate(state["layouts"][adapter_name]):
            if kind != "orig":
                drop_output_capture(blocks[position])
                if hooked:
                    install_output_capture(rewiring.parent, blocks[position], f"{rewiring.stack.path}.{position}")
                    drop_output_capture_mark(blocks[position])  # a plain layer of the model, nothing of ours on it
