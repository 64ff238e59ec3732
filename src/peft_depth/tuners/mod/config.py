"""Configuration of MoD: mixture-of-depths ensemble of late layers ("Tuning Language Models by Mixture-of-Depths
Ensemble", Luo & Specia, arXiv 2410.13077).

The paper's code is not public. Every choice it leaves open is a field here, with the reconstruction of
``methods.md`` §4 as the default.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

from ...core.config import MAX_LOSS_COEF, LoraFieldsConfig, check_choice, check_positive_int, check_probability
from ...core.peft_registration import add_peft_type
from ...core.quantization import is_quantized_linear
from .base_parts import final_logit_multiplier, final_logit_softcap, find_base_parts

__all__ = ["MoDConfig", "ROUTER_GRANULARITIES", "MIX_SPACES"]

MOD = add_peft_type("MOD")

ROUTER_GRANULARITIES = ("token", "sequence", "static")
MIX_SPACES = ("logits", "log_probs")

#: Allowed temperatures (router and distillation): scores and logits are divided by them in float32, and below 1e-3
#: ordinary logits overflow to inf (1e-300 made every routing weight NaN); above 1e3 every softmax is uniform.
TEMPERATURE_RANGE = (1e-3, 1e3)
#: Allowed |gate_init|: g = 1 already replaces the final layer by the full mix; beyond 10 the output is an
#: extrapolation far outside the layers' range (and 1e308 overflowed the float32 gate).
GATE_INIT_BOUND = 10.0
#: Largest distill_loss_coef: the summed KL starts near 30 (see the field), so beyond 1e3 it is all the loss there is.
MAX_DISTILL_LOSS_COEF = MAX_LOSS_COEF


def _check_number_in(name: str, value: Any, low: float, high: float, why: str) -> None:
    """A real number (not a bool) in ``[low, high]``; NaN fails every comparison and is refused too."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"`{name}` must be a finite number in [{low:g}, {high:g}] ({why}), got {value!r}.")


@dataclass
class MoDConfig(LoraFieldsConfig):
    """Configuration for MoD.

    The last ``num_late_layers`` (K) blocks form an ensemble. Each earlier late layer l gets a new trainable norm N_l
    (a copy of the model's final norm); the final layer L keeps the pretrained, frozen final norm (it is the teacher).
    With the model's frozen LM head W and a router giving softmax weights w over the K layers, the output is

        z = z_L + g · Σ_l w_l (z_l − z_L),      z_l = W · N_l(h_l),

    with a learnable gate g that starts at 0, so a fresh adapter computes the base model exactly. In logit space this
    equals mixing the normalised hidden states before one head projection, which is how it runs (one LM-head
    matmul). An auxiliary distillation loss lets the detached final-layer distribution teach each earlier late layer.

    MoD alone (only the norms, router and gate train) is the default: ``target_modules=None`` or ``r=0``. Give LoRA
    ``target_modules`` (and ``r`` > 0) to combine MoD with LoRA in the same adapter.
    """

    aux_loss_fields = ("distill_loss_coef",)

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Modules that also get LoRA (names, a regex, or 'all-linear'). None (default) means MoD alone: "
            "only the new norms, the router and the gate train. The output head cannot be a target: MoD shares it, "
            "frozen, across the late layers."
        },
    )
    num_late_layers: int = field(
        default=4,
        metadata={
            "help": "K: how many of the last blocks form the ensemble, counting the final block. An integer, at "
            "least 2 and at most the model's depth (checked against the base model before anything is built)."
        },
    )
    router_granularity: str = field(
        default="token",
        metadata={
            "help": "What the routing weights depend on. 'token': a linear router on each token's normalised final "
            "hidden state. 'sequence': the same router on the running mean of those states over the real tokens up "
            "to each position (causal, so generation with a KV cache equals generation without; the running mean "
            "rides on the cache and follows beam reordering and assisted decoding's cropping). 'static': one "
            "learned vector of K logits shared by all tokens."
        },
    )
    router_temperature: float = field(
        default=1.0,
        metadata={"help": "The router's softmax temperature τ (w = softmax(logits / τ)); a number in [0.001, 1000]."},
    )
    mix_space: str = field(
        default="logits",
        metadata={
            "help": "'logits' (default): mix logits, computed as one head projection of the mixed normalised hidden "
            "states, so `last_hidden_state`, `logits_to_keep`, generate and TRL's fused LM head all see the "
            "ensemble. 'log_probs': mix per-layer log-probabilities; this needs K head projections at every kept "
            "position (K× the logits memory), works only through the model's own LM-head call (not TRL's fused LM "
            "head, not tensor `logits_to_keep`), and is refused for models with final-logit soft-capping."
        },
    )
    gate_init: float = field(
        default=0.0,
        metadata={
            "help": "Initial value of the gate g, a number in [-10, 10]. 0 (default) makes a fresh adapter equal the "
            "base model; the gate still gets gradient at 0, and the router once the gate has moved."
        },
    )
    gate_lr: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the gate g, reported by `MoDModel.depth_optimizer_groups` as the group 'gate' "
            "(so `DepthSFTConfig.gate_learning_rate` overrides it). None: the trainer's learning rate. While g is 0 "
            "the router and the new norms get no gradient from the LM loss (their effect is multiplied by g), so a "
            "higher gate learning rate (or `gate_init` > 0) makes the ensemble start learning sooner."
        },
    )
    router_lr: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the router and the new norms (group 'router'). None: the trainer's learning "
            "rate. Weight decay: the trainer's, except for biases and norm weights (0, as the trainer's own groups)."
        },
    )
    distill_loss_coef: float = field(
        default=0.1,
        metadata={
            "help": "λ: weight of the distillation loss Σ_l KL(softmax(z_L/T) ‖ softmax(z_l/T)) · T² over the "
            "earlier late layers, reported by `peft_depth.aux_losses` as 'distill'. The paper gives no value; 0.1 "
            "because the summed KL starts near 30 on SmolLM2-135M with K=4 (measured), ten times the LM loss, and "
            "would otherwise dominate. 0 turns it off (and skips its computation). A number in [0, 1000]."
        },
    )
    distill_temperature: float = field(
        default=1.0,
        metadata={"help": "T: temperature of both distributions in the distillation KL; a number in [0.001, 1000]."},
    )
    distill_fraction: float = field(
        default=1.0,
        metadata={
            "help": "Fraction of the label-carrying positions the distillation loss uses, drawn at random each "
            "training forward (at least one position); in (0, 1]. 1.0 distils on all of them. An eval-mode forward "
            "with labels distils every position (the same expectation, without the sampling noise), so eval_loss "
            "repeats exactly."
        },
    )
    distill_chunk_size: int = field(
        default=128,
        metadata={
            "help": "Positions per chunk when the distillation projects hidden states through the LM head; peak "
            "extra memory is about (K+2) × chunk × vocabulary floats, independent of the sequence length. A "
            "positive integer."
        },
    )

    def __post_init__(self) -> None:
        # LoraFieldsConfig requires r > 0; MoD allows r = 0 (MoD alone), so validate the LoRA fields ourselves.
        super(LoraFieldsConfig, self).__post_init__()
        if isinstance(self.r, bool):  # False == 0 would otherwise pass as "MoD alone"
            raise ValueError(f"`r` must be an integer >= 0 (0: MoD alone, no LoRA), got {self.r!r}.")
        self._check_lora_fields(allow_zero_rank=True)
        self.peft_type = MOD
        check_choice("bias", self.bias, ("none", "all", "mod_only"))
        if (
            isinstance(self.num_late_layers, bool)
            or not isinstance(self.num_late_layers, int)
            or self.num_late_layers < 2
        ):
            raise ValueError(
                "`num_late_layers` must be an integer >= 2 (the final layer plus at least one earlier layer to mix "
                f"with) and at most the model's depth, got {self.num_late_layers!r}."
            )
        check_choice("router_granularity", self.router_granularity, ROUTER_GRANULARITIES)
        check_choice("mix_space", self.mix_space, MIX_SPACES)
        _check_number_in(
            "router_temperature", self.router_temperature, *TEMPERATURE_RANGE, "routing scores are divided by it"
        )
        _check_number_in(
            "distill_temperature", self.distill_temperature, *TEMPERATURE_RANGE, "logits are divided by it"
        )
        _check_number_in("distill_loss_coef", self.distill_loss_coef, 0.0, MAX_DISTILL_LOSS_COEF, "0 turns it off")
        check_probability("distill_fraction", self.distill_fraction, allow_zero=False)
        check_positive_int("distill_chunk_size", self.distill_chunk_size)
        _check_number_in("gate_init", self.gate_init, -GATE_INIT_BOUND, GATE_INIT_BOUND, "0 starts at the base model")
        for name in ("gate_lr", "router_lr"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf")
            ):
                raise ValueError(
                    f"`{name}` must be None (the trainer's learning rate) or a finite number > 0, got {value!r}."
                )
        if self.r == 0 and self.target_modules:
            warnings.warn(
                f"MoDConfig has r=0, so `target_modules`={self.target_modules!r} get no LoRA: this adapter is MoD "
                "alone. Set r > 0 to combine MoD with LoRA.",
                UserWarning,
                stacklevel=3,
            )

    @property
    def uses_lora(self) -> bool:
        """Whether this adapter carries LoRA next to the ensemble (r > 0 and some target modules)."""
        return self.r > 0 and bool(self.target_modules)

    def check_against_base(self, model: nn.Module) -> None:
        """Refuse, before anything is built, a base model MoD cannot plug into or fields that do not fit it."""
        super().check_against_base(model)
        parts = find_base_parts(model)
        depth = parts.stack.num_layers
        if self.num_late_layers > depth:
            raise ValueError(
                f"`num_late_layers` ({self.num_late_layers}) is larger than the model's depth ({depth} blocks in "
                f"`{parts.stack.path}`); allowed: 2 to {depth}."
            )
        if self.uses_lora and parts.head_name and check_target_module_exists(self, parts.head_name):
            raise ValueError(
                f"`target_modules` matches the output head `{parts.head_name}`: MoD shares the frozen LM head across "
                "the late layers (and the final layer is the teacher), so it cannot carry LoRA. Exclude it."
            )
        if is_quantized_linear(parts.head):
            name = parts.head_name or "the output head"
            raise ValueError(
                f"The output head `{name}` of this base is quantized ({type(parts.head).__name__}). MoD projects every "
                "late layer through that head (the ensemble's dtype, the distillation, log-probability mixing), so it "
                f"needs the head in floating point: keep it out of quantization, e.g. "
                f"BitsAndBytesConfig(..., llm_int8_skip_modules=[..., '{name.rsplit('.', 1)[-1]}'])."
            )
        final_logit_multiplier(model)  # refuses a logit scaling of unknown meaning
        norm_width = _norm_width(parts.final_norm)
        if norm_width is not None and norm_width != parts.head.in_features:
            raise ValueError(
                f"MoD mixes the late layers' states at the final norm's width ({norm_width}), but the output head reads "
                f"{parts.head.in_features} features (a projection sits between them, e.g. OPT's "
                "`word_embed_proj_dim`): MoD needs the head to read the final norm's output directly."
            )
        if self.mix_space == "log_probs" and final_logit_softcap(model) is not None:
            raise ValueError(
                "`mix_space`='log_probs' is not supported on models with final-logit soft-capping (the cap would act "
                "on mixed log-probabilities); use `mix_space`='logits', where the cap applies after mixing."
            )


def _norm_width(norm: nn.Module) -> int | None:
    """The feature width a final norm acts on (its weight's or ``normalized_shape``'s last size), or None."""
    weight = getattr(norm, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() >= 1:
        return int(weight.shape[-1])
    shape = getattr(norm, "normalized_shape", None)
    return int(shape[-1]) if shape else None
