"""Config fields and validation shared by the peft-depth methods.

Every validation error names the field and the allowed values, and is raised from ``__post_init__`` so that bad
input fails before any model is touched.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from peft.config import PeftConfig

__all__ = [
    "CONFIG_FORMAT_VERSION",
    "DepthPeftConfig",
    "LoraFieldsConfig",
    "check_choice",
    "check_positive_int",
    "check_non_negative_number",
    "check_probability",
]

#: Version of the adapter_config.json layout written by this release; bumped when a field changes meaning.
#: 2: a MoLA config with neither `num_experts` nor `expert_pattern` means the paper's ▽ pattern (8 everywhere in 1).
#: 3: a DLO config without `routed_layers` routes only the new layers unless its original layers train ('all' in 2).
#: 4: a MoLA config without `expert_dropout` draws a dropout mask per selected expert ('shared' before).
#: 5: a MoLEx config without `shared_alpha` learns one α for all layers when its gate is shared (one per layer before),
#:    and without `self_choice_second_pass` runs a layer that chose itself twice in training (once before).
CONFIG_FORMAT_VERSION = 5
#: Allowed values of ``nonfinite_routing`` (see ``core.nonfinite``).
NONFINITE_ROUTING_CHOICES = ("base_path", "raise")


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def check_non_negative_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
        raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")


#: Largest auxiliary-loss coefficient: beyond it the auxiliary loss is all the loss there is (and 1e308 made the
#: weighted loss inf).
MAX_LOSS_COEF = 1e3


def check_loss_coef(name: str, value: Any) -> None:
    """An auxiliary-loss coefficient: a real number in [0, MAX_LOSS_COEF] (0 turns the loss off)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_LOSS_COEF:
        raise ValueError(
            f"`{name}` must be a finite number in [0, {MAX_LOSS_COEF:g}] (0 turns the loss off), got {value!r}."
        )


def check_probability(name: str, value: Any, *, allow_zero: bool = True, allow_one: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (0 <= value if allow_zero else 0 < value) and (value <= 1 if allow_one else value < 1)
    if not ok:
        low = "[0" if allow_zero else "(0"
        high = "1]" if allow_one else "1)"
        raise ValueError(f"`{name}` must be a number in {low}, {high}, got {value!r}.")


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}.")


def _check_module_names(name: str, value: Any, *, allow_regex: bool) -> None:
    names_ok = isinstance(value, (list, set, tuple)) and all(isinstance(v, str) and v for v in value)
    if value is None or names_ok or (allow_regex and isinstance(value, str) and value):
        return
    allowed = "None, a regex string, or a list of module names" if allow_regex else "None or a list of module names"
    raise ValueError(f"`{name}` must be {allowed} (non-empty strings), got {value!r}.")


def _check_token_indices(value: Any) -> None:
    def indices_ok(indices: Any) -> bool:
        return isinstance(indices, list) and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices
        )

    if value is None or indices_ok(value):
        return
    if isinstance(value, dict) and all(isinstance(k, str) and k and indices_ok(v) for k, v in value.items()):
        return
    raise ValueError(
        "`trainable_token_indices` must be None, a list of token ids (integers >= 0), or a dict from embedding "
        f"module name to such a list, got {value!r}."
    )


#: Largest |lora_alpha| accepted: beyond float16's range the scaled update overflows to inf/NaN in half precision.
MAX_LORA_ALPHA = 65504.0


@dataclass
class DepthPeftConfig(PeftConfig):
    """Fields every peft-depth config has, including the ones TRL's SFTTrainer writes into a PEFT config."""

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Names (suffix match) or a regex (full match) of the modules to adapt. `None` uses the method's "
            "default for the architecture; 'all-linear' targets every linear layer except the output head."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names or a regex of modules not to adapt, as in LoRA."}
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Extra modules to train fully and save with the adapter (e.g. a new classification head). "
            "SFTTrainer sets this when it adds chat-template tokens."
        },
    )
    trainable_token_indices: list[int] | dict[str, list[int]] | None = field(
        default=None,
        metadata={
            "help": "Token indices whose embeddings train (peft's TrainableTokens). SFTTrainer sets this when a chat "
            "template adds tokens."
        },
    )
    peft_depth_version: int = field(
        default=CONFIG_FORMAT_VERSION,
        metadata={"help": "Layout version of this config as written by peft-depth; filled in automatically."},
    )
    nonfinite_routing: str = field(
        default="base_path",
        metadata={
            "help": "What a row (token or sequence) whose routing scores are NaN or infinite does. 'base_path': it "
            "takes the method's base path (no expert, no other layer, the layer executed as in the base model), is "
            "left out of every batch statistic and vote, and is counted under `nonfinite_rows` in "
            "`peft_depth.routing_stats`; no other row changes and no device sync is added. 'raise': a "
            "`NonFiniteRoutingError` naming the layer (costs one device sync per routed layer)."
        },
    )
    base_model_facts: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Facts about the base model the adapter was saved from (architecture, model_type, num_layers, "
            "hidden_size), recorded by save_pretrained. Loading onto a model where one differs raises a ValueError "
            "naming it. None: not checked (configs written before this field existed)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("target_modules", "exclude_modules"):
            _check_module_names(name, getattr(self, name), allow_regex=True)
        _check_module_names("modules_to_save", self.modules_to_save, allow_regex=False)
        _check_token_indices(self.trainable_token_indices)
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        check_choice("nonfinite_routing", self.nonfinite_routing, NONFINITE_ROUTING_CHOICES)
        if (
            isinstance(self.peft_depth_version, bool)
            or not isinstance(self.peft_depth_version, int)
            or not 1 <= self.peft_depth_version <= CONFIG_FORMAT_VERSION
        ):
            raise ValueError(
                f"`peft_depth_version` must be an integer in [1, {CONFIG_FORMAT_VERSION}] (this release reads those "
                f"config layouts); got {self.peft_depth_version!r}. Upgrade peft-depth to load newer adapters."
            )
        if self.base_model_facts is not None:
            facts = self.base_model_facts
            if not isinstance(facts, dict) or not all(
                isinstance(k, str) and isinstance(v, (str, int)) and not isinstance(v, bool) for k, v in facts.items()
            ):
                raise ValueError(
                    f"`base_model_facts` must be None or a dict of str/int values (architecture, model_type, "
                    f"num_layers, hidden_size), got {facts!r}."
                )

    def revalidate(self) -> None:
        """Run every check of the constructor again on the current values, and keep their normalised form.

        A dataclass's fields can be set after it was built (``config.alpha = 2.0``). Injection calls this before the
        model is touched, so such a value fails as it would in the constructor, instead of training, saving, and
        then failing to load.
        """
        self._refresh_defaults()
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        with warnings.catch_warnings():  # the constructor's warnings were given when the config was built
            warnings.simplefilter("ignore")
            checked = type(self)(**values)
        for name in values:
            setattr(self, name, getattr(checked, name))
        self._keep_fill_in_records(checked)

    def _keep_fill_in_records(self, checked: DepthPeftConfig) -> None:
        """Take over what ``checked``'s constructor recorded about the defaults it filled in (methods that keep such
        records override this)."""

    def _refresh_defaults(self) -> None:
        """Undo the constructor's filling-in of defaults that follow other fields, so that ``revalidate`` derives
        them from the current values (methods with such defaults override this)."""

    #: Config fields holding auxiliary-loss coefficients: a nonzero one is a loss a stock Trainer drops.
    aux_loss_fields: ClassVar[tuple[str, ...]] = ()

    def training_needs(self) -> tuple[list[str], list[str]]:
        """``(auxiliary losses, schedules)`` this adapter trains with besides the LM loss, as ``field=value`` text;
        ``core.aux_watch`` warns when a training loop drops them."""
        losses = [f"{name}={getattr(self, name)}" for name in self.aux_loss_fields if getattr(self, name)]
        return losses, []

    def check_against_base(self, model: Any) -> None:
        """Check the fields that depend on the base model, before anything is built on it (ValueError naming the
        field). Methods extend this for their own fields (e.g. layer indices against the depth)."""
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            raise ValueError(
                f"{type(self).__name__}: {type(model).__name__} is an encoder-decoder model (T5, BART, ...). "
                "peft-depth's methods route over one stack of layers, with padding masks and position terms of that "
                "stack, and do not yet handle a decoder's own mask or cross-attention; use them on decoder-only or "
                "encoder-only models (plain LoRA adapts encoder-decoders)."
            )
        names = [name for name, _ in model.named_modules()] if hasattr(model, "named_modules") else []

        def missing(wanted: list[str]) -> list[str]:
            # peft matches these names as suffixes of module paths; one matching nothing trains nothing
            return [n for n in wanted if names and not any(m == n or m.endswith("." + n) for m in names)]

        unknown_saved = missing(list(self.modules_to_save or []))
        # peft itself lists alternatives for sequence classification ("classifier", "score"): one must exist
        if self.modules_to_save and len(unknown_saved) == len(self.modules_to_save):
            if set(self.modules_to_save) <= {"classifier", "score"}:  # what peft adds for a classification task
                raise ValueError(
                    f"task_type={self.task_type!r}: peft trains the model's classification head "
                    f"(`modules_to_save`={list(self.modules_to_save)}), but this model has none of them. Is it a "
                    "sequence classifier (AutoModelForSequenceClassification)? For a causal LM use "
                    "task_type='CAUSAL_LM'."
                )
            raise ValueError(
                f"`modules_to_save` names {unknown_saved}, none of which the model has (names match the end of a "
                "module path, e.g. 'lm_head' or 'classifier')."
            )
        if isinstance(self.trainable_token_indices, dict) and missing(list(self.trainable_token_indices)):
            raise ValueError(
                f"`trainable_token_indices` names module(s) {missing(list(self.trainable_token_indices))} that the "
                "model does not have (e.g. 'embed_tokens')."
            )
        if self.trainable_token_indices is None:
            return
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        vocab = getattr(getattr(embeddings, "weight", None), "shape", (None,))[0]
        indices = self.trainable_token_indices
        flat = indices if isinstance(indices, list) else [i for v in indices.values() for i in v]
        if vocab is not None and flat and max(flat) >= vocab:
            raise ValueError(
                f"`trainable_token_indices` holds token id {max(flat)}, but the model's input embeddings have {vocab} "
                f"rows (allowed ids: 0..{vocab - 1})."
            )


@dataclass
class LoraFieldsConfig(DepthPeftConfig):
    """LoRA's familiar fields, for methods that carry low-rank adapters."""

    r: int = field(default=8, metadata={"help": "Rank of each low-rank adapter (each expert, for MoLA)."})
    lora_alpha: float = field(
        default=16, metadata={"help": "Scaling numerator: the update is scaled by lora_alpha / r."}
    )
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapter input, in [0, 1)."})
    bias: str = field(
        default="none",
        metadata={
            "help": "Which biases train: 'none', 'all' or '<method>_only' (the adapted layers' biases; MoLEx, which "
            "adapts whole layers, takes 'none' or 'all')."
        },
    )
    init_lora_weights: bool = field(
        default=True,
        metadata={
            "help": "True: B starts at zero, so the low-rank update starts at zero (the whole adapter starts at "
            "the base model for MoLA, MoD at gate_init=0 and DLO at init='zero_out'; MoLEx mixes in another layer "
            "from the first step). False: B starts random (for tests that need a non-trivial adapter)."
        },
    )
    fan_in_fan_out: bool = field(
        default=False,
        metadata={
            "help": "Kept for peft compatibility and not read: the layers detect GPT-2 style Conv1D weights, stored "
            "as (in, out), by themselves."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_lora_fields(allow_zero_rank=False)

    def _check_lora_fields(self, *, allow_zero_rank: bool) -> None:
        if not allow_zero_rank:
            check_positive_int("r", self.r)
        elif isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 0:
            raise ValueError(f"`r` must be an integer >= 0 (0: no LoRA), got {self.r!r}.")
        if (
            isinstance(self.lora_alpha, bool)
            or not isinstance(self.lora_alpha, (int, float))
            or not abs(self.lora_alpha) <= MAX_LORA_ALPHA  # also False for NaN
        ):
            raise ValueError(
                f"`lora_alpha` must be a finite number with |lora_alpha| <= {MAX_LORA_ALPHA:g}, got {self.lora_alpha!r}."
            )
        check_probability("lora_dropout", self.lora_dropout, allow_one=False)
        if not isinstance(self.fan_in_fan_out, bool):
            raise ValueError(f"`fan_in_fan_out` must be True or False, got {self.fan_in_fan_out!r}.")
        if not isinstance(self.init_lora_weights, bool):
            raise ValueError(f"`init_lora_weights` must be True or False, got {self.init_lora_weights!r}.")
