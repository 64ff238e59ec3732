"""MoLEx: mixture of layer experts (the model's own layers, with their LoRA, are the experts).

Usage::

    import peft_depth
    from peft import get_peft_model

    model = get_peft_model(base, peft_depth.MoLExConfig(task_type="CAUSAL_LM", r=8))
    loss = model(**batch).loss + sum(peft_depth.aux_losses(model).values())  # task + balance loss
    peft_depth.routing_stats(model)["molex"]  # chosen expert layer(s), gate statistics per MoLEx layer
    model.base_model.depth_optimizer_groups(lr, weight_decay)  # gates and α with `gate_lr` / `gate_weight_decay`

Things to know:

- ``routing="batch_vote"`` (the paper's) makes one sequence's output depend on the rest of the batch, at training and
  at inference; it and ``"sequence"`` are not causal, so ``generate`` runs without KV cache for them (forced, with a
  warning). ``"token"`` routing is causal and generates with a KV cache (one side cache per expert pass).
- Each MoLEx layer runs two blocks (its own and the chosen one); when the gate picks the layer itself, it runs its own
  block twice in training (``self_choice_second_pass``, fresh dropout masks) and once in eval. ``"token"`` routing
  runs one extra full-sequence pass per distinct chosen layer.
- Merging is refused: the mixture depends on the input. ``unload()`` gives back the base model.
- ``output_attentions`` reports each layer's own attention map once, and ``output_hidden_states`` each layer's mixed
  output once: expert passes are not recorded, so both stay aligned with the base model's layers.
"""

from ...core.peft_registration import register_depth_method
from .config import MoLExConfig
from .layer import CosineGate, LinearGate, MoLExAlpha
from .model import MoLExModel

register_depth_method(name="molex", config_cls=MoLExConfig, model_cls=MoLExModel)

__all__ = ["CosineGate", "LinearGate", "MoLExAlpha", "MoLExConfig", "MoLExModel"]
