"""Configuration of MoLEx: mixture of layer experts ("MoLEx: Mixture of Layer Experts for Finetuning with Sparse
Upcycling", Teo & Nguyen, ICLR 2025, arXiv 2503.11144)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ...core.config import (
    LoraFieldsConfig,
    check_choice,
    check_loss_coef,
    check_non_negative_number,
    check_positive_int,
    check_probability,
)
from ...core.peft_registration import add_peft_type

__all__ = ["MoLExConfig", "ROUTING_MODES", "GATE_TYPES"]

MOLEX = add_peft_type("MOLEX")

ROUTING_MODES = ("batch_vote", "sequence", "token")
GATE_TYPES = ("linear", "cosine")
LEARNED_ALPHA_STARTS = ("official", "alpha")

#: Per-task settings of the official GLUE scripts (examples/NLU/roberta_base_<task>.sh of the official code): gate type
#: and projection size, shared or per-layer gate (`--use_indv_gate`), balance coefficient (0 where a script omits
#: `--use_load_balance`, the trainer's 0.01 where it sets no `--g_balance`), learned or fixed α (`--use_learn_weight`,
#: `--weight_main_init`), and the gate optimizer group: lr 0.1 / weight decay 0.1 where a script sets them, else the
#: official trainer's defaults, 5e-5 / 0.0 (CoLA, MNLI). Tasks not listed use the defaults.
_GLUE_GATE_GROUP = dict(gate_lr=0.1, gate_weight_decay=0.1)
_TRAINER_GATE_GROUP = dict(gate_lr=5e-5, gate_weight_decay=0.0)
#: The official code's gate optimizer settings, the defaults of `gate_lr` / `gate_weight_decay` (config layout >= 2):
#: 0.1 / 0.1 in the GLUE scripts (RoBERTa), 0.01 as the GPT-2 NLG code's default gate lr (no gate weight decay set).
OFFICIAL_GATE_LR_ENCODER = 0.1
OFFICIAL_GATE_WEIGHT_DECAY_ENCODER = 0.1
OFFICIAL_GATE_LR_GENERATIVE = 0.01
TASK_PRESETS: dict[str, dict] = {
    "sst2": dict(gate_type="cosine", gate_proj_dim=128, shared_gate=True, balance_loss_coef=0.01, **_GLUE_GATE_GROUP),
    "mrpc": dict(shared_gate=True, balance_loss_coef=0.0, learn_alpha=True, **_GLUE_GATE_GROUP),
    "rte": dict(shared_gate=False, balance_loss_coef=0.001, **_GLUE_GATE_GROUP),
    "stsb": dict(shared_gate=False, balance_loss_coef=0.001, **_GLUE_GATE_GROUP),
    "qnli": dict(gate_type="cosine", gate_proj_dim=96, balance_loss_coef=0.0, learn_alpha=True, **_GLUE_GATE_GROUP),
    "mnli": dict(
        gate_type="cosine", gate_proj_dim=416, balance_loss_coef=0.005, learn_alpha=True, **_TRAINER_GATE_GROUP
    ),
    "qqp": dict(gate_type="cosine", gate_proj_dim=384, balance_loss_coef=0.001, learn_alpha=True, **_GLUE_GATE_GROUP),
    "cola": dict(alpha=0.95, balance_loss_coef=0.01, **_TRAINER_GATE_GROUP),
}
#: The paper's fixed mixing weights: 0.5 on GLUE (encoders), 0.95 for GPT-2 on E2E (a pretrained decoder mixed at
#: 0.5 in every layer starts far from the base model).
DEFAULT_ALPHA_ENCODER = 0.5
DEFAULT_ALPHA_DECODER = 0.95


def _check_layer_list(name: str, value) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"`{name}` must be None or a non-empty list of layer indices, got {value!r}.")
    for i, index in enumerate(value):
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"`{name}[{i}]` must be a layer index >= 0, got {index!r}.")
    if len(set(value)) != len(value):
        raise ValueError(f"`{name}` lists a layer twice: {list(value)!r}.")
    return sorted(value)


@dataclass
class MoLExConfig(LoraFieldsConfig):
    """Configuration for MoLEx.

    LoRA (rank ``r``) is put on ``target_modules`` of every block, as plain LoRA. On top, each MoLEx layer i (the
    blocks in ``molex_layers``) gets a gate that reads the block's per-token input z and scores the candidate layers
    (``expert_layers``) as experts. With j the chosen layer, the block's output becomes

        α · u_i(z) + (1 − α) · u_j(z)

    where u_i and u_j are the pretrained blocks i and j *with their LoRA*, both applied to the same z with block i's
    position embeddings and mask. No expert weights are added: the experts are the model's own layers. Where the model
    has ``config.layer_types`` (sliding vs full attention), only layers of block i's type are candidates.

    Generation: ``"batch_vote"`` and ``"sequence"`` choose j from all tokens of the input, later tokens included, so
    they are not causal and a KV cache would freeze a choice that later tokens should change; ``generate`` therefore
    runs without cache for them (forced, with one warning). ``"token"`` routing is causal and keeps the KV cache: each
    expert pass gets its own cache, so layer j's real cache slot is never written by layer i's expert call.
    """

    aux_loss_fields = ("balance_loss_coef",)

    molex_layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "Block indices whose output is mixed with a routed layer expert. None: every block for encoders "
            "(the paper's GLUE setting), the first half for decoders (the paper's GPT-2 setting, 12 of 24)."
        },
    )
    expert_layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "Block indices the gates may choose as experts (None: all layers, as in the paper). Layers of a "
            "different `layer_types` entry than the MoLEx layer are never candidates."
        },
    )
    routing: str = field(
        default="batch_vote",
        metadata={
            "help": "'batch_vote' (official): top-1 per token over the non-padding tokens, the majority vote gives "
            "one expert j per batch (outputs then depend on the batch's composition). 'sequence': one j per "
            "sequence, by majority over its tokens. 'token': top-1 per token; each distinct j costs a full-sequence "
            "pass of block j (attention mixes tokens), and only this mode is causal (KV cache in generate)."
        },
    )
    alpha: float | None = field(
        default=None,
        metadata={
            "help": "Weight of the layer's own output, α in (0, 1). None: 0.5 for encoders and 0.95 for decoders "
            "(the paper's values). With `learn_alpha` it is the starting value. For short fine-tuning runs prefer "
            "0.95: at 0.5 an untrained all-MiniLM-L6-v2 adapter moves the final hidden states by 1.3x their norm "
            "(0.13 at 0.95), and after 250 steps on SST-2 scored 3.9 pp below 0.95, which matched LoRA "
            "(benchmarks/results/quality.md)."
        },
    )
    learn_alpha: bool = field(
        default=False,
        metadata={
            "help": "Learn α as softmax(w_own, w_other), initialised to give `alpha` (the official "
            "`use_learn_weight`); one pair of weights for all MoLEx layers or one per layer (`shared_alpha`)."
        },
    )
    shared_alpha: bool | None = field(
        default=None,
        metadata={
            "help": "With `learn_alpha`: one learned α for all MoLEx layers (True) or one per layer (False). None "
            "(default): as the gate, `shared_gate` - the official encoder holds one `weight_main`/`weight_other` pair "
            "when the gate is shared and one per layer with `--use_indv_gate`. Configs saved with "
            "`peft_depth_version` <= 4 learned one α per layer and keep it."
        },
    )
    learned_alpha_start: str = field(
        default="official",
        metadata={
            "help": "Where a learned α starts. 'official': as `use_learn_weight`, whose two weights start at (α0, 1−α0) "
            "and α = softmax of them, so α starts at 1/(1+exp(1−2α0)) (0.5 for α0 = 0.5, 0.71 for 0.95). 'alpha': "
            "exactly at α0. Only the start differs (α depends on the weights' difference only)."
        },
    )
    gate_type: str = field(
        default="linear",
        metadata={
            "help": "'linear': Linear(hidden, L) with bias (official default). 'cosine': project to `gate_proj_dim`, "
            "cosine similarity with L learned expert embeddings times a learnable scale exp(t), t0 = log 2, scale "
            "clamped at 100 (the official CosineTopKGate, with one difference: each token's projection is "
            "L2-normalised over its own features; the official code normalises dim=1 of a [batch, seq, proj] tensor, "
            "i.e. over the sequence, so a token's gate logits depended on the sequence's length and later tokens)."
        },
    )
    gate_proj_dim: int = field(
        default=256, metadata={"help": "Projection size of the cosine gate (official default 256)."}
    )
    shared_gate: bool = field(
        default=True,
        metadata={
            "help": "One gate shared by all MoLEx layers (official default) or one gate per layer (the official "
            "`use_indv_gate`, used for RTE and STS-B)."
        },
    )
    balance_loss_coef: float = field(
        default=0.01,
        metadata={
            "help": "Weight of the load-balancing loss E·Σ f·P, per MoLEx layer, summed over layers (E: the layer's "
            "number of candidates; f: fraction of real tokens routed to each expert, for 'batch_vote' the one-hot "
            "of the voted j; P: mean gate probability). Official range 1e-3 to 1e-2; 0 turns it off, and then the "
            "official gate receives no gradient at all. Read through `peft_depth.aux_losses`."
        },
    )
    self_choice_second_pass: bool | None = field(
        default=None,
        metadata={
            "help": "In training, where the gate picks the MoLEx layer itself (j = i): run the layer a second time, "
            "with dropout masks of its own, and mix the two passes α·u_i + (1−α)·u_i', as the official code does (it "
            "always runs the chosen layer as a call of its own); a learned α then also gets a gradient there. False: "
            "the layer's one output (the mixture of two identical passes). Inference is the same either way, and so is "
            "a training forward that continues from a KV cache (the second pass keeps no cache). None "
            "(default): True; configs saved with `peft_depth_version` <= 4 keep False."
        },
    )
    straight_through_gate: bool = field(
        default=False,
        metadata={
            "help": "Deviation from the paper, off by default. Scale the expert term (1−α)·u_j by p_j / stop_grad(p_j) "
            "per token (p_j: gate probability of the chosen j). Outputs are unchanged, but the gate also learns from "
            "the task loss, not only from the balance loss."
        },
    )
    gate_lr: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the gates and learned α, reported by `MoLExModel.depth_optimizer_groups`. None: "
            "the official code's value for the model kind, 0.1 for encoders (the GLUE scripts) and 0.01 for "
            "generative models (the GPT-2 NLG code's default); configs saved with `peft_depth_version` 1 keep their "
            "meaning, the trainer's learning rate. `DepthSFTConfig.gate_learning_rate` overrides either."
        },
    )
    gate_weight_decay: float | None = field(
        default=None,
        metadata={
            "help": "Weight decay of the gates and learned α. None: 0.1 for encoders (the GLUE scripts), the "
            "trainer's for generative models (the NLG code does not set one) and for `peft_depth_version` 1 configs."
        },
    )

    def gate_group_settings(self, base_lr: float, weight_decay: float, *, generative: bool) -> tuple[float, float]:
        """``(lr, weight_decay)`` of the gate group, with the official defaults resolved (see the fields)."""
        official = self.peft_depth_version >= 2
        if self.gate_lr is not None:
            lr = self.gate_lr
        else:
            lr = (OFFICIAL_GATE_LR_GENERATIVE if generative else OFFICIAL_GATE_LR_ENCODER) if official else base_lr
        if self.gate_weight_decay is not None:
            decay = self.gate_weight_decay
        else:
            decay = OFFICIAL_GATE_WEIGHT_DECAY_ENCODER if official and not generative else weight_decay
        return lr, decay

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = MOLEX
        check_choice("bias", self.bias, ("none", "all"))
        check_choice("routing", self.routing, ROUTING_MODES)
        check_choice("gate_type", self.gate_type, GATE_TYPES)
        check_choice("learned_alpha_start", self.learned_alpha_start, LEARNED_ALPHA_STARTS)
        check_positive_int("gate_proj_dim", self.gate_proj_dim)
        check_loss_coef("balance_loss_coef", self.balance_loss_coef)
        if self.alpha is not None:
            check_probability("alpha", self.alpha, allow_zero=False, allow_one=False)
        if self.shared_alpha is None:
            # Made explicit, so that the saved config says what was trained whatever a later default is; the value
            # filled in is kept, so that a later check can tell it from one set by hand (`_refresh_defaults`).
            self.shared_alpha = self.shared_gate if self.peft_depth_version >= 5 else False
            self._shared_alpha_filled_in = self.shared_alpha
        if self.self_choice_second_pass is None:
            self.self_choice_second_pass = self.peft_depth_version >= 5
        for name in ("learn_alpha", "shared_gate", "shared_alpha", "self_choice_second_pass", "straight_through_gate"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}.")
        if self.gate_lr is not None:
            check_non_negative_number("gate_lr", self.gate_lr)
        if self.gate_weight_decay is not None:
            check_non_negative_number("gate_weight_decay", self.gate_weight_decay)
        self.molex_layers = _check_layer_list("molex_layers", self.molex_layers)
        self.expert_layers = _check_layer_list("expert_layers", self.expert_layers)

    def _keep_fill_in_records(self, checked: MoLExConfig) -> None:
        if hasattr(checked, "_shared_alpha_filled_in"):
            self._shared_alpha_filled_in = checked._shared_alpha_filled_in
        else:
            self.__dict__.pop("_shared_alpha_filled_in", None)

    def _refresh_defaults(self) -> None:
        # a `shared_alpha` the constructor filled in follows the current `shared_gate` when the config is checked
        # again; one set by hand since (another value than the one filled in) stays
        filled_in = getattr(self, "_shared_alpha_filled_in", None)
        if filled_in is not None and self.shared_alpha == filled_in:
            self.shared_alpha = None

    def resolve_layers(self, num_layers: int, *, causal: bool) -> tuple[list[int], list[int]]:
        """``(molex_layers, expert_layers)`` for a stack of ``num_layers`` blocks; ValueError if out of range."""
        molex = self.molex_layers
        if molex is None:
            molex = list(range(max(1, num_layers // 2))) if causal else list(range(num_layers))
        experts = self.expert_layers if self.expert_layers is not None else list(range(num_layers))
        for name, indices in (("molex_layers", molex), ("expert_layers", experts)):
            bad = [index for index in indices if index >= num_layers]
            if bad:
                raise ValueError(
                    f"`{name}` contains {bad} but the model has {num_layers} layers (valid indices 0..{num_layers - 1})."
                )
        return list(molex), list(experts)

    def resolve_alpha(self, *, causal: bool) -> float:
        """α of the mixture: the fixed value, or where a learned α starts (``learned_alpha_start``)."""
        alpha = (
            float(self.alpha)
            if self.alpha is not None
            else (DEFAULT_ALPHA_DECODER if causal else DEFAULT_ALPHA_ENCODER)
        )
        if self.learn_alpha and self.learned_alpha_start == "official":
            return 1.0 / (1.0 + math.exp(1.0 - 2.0 * alpha))  # softmax((α0, 1 − α0))[0]
        return alpha

    @classmethod
    def for_task(cls, task: str, **overrides) -> MoLExConfig:
        """The official GLUE script's MoLEx settings for ``task`` (``TASK_PRESETS``), with ``overrides`` on top.

        E.g. ``MoLExConfig.for_task("sst2", task_type="SEQ_CLS", target_modules=["query", "value"])``. The presets
        cover the gate and α; LoRA's rank, the learning rate and the epochs of the scripts are the trainer's business
        (methods.md lists them).
        """
        if not isinstance(task, str):
            raise ValueError(
                f"`task` must be one of {sorted(TASK_PRESETS)} (official MoLEx GLUE scripts); got {task!r}."
            )
        key = task.lower().replace("-", "").replace("_", "")
        if key not in TASK_PRESETS:
            raise ValueError(
                f"`task` must be one of {sorted(TASK_PRESETS)} (official MoLEx GLUE scripts); got {task!r}."
            )
        return cls(**{**TASK_PRESETS[key], **overrides})
