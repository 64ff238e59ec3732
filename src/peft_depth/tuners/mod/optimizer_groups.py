"""MoD's optimizer parameter groups: the gate and the router/norms, each with its own learning rate.

Why separate rates matter: the ensemble's contribution is ``g · Σ_l w_l (z_l − z_L)`` with ``g`` starting at 0, so the
router and the new norms get no gradient from the LM loss until the gate has moved; the gate's own rate decides how
soon the rest starts learning (issue 14: with the trainer's rate, g reached 0.03-0.08 in 30 steps).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .config import MoDConfig
from .layer import MoDEnsemble

__all__ = ["mod_optimizer_groups"]


def _no_decay(name: str) -> bool:
    # The trainer's own groups never decay biases and norm weights; the router group keeps that policy.
    return name.endswith("bias") or name.startswith("norms.")


def mod_optimizer_groups(
    ensembles: dict[str, MoDEnsemble], configs: dict[str, MoDConfig], base_lr: float, weight_decay: float
) -> list[dict[str, Any]]:
    """Groups ``gate`` (g, lr ``gate_lr``, else the main rate) and ``router`` (router and norms, lr ``router_lr``)
    per adapter.

    The router group is only emitted when its rate is set, so an adapter without one trains its router and norms in
    the trainer's default decay/no-decay groups. The gate always has a group, with the trainer's decay, as in the
    default group (so the trainer's ``gate_learning_rate`` can set its rate). Names get ``.<adapter>`` with several
    adapters.
    """
    groups: list[dict[str, Any]] = []
    suffix = (lambda name: f".{name}") if len(ensembles) > 1 else (lambda name: "")
    for adapter_name, ensemble in ensembles.items():
        config = configs[adapter_name]
        # always a group of its own (at the main rate without `gate_lr`, as the trainer's default group would
        # train it), so that the trainer's `gate_learning_rate` reaches it
        groups.append(
            {
                "name": "gate" + suffix(adapter_name),
                "params": [ensemble.gate],
                "lr": config.gate_lr if config.gate_lr is not None else base_lr,
                "weight_decay": weight_decay,
            }
        )
        if config.router_lr is not None:
            named = [(n, p) for n, p in ensemble.named_parameters() if p is not ensemble.gate]
            for decay, label in ((True, "router"), (False, "router_no_decay")):
                params = [p for n, p in named if _no_decay(n) != decay]
                if params:
                    groups.append(
                        {
                            "name": label + suffix(adapter_name),
                            "params": params,
                            "lr": config.router_lr,
                            "weight_decay": weight_decay if decay else 0.0,
                        }
                    )
    return groups


def ensembles_of(container: nn.ModuleDict | None) -> dict[str, MoDEnsemble]:
    return {} if container is None else dict(container.items())
