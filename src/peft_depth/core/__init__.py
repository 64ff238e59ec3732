"""What the depth methods share: routing, auxiliary-loss collection, finding and rewiring a model's layers.

Nothing here imports a method; methods import from here.
"""

from .aux import AuxLossTerm, DepthAuxSource, aux_losses, raw_aux_losses, routing_stats
from .layer_stack import LayerStack, find_final_norm, find_layer_stack
from .peft_registration import add_peft_type, register_depth_method
from .routing import RoutingDecision, RoutingStatistics, masked_routing_statistics, route_top_k, switch_balance_loss
from .token_mask import TokenMaskTracker
from .tuner import DepthTuner

__all__ = [
    "AuxLossTerm",
    "DepthAuxSource",
    "DepthTuner",
    "LayerStack",
    "RoutingDecision",
    "RoutingStatistics",
    "TokenMaskTracker",
    "add_peft_type",
    "aux_losses",
    "find_final_norm",
    "find_layer_stack",
    "masked_routing_statistics",
    "raw_aux_losses",
    "register_depth_method",
    "route_top_k",
    "routing_stats",
    "switch_balance_loss",
]
