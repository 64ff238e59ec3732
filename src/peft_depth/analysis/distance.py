"""How far an adapted model's next-token distributions are from its base model's, on the same inputs.

Why: a fresh LoRA or MoD adapter (``gate_init=0``) computes the base model exactly, one with ``gate_init > 0`` or a
MoLEx mix does not; how far a method *starts* from the base is part of judging it (issue 14 reports it per run).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

__all__ = ["BaseDistance", "distance_from_base"]


@dataclass(frozen=True)
class BaseDistance:
    """Averages over the real (unpadded) positions of one batch.

    ``mean_kl``: KL(base ‖ adapted) of the next-token distributions, nats per position; ``max_abs_logit_diff``: the
    largest |Δlogit| anywhere; ``top1_agreement``: fraction of positions whose argmax token is the same;
    ``num_positions``: the real positions compared.
    """

    mean_kl: float
    max_abs_logit_diff: float
    top1_agreement: float
    num_positions: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


@torch.no_grad()
def distance_from_base(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> BaseDistance:
    """Compare ``model`` (a ``PeftModel``) with its adapters on and off (``disable_adapter()``) in eval mode.

    The model's train/eval mode is restored afterwards. Positions where ``attention_mask`` is 0 are left out.
    """
    if not hasattr(model, "disable_adapter"):
        raise TypeError(
            f"distance_from_base needs a PeftModel (with `disable_adapter()`), got {type(model).__name__}."
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    was_training = model.training
    model.eval()
    try:
        adapted = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
        with model.disable_adapter():
            base = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
    finally:
        model.train(was_training)
    real = attention_mask.bool()
    adapted, base = adapted[real], base[real]
    if base.numel() == 0:
        raise ValueError("distance_from_base got no real position (the attention mask is all zeros).")
    base_log_probs, adapted_log_probs = base.log_softmax(-1), adapted.log_softmax(-1)
    kl = (base_log_probs.exp() * (base_log_probs - adapted_log_probs)).sum(-1)
    return BaseDistance(
        mean_kl=float(kl.mean()),
        max_abs_logit_diff=float((adapted - base).abs().max()),
        top1_agreement=float((adapted.argmax(-1) == base.argmax(-1)).float().mean()),
        num_positions=int(real.sum()),
    )
