"""The compared configurations ("arms"): plain peft LoRA and each depth method, with learning-rate grids and claims.

Every arm adapts the same linear layers (all seven projections of a Llama block; query/value of a BERT layer) with
lora_alpha = 2·r, so a LoRA-like update has the same scale at every rank. Fields an arm does not set keep the
method's config defaults, and the whole resolved config is recorded with each run (and is part of its run key), so
a change of a default makes new runs rather than silently reusing old ones.

Budgets (``budget``): ``"baseline"`` is LoRA at ``BASELINE_RANK``; ``"own"`` arms are compared with the LoRA whose
rank gives the same trainable-parameter count (``budget.plan_budgets`` finds it); ``"rank"`` arms have their own
LoRA rank chosen to match the baseline LoRA's count; ``"unmatched"`` arms are compared with the baseline LoRA on
purpose (MoD alone: its claim *is* far fewer parameters).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .models import CAUSAL, ModelSpec

__all__ = ["Arm", "Claim", "CLAIM_KINDS", "BASELINE_RANK", "arms_for", "lora_arm", "build_config", "arm_by_name"]

#: LoRA rank of the baseline every matched budget is built around (the MoLA/MoLEx papers' r=8).
BASELINE_RANK = 8
#: Arm option (not a config field): DLO's capacity annealing length as a fraction of the run's steps.
CAPACITY_ANNEALING_FRACTION = "capacity_annealing_fraction"
#: Name of the baseline LoRA arm; LoRA partners at other ranks are named "lora_r{rank}".
BASELINE = "lora"


#: Kinds of claim: "better" (the interval must exclude 0 upwards), "non_inferior" (≈: no worse than the compared arm
#: by more than ``verdicts.NON_INFERIORITY_MARGIN``).
CLAIM_KINDS = ("better", "non_inferior")


@dataclass(frozen=True)
class Claim:
    """One testable part of a paper's claim about an arm.

    ``against``: ``"partner"`` (the budget-matched LoRA) or ``"reference"`` (the arm's ``claim_reference``);
    ``fewer_flops``: the claim also says the arm trains with fewer FLOPs than the compared arm (DLO vs dense).
    """

    against: str
    kind: str
    fewer_flops: bool = False

    def __post_init__(self) -> None:
        if self.against not in ("partner", "reference") or self.kind not in CLAIM_KINDS:
            raise ValueError(f"Bad claim {self!r}: against partner|reference, kind one of {CLAIM_KINDS}.")


@dataclass(frozen=True)
class Arm:
    """One compared configuration. ``options`` are fixed config fields; ``rank`` is its LoRA rank (set by budgets)."""

    name: str
    label: str
    method: str
    lr_grid: tuple[float, ...]
    budget: str
    claim: str = ""
    #: Arm the paper's claim compares with (besides the budget-matched LoRA), e.g. DLO vs dense expansion.
    claim_reference: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    rank: int = BASELINE_RANK
    #: A diagnosis (an ablation asking why another arm scores as it does), not part of a suite's comparison: it runs
    #: only when named (``quality.py run --arms NAME``), on the tasks chosen then.
    diagnostic: bool = False
    #: What the verdict table tests (``verdicts.py``); empty for baselines and references.
    claims: tuple[Claim, ...] = ()

    def with_rank(self, rank: int) -> Arm:
        return Arm(**{**self.__dict__, "rank": rank})


def lora_arm(family: str, rank: int = BASELINE_RANK) -> Arm:
    # Three learning rates around the usual LoRA range; short CPU runs favour the upper end.
    grid = (3e-4, 1e-3, 3e-3) if family == CAUSAL else (5e-4, 1e-3, 2e-3)
    name = BASELINE if rank == BASELINE_RANK else f"lora_r{rank}"
    return Arm(name, f"LoRA r={rank}", "lora", grid, "baseline", "the baseline", rank=rank)


def _molex_arm(lr_grid: tuple[float, ...]) -> Arm:
    claim = "beats LoRA at the same parameters"
    return Arm("molex_lora", "MoLEx + LoRA", "molex", lr_grid, "own", claim, claims=(Claim("partner", "better"),))


#: MoLA's dropout in the sweep: one mask shared by a token's experts, what every MoLA run of the ledger trained with
#: (the package's default before `peft_depth_version` 4); kept so the runs to come pair with those already done.
MOLA_SWEEP_DROPOUT = "shared"


#: MoLEx's learned α in the sweep: one per layer, what the ledger's MoLEx runs trained with (the package's only
#: behaviour before `peft_depth_version` 5, which shares one α when the gate is shared, as the official encoder does).
#: It matters for the arms that learn α (MiniLM MRPC, through the official preset); kept so the runs pair up.
MOLEX_SWEEP_SHARED_ALPHA = False
#: Likewise a layer whose gate picks itself runs once in training (the only behaviour before layout 5, which runs it
#: a second time with its own dropout draws, as the official code does).
MOLEX_SWEEP_SECOND_PASS = False


def _causal_arms() -> list[Arm]:
    method_grid = (3e-4, 1e-3)
    return [
        lora_arm(CAUSAL),
        Arm(
            "mola_increasing",
            "MoLA ▽ (2-4-6-8 experts)",
            "mola",
            method_grid,
            "own",
            "▽ (more experts in higher layers) beats □ with as many experts, and LoRA",
            "mola_uniform",
            {"expert_pattern": [2, 4, 6, 8], "top_k": 2, "expert_dropout": MOLA_SWEEP_DROPOUT},
            claims=(Claim("reference", "better"), Claim("partner", "better")),
        ),
        Arm(
            "mola_uniform",
            "MoLA □ (5-5-5-5 experts)",
            "mola",
            method_grid,
            "own",
            "□ is the allocation ▽ is claimed to beat",
            None,
            {"expert_pattern": [5, 5, 5, 5], "top_k": 2, "expert_dropout": MOLA_SWEEP_DROPOUT},
        ),
        # Only norms, router and gate train (about 4k parameters on SmolLM2): a larger step size than LoRA's.
        Arm(
            "mod",
            "MoD alone",
            "mod",
            (3e-3, 1e-2),
            "unmatched",
            "≈ LoRA with ~97% fewer trainable parameters",
            claims=(Claim("partner", "non_inferior"),),
        ),
        Arm(
            "mod_lora",
            "MoD + LoRA",
            "mod",
            method_grid,
            "own",
            "adds to LoRA on reasoning tasks",
            None,
            {"lora": True},
            claims=(Claim("partner", "better"),),
        ),
        _molex_arm(method_grid),
        # LoRA of the rank that matches the baseline budget on the new layers and on the original layers (the paper
        # trains every weight; routing frozen original layers collapsed to chance, issue 14); capacity anneals over
        # the first half of the run (the official 1000 steps would not start to bite in a run this short).
        Arm(
            "dlo",
            "DLO (routed)",
            "dlo",
            method_grid,
            "rank",
            "as good as dense expansion, at fewer FLOPs",
            "dense",
            {
                "new_layer_training": "lora",
                "lora_on_original_layers": True,
                "routed_layers": "all",  # the paper's routing (the default once originals train), stated for the run key
                CAPACITY_ANNEALING_FRACTION: 0.5,
            },
            claims=(Claim("reference", "non_inferior", fewer_flops=True),),
        ),
        Arm(
            "dense",
            "Dense expansion (DLO, no routing)",
            "dlo",
            method_grid,
            "rank",
            "the LLaMA-Pro baseline DLO is measured against",
            None,
            {"new_layer_training": "lora", "lora_on_original_layers": True, "routed_layers": "none"},
        ),
    ]


def _encoder_arms() -> list[Arm]:
    return [
        lora_arm("encoder"),
        _molex_arm((5e-4, 1e-3)),
        # Diagnosis of MoLEx below LoRA on MiniLM SST-2: the official GLUE α = 0.5 mixes another layer's output
        # half-and-half into every layer from the first step; α = 0.95 (the official CoLA / GPT-2 value) starts
        # close to the base. Same gate, same budget; compared with both LoRA and the α = 0.5 arm.
        Arm(
            "molex_lora_alpha95",
            "MoLEx + LoRA, α = 0.95 (diagnosis)",
            "molex",
            (5e-4, 1e-3),
            "own",
            "diagnosis: starting near the base (α = 0.95) closes MoLEx's gap to LoRA",
            "molex_lora",
            {"alpha": 0.95},
            diagnostic=True,
            claims=(Claim("reference", "better"),),
        ),
    ]


def arms_for(spec: ModelSpec) -> list[Arm]:
    """The arms compared on this model family (before budget matching fixes partner and DLO ranks)."""
    return _causal_arms() if spec.family == CAUSAL else _encoder_arms()


def arm_by_name(arms: list[Arm], name: str) -> Arm:
    for arm in arms:
        if arm.name == name:
            return arm
    raise ValueError(f"No arm named {name!r}; arms: {', '.join(a.name for a in arms)}.")


#: Fields of an official per-task MoLEx preset that an encoder arm takes over (its LoRA fields stay the arm's).
MOLEX_PRESET_FIELDS = (
    "shared_gate",
    "balance_loss_coef",
    "gate_lr",
    "gate_weight_decay",
    "gate_type",
    "gate_proj_dim",
    "learn_alpha",
    "alpha",
)


def _molex_task_preset(task: str | None) -> dict[str, Any]:
    """Official per-task MoLEx settings when the package offers them (``MoLExConfig.for_task``), else none."""
    from peft_depth import MoLExConfig

    for_task = getattr(MoLExConfig, "for_task", None)
    if task is None or for_task is None:
        return {}
    try:
        preset = for_task(task)
    except (KeyError, ValueError):
        return {}
    return {k: v for k, v in preset.to_dict().items() if k in MOLEX_PRESET_FIELDS}


def build_config(arm: Arm, spec: ModelSpec, task: str | None = None, steps: int = 1):
    """The peft config of ``arm`` on ``spec`` for a run of ``steps`` training steps (fresh object each call)."""
    from peft import LoraConfig

    import peft_depth

    causal = spec.family == CAUSAL
    common: dict[str, Any] = {
        "r": arm.rank,
        "lora_alpha": 2 * arm.rank,
        "lora_dropout": 0.05 if causal else 0.1,
        "target_modules": spec.target_modules,
    }
    # SEQ_CLS: peft trains (and saves) the new classifier head for every arm alike.
    common["task_type"] = "CAUSAL_LM" if causal else "SEQ_CLS"
    options = dict(arm.options)
    builders: dict[str, Callable[..., Any]] = {
        "lora": LoraConfig,
        "mola": peft_depth.MoLAConfig,
        "molex": peft_depth.MoLExConfig,
        "mod": peft_depth.MoDConfig,
        "dlo": peft_depth.DLOConfig,
    }
    if arm.method == "mod" and not options.pop("lora", False):
        common = {k: v for k, v in common.items() if k in ("task_type",)}  # MoD alone: no LoRA at all
    if arm.method == "molex" and not causal:
        options = {**_molex_task_preset(task), **options}
    if arm.method == "molex":
        options.setdefault("shared_alpha", MOLEX_SWEEP_SHARED_ALPHA)
        options.setdefault("self_choice_second_pass", MOLEX_SWEEP_SECOND_PASS)
    if CAPACITY_ANNEALING_FRACTION in options:
        options["capacity_annealing_steps"] = max(1, round(options.pop(CAPACITY_ANNEALING_FRACTION) * steps))
    return builders[arm.method](**common, **options)
