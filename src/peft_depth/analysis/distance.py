"""How far an adapted model's outputs are from its base model's, on the same inputs.

Why: a fresh LoRA or MoD adapter (``gate_init=0``) computes the base model exactly, one with ``gate_init > 0`` or a
MoLEx mix does not; how far a method *starts* from the base is part of judging it (issue 14 reports it per run).
For a sequence classifier whose head is new, the head says little, so the change of the final hidden states (what
the head reads) is measured too.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass

import torch
from torch import nn

__all__ = ["BaseDistance", "distance_from_base"]


@dataclass(frozen=True)
class BaseDistance:
    """Averages over the real (unpadded) positions of one batch.

    ``mean_kl``: KL(base ‖ adapted) of the output distributions, nats per position (per row for a sequence
    classifier, whose logits are one per row); ``max_abs_logit_diff``: the largest |Δlogit| anywhere;
    ``top1_agreement``: fraction of positions (rows) whose argmax is the same; ``num_positions``: the real positions
    (rows) compared; ``hidden_relative_change``: mean over real token positions of ‖h_adapted − h_base‖ / ‖h_base‖
    for the final hidden states.
    """

    mean_kl: float
    max_abs_logit_diff: float
    top1_agreement: float
    num_positions: int
    hidden_relative_change: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _forward(model: nn.Module, input_ids, attention_mask, extra) -> tuple[torch.Tensor, torch.Tensor]:
    output = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **extra)
    if output.hidden_states is None:
        raise ValueError(f"{type(model).__name__} returned no hidden states for `output_hidden_states=True`.")
    return output.logits.float(), output.hidden_states[-1].float()


@torch.no_grad()
def distance_from_base(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **model_kwargs
) -> BaseDistance:
    """Compare ``model`` (a ``PeftModel``) with its adapters on and off (``disable_adapter()``) in eval mode.

    ``model_kwargs`` go to both forwards (e.g. ``token_type_ids``); causal LMs get ``use_cache=False``. The model's
    train/eval mode and the global random state are restored afterwards, so measuring never changes a run that
    follows. Positions where ``attention_mask`` is 0 are left out.
    """
    if not hasattr(model, "disable_adapter"):
        raise TypeError(
            f"distance_from_base needs a PeftModel (with `disable_adapter()`), got {type(model).__name__}."
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    real = attention_mask.bool()
    if not real.any():
        raise ValueError("distance_from_base got no real position (the attention mask is all zeros).")
    if "use_cache" in inspect.signature(model.get_base_model().forward).parameters:  # decoders with a KV cache
        model_kwargs = {"use_cache": False, **model_kwargs}
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            adapted, adapted_hidden = _forward(model, input_ids, attention_mask, model_kwargs)
            with model.disable_adapter():
                base, base_hidden = _forward(model, input_ids, attention_mask, model_kwargs)
    finally:
        model.train(was_training)
    if base.dim() == 3:  # one distribution per position (LM head); else one per row (classifier head)
        adapted, base = adapted[real], base[real]
    base_log_probs, adapted_log_probs = base.log_softmax(-1), adapted.log_softmax(-1)
    kl = (base_log_probs.exp() * (base_log_probs - adapted_log_probs)).sum(-1)
    hidden_change = (adapted_hidden - base_hidden)[real].norm(dim=-1) / base_hidden[real].norm(dim=-1).clamp_min(1e-12)
    return BaseDistance(
        mean_kl=float(kl.mean()),
        max_abs_logit_diff=float((adapted - base).abs().max()),
        top1_agreement=float((adapted.argmax(-1) == base.argmax(-1)).float().mean()),
        num_positions=int(base.shape[0]),
        hidden_relative_change=float(hidden_change.mean()),
    )
