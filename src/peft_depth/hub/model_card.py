"""Render the model card (README.md) of a peft-depth adapter from the templates in ``model_cards/``.

``PeftModel.save_pretrained`` and ``push_to_hub`` call :func:`write_model_card` through the hooks in
:mod:`peft_depth.hub.peft_hooks`; call it yourself to re-render a card. What the card cannot read from the model
(training metrics, plots, license, datasets) comes from :func:`set_card_info`.
"""

from __future__ import annotations

import functools
import math
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from torch import nn

from ..core.config import DepthPeftConfig
from .methods import method_card_info

__all__ = [
    "CARD_MARKER",
    "PLOTS_FOLDER",
    "get_card_info",
    "model_cards_dir",
    "render_model_card",
    "set_card_info",
    "summarise_metrics",
    "write_model_card",
]

#: Marks a README written by peft-depth: such a card is re-rendered on the next save; any other card is only tagged.
CARD_MARKER = "<!-- peft-depth model card -->"
#: The adapter peft's save_pretrained writes at the folder's root (every other one goes into a subfolder).
ROOT_ADAPTER = "default"
#: Folder (next to adapter_config.json) that plots are copied into, so that they travel with the adapter.
PLOTS_FOLDER = "plots"
#: Environment variable naming a folder of card templates that replaces the shipped ``model_cards/``.
TEMPLATES_ENV = "PEFT_DEPTH_MODEL_CARDS"
_DEFAULT_LICENSE = "other"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: peft's tag naming the base model (``base_model:adapter:<name_or_path>``); the Hub reads it as ``base_model`` does.
_ADAPTER_TAG = "base_model:adapter:"
#: The description transformers' ``push_to_hub`` puts into the card of a repo that has none.
_TRANSFORMERS_DESCRIPTION = (
    "This is the model card of a 🤗 transformers model that has been pushed on the Hub. This model card has been "
    "automatically generated."
)
#: What huggingface_hub's card template shows in a section nobody filled in.
_PLACEHOLDER = "[More Information Needed]"
#: What peft's ``create_or_update_model_card`` adds to every card: its version, and a quantized base's config.
_PEFT_ADDITIONS = re.compile(
    r"^### Framework versions$|^- PEFT .*$|^## Training procedure$"
    r"|^The following `bitsandbytes` quantization config was used during training:$(\n- .*$)*",
    re.M,
)
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
#: task_type -> (peft's AutoPeftModel class, the transformers auto class it loads the base model with)
_AUTO_CLASSES = {
    "CAUSAL_LM": ("AutoPeftModelForCausalLM", "AutoModelForCausalLM"),
    "SEQ_CLS": ("AutoPeftModelForSequenceClassification", "AutoModelForSequenceClassification"),
    "SEQ_2_SEQ_LM": ("AutoPeftModelForSeq2SeqLM", "AutoModelForSeq2SeqLM"),
    "TOKEN_CLS": ("AutoPeftModelForTokenClassification", "AutoModelForTokenClassification"),
    "QUESTION_ANS": ("AutoPeftModelForQuestionAnswering", "AutoModelForQuestionAnswering"),
    "FEATURE_EXTRACTION": ("AutoPeftModelForFeatureExtraction", "AutoModel"),
}


def model_cards_dir() -> Path | None:
    """The folder holding the ``<method>.md`` templates, or None if there is none.

    ``$PEFT_DEPTH_MODEL_CARDS``, else the ``model_cards`` folder next to this module: in the source tree a link to
    the repository's ``model_cards/``, in a wheel a copy of it (package data).
    """
    override = os.environ.get(TEMPLATES_ENV)
    candidates = [Path(override)] if override else []
    candidates.append(Path(__file__).resolve().parent / "model_cards")
    for candidate in candidates:
        if (candidate / "_generic.md").is_file():
            return candidate
    return None


# ---------------------------------------------------------------------------------------------------- card info


def _tuner(model: nn.Module) -> nn.Module:
    return getattr(model, "base_model", model)


def set_card_info(
    model: nn.Module,
    *,
    metrics: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    plots: Mapping[str, str | os.PathLike] | Iterable[str | os.PathLike] | None = None,
    license: str | None = None,
    datasets: Sequence[str] | None = None,
    tags: Sequence[str] | None = None,
    description: str | None = None,
) -> None:
    """Attach what the card cannot read from the model; later calls update earlier ones.

    ``metrics``: a dict of numbers, or a Trainer ``log_history`` (the last value of each metric is shown).
    ``plots``: PNG paths (or ``{title: path}``), e.g. routing or skip-rate plots; they are copied into ``plots/`` of
    every save and shown in the card. ``license``: a Hub license id (default ``"other"``: set the base model's).
    """
    info = _tuner(model).__dict__.setdefault("_depth_card_info", {})
    if metrics is not None:
        info["metrics"] = summarise_metrics(metrics)
    if plots is not None:
        items = plots.items() if isinstance(plots, Mapping) else ((Path(p).stem, p) for p in plots)
        checked = {}
        for title, path in items:
            title, stem, copy = str(title), str(title), 2
            while title in checked:  # a list of plots named alike (two folders' routing_0.png): keep both
                title, copy = f"{stem} ({copy})", copy + 1
            path = Path(path)
            with open(path, "rb") as handle:
                if handle.read(8) != _PNG_MAGIC:
                    raise ValueError(f"Plot {str(path)!r} is not a PNG file.")
            checked[title] = str(path)
        info["plots"] = checked
    for key, value in (("license", license), ("datasets", datasets), ("tags", tags), ("description", description)):
        if value is not None:
            info[key] = list(value) if key in ("datasets", "tags") else value


def get_card_info(model: nn.Module) -> dict[str, Any]:
    return dict(_tuner(model).__dict__.get("_depth_card_info", {}))


def summarise_metrics(metrics: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Numbers of a metrics dict, or the last value of each metric in a Trainer ``log_history``."""
    records = [metrics] if isinstance(metrics, Mapping) else list(metrics)
    out: dict[str, float] = {}
    for record in records:
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                out[str(key)] = float(value)
    return out


# ---------------------------------------------------------------------------------------------------- rendering


def _cell(value: Any) -> str:
    """A value as a markdown table cell: compact, pipes escaped, no newlines."""
    if isinstance(value, (set, frozenset)):
        value = sorted(value)
    elif isinstance(value, Mapping):  # as adapter_config.json lists them (sort_keys)
        value = dict(sorted(value.items()))
    if isinstance(value, float):
        text = f"{value:g}"
    else:
        text = str(value)
    text = text.replace("|", "\\|").replace("\n", " ")
    return f"`{text}`" if text and not text.startswith("`") else text


def _json_config(config: DepthPeftConfig) -> dict[str, Any]:
    out = config.to_dict()
    for key, value in out.items():
        if isinstance(value, (set, frozenset)):
            out[key] = sorted(value)
        elif hasattr(value, "value") and isinstance(value.value, str):  # enums (peft_type, task_type)
            out[key] = value.value
    return out


def _saved_config(config: DepthPeftConfig, facts: Mapping[str, Any]) -> dict[str, Any]:
    """The config as the save writes it into adapter_config.json: peft's ``save_pretrained`` sets ``inference_mode``
    for the file, and the save hook records the base model's facts when the config has none."""
    out = _json_config(config)
    out["inference_mode"] = True
    if out.get("base_model_facts") is None and facts:
        out["base_model_facts"] = dict(facts)
    return out


def _adapter_parameter_count(model: nn.Module, adapter_name: str) -> int | None:
    from peft.utils import get_peft_model_state_dict

    try:
        # as the save itself: embeddings never go into a depth adapter (and "auto" would look the base up on the Hub)
        state = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    except Exception:  # a model that is not a PeftModel: the card simply omits the count
        return None
    return int(sum(t.numel() for t in state.values()))


def _adapter_context(model: nn.Module, adapter_name: str) -> dict[str, Any]:
    config: DepthPeftConfig = model.peft_config[adapter_name]
    peft_type = config.peft_type.value if hasattr(config.peft_type, "value") else str(config.peft_type)
    facts = config.base_model_facts or getattr(_tuner(model), "base_model_facts", None) or {}
    info = method_card_info(peft_type)
    try:
        derived = info.derive(config, facts.get("num_layers"))
    except (ValueError, TypeError, KeyError, ImportError):
        derived = {}
    return {
        "name": adapter_name,
        "peft_type": peft_type,
        "method": info,
        "config": _saved_config(config, facts),
        "derived": derived,
        "facts": facts,
        "num_parameters": _adapter_parameter_count(model, adapter_name),
        "task_type": _json_config(config).get("task_type"),
        # where peft's save_pretrained puts it: "default" at the root, any other adapter in a subfolder of its name
        "subfolder": None if adapter_name == ROOT_ADAPTER else adapter_name,
    }


def _plot_files(plots: Mapping[str, str]) -> dict[str, str]:
    """title -> file name under ``plots/``: the source's name, made unique (two plots named ``routing_0.png`` from
    different folders would otherwise overwrite each other and show one image under both titles)."""
    files: dict[str, str] = {}
    for index, (title, source) in enumerate(plots.items()):
        name = Path(source).name
        files[title] = name if name not in files.values() else f"{index}-{name}"
    return files


def _auto_classes(task_type: str | None, architecture: str | None) -> tuple[str, str]:
    """The AutoPeftModel class that loads the adapter, and the transformers class that loads its base model.

    The base must be of the recorded architecture (the load refuses another), which a task type's auto class builds;
    without a task type, the architecture's own class (when transformers has it) is the one that does.
    """
    import transformers

    if task_type in _AUTO_CLASSES:
        return _AUTO_CLASSES[task_type]
    known = isinstance(architecture, str) and hasattr(transformers, architecture)
    return "AutoPeftModel", architecture if known else "AutoModel"


@functools.lru_cache(maxsize=4)
def _environment(templates: str) -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(templates),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,  # markdown, not HTML; values are rendered as text and never as templates
    )
    environment.filters["cell"] = _cell
    return environment


def render_model_card(
    model: nn.Module,
    *,
    adapter_names: Sequence[str] | None = None,
    repo_id: str | None = None,
    revision: str | None = None,
    existing: ModelCard | None = None,
) -> ModelCard:
    """The card of the peft-depth adapters of ``model`` (the first one leads; others are listed).

    ``revision``: the branch of ``repo_id`` the card goes to (its usage snippets load from it).
    ``existing``: a card whose metadata (tags, pipeline tag, ...) is kept and extended, e.g. the one peft wrote.
    """
    names = [
        n for n in (adapter_names or list(model.peft_config)) if isinstance(model.peft_config[n], DepthPeftConfig)
    ]
    if not names:
        raise ValueError("render_model_card needs a model with at least one peft-depth adapter.")
    # the adapter at the folder's root leads (the one a plain from_pretrained of the folder loads); else the active one
    active = getattr(model, "active_adapter", None)
    lead_name = ROOT_ADAPTER if ROOT_ADAPTER in names else active
    if isinstance(lead_name, str) and lead_name in names:
        names.remove(lead_name)
        names.insert(0, lead_name)
    adapters = [_adapter_context(model, name) for name in names]
    lead = adapters[0]
    info = get_card_info(model)

    base_model = model.peft_config[names[0]].base_model_name_or_path
    hub_base = _hub_id(base_model)
    card_data = ModelCardData(**_card_metadata(existing, adapters, info, hub_base))

    import peft

    from .. import __version__

    plots = [
        {"title": title, "path": f"{PLOTS_FOLDER}/{name}"}
        for title, name in _plot_files(info.get("plots", {})).items()
    ]
    templates = model_cards_dir()
    if templates is None:
        raise FileNotFoundError(
            f"No model-card templates found (set ${TEMPLATES_ENV} to the folder holding peft-depth's model_cards/)."
        )
    auto_class, base_class = _auto_classes(lead["task_type"], lead["facts"].get("architecture"))
    template_name = f"{lead['peft_type'].lower()}.md"
    if not (templates / template_name).is_file():
        template_name = "_generic.md"
    text = (
        _environment(str(templates))
        .get_template(template_name)
        .render(
            card_data=card_data.to_yaml(),
            marker=CARD_MARKER,
            adapter=lead,
            other_adapters=adapters[1:],
            base_model=base_model,
            hub_base_model=hub_base,
            repo_id=repo_id,
            load_path=repo_id or "path/to/this/adapter",
            load_subfolder=lead["subfolder"],
            load_revision=revision if revision != "main" else None,
            auto_class=auto_class,
            base_class=base_class,
            metrics=info.get("metrics") or {},
            plots=plots,
            description=info.get("description"),
            peft_version=peft.__version__,
            peft_depth_version=__version__,
        )
    )
    return ModelCard(text)


def _hub_id(name: Any) -> str | None:
    """``name`` if it is a Hub repo id (``org/name``, or one without a namespace such as ``gpt2``, as huggingface_hub
    validates them) and no local path; None otherwise: the Hub refuses a path as ``base_model``."""
    if not isinstance(name, str) or os.path.exists(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _names_hub_models(value: Any) -> bool:
    """Whether a card's ``base_model`` (one id or a list of them) names Hub models only."""
    values = value if isinstance(value, list) else [value]
    return bool(values) and all(_hub_id(v) for v in values)


@functools.lru_cache(maxsize=1)
def _method_tags() -> frozenset[str]:
    """The tag of every registered peft-depth method (its peft type, lower case)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return frozenset(
        str(getattr(peft_type, "value", peft_type)).lower()
        for peft_type, config_cls in PEFT_TYPE_TO_CONFIG_MAPPING.items()
        if isinstance(config_cls, type) and issubclass(config_cls, DepthPeftConfig)
    )


def _generated_tag(tag: str) -> bool:
    """Whether a render (or peft's save) adds ``tag``: the library's, a method's or a base model's. Tags passed to
    ``set_card_info`` cannot be told from tags added by hand, so both stay."""
    return tag in ("peft", "peft-depth") or tag in _method_tags() or tag.startswith(_ADAPTER_TAG)


def _card_metadata(
    existing: ModelCard | None, adapters: Sequence[Mapping[str, Any]], info: Mapping[str, Any], hub_base: str | None
) -> dict[str, Any]:
    """``existing``'s metadata with the library, methods, license and base model of ``adapters``.

    A user's card keeps what it says, its ``base_model`` too where that names a Hub model. From the package's own
    card and from the placeholders peft and transformers write, what an earlier render generated goes first: a
    re-push to a repo names the adapters pushed now, not also the ones it held before.
    """
    data = existing.data.to_dict() if existing is not None else {}
    if existing is None or not _is_user_card(existing):
        data["tags"] = [tag for tag in data.get("tags") or [] if not _generated_tag(tag)]
        data.pop("pipeline_tag", None)
        data.pop("base_model", None)
    if hub_base:
        data["base_model"] = hub_base
    elif not _names_hub_models(data.get("base_model")):
        data.pop("base_model", None)  # a local path (peft copies the one it loaded the base from): the Hub refuses it
    # peft tags every card with that path too; a tag naming no Hub model would contradict the metadata
    tags = [
        tag for tag in data.get("tags") or [] if not tag.startswith(_ADAPTER_TAG) or _hub_id(tag[len(_ADAPTER_TAG) :])
    ]
    new_tags = ["peft", "peft-depth", *(a["peft_type"].lower() for a in adapters), *info.get("tags", [])]
    for tag in [*new_tags, *([f"{_ADAPTER_TAG}{hub_base}"] if hub_base else [])]:
        if tag not in tags:
            tags.append(tag)
    data.update(library_name="peft", tags=tags, license=info.get("license") or data.get("license") or _DEFAULT_LICENSE)
    if info.get("datasets"):
        data["datasets"] = info["datasets"]
    if adapters[0]["task_type"] == "CAUSAL_LM":
        data.setdefault("pipeline_tag", "text-generation")
    return data


def write_model_card(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    adapter_names: Sequence[str] | None = None,
    repo_id: str | None = None,
    revision: str | None = None,
    replace_text: bool = False,
) -> ModelCard:
    """Render the card into ``save_directory/README.md`` and copy the plots into ``save_directory/plots/``.

    A README someone wrote (not peft-depth's card, nor the placeholder peft or transformers write when there is
    none) is kept; it only gains the library, method and base-model metadata, like peft treats an existing card.
    ``replace_text=True`` replaces its text and keeps only its metadata (``DepthSFTTrainer`` does this with the card
    TRL writes before a push). ``repo_id`` / ``revision``: where the card is pushed, for its usage snippets.
    """
    path = Path(save_directory) / "README.md"
    existing = ModelCard.load(path) if path.is_file() else None
    card = render_model_card(model, adapter_names=adapter_names, repo_id=repo_id, revision=revision, existing=existing)
    if existing is not None and _is_user_card(existing) and not replace_text:
        existing.data = card.data
        card = existing
    plots = get_card_info(model).get("plots", {})
    if plots:
        folder = Path(save_directory) / PLOTS_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        files = _plot_files(plots)
        for title, source in plots.items():
            shutil.copyfile(source, folder / files[title])
    card.save(path)
    return card


def _is_user_card(card: ModelCard) -> bool:
    """A card someone wrote: neither the package's own (with the marker) nor a placeholder of peft or transformers."""
    return CARD_MARKER not in card.text and not _is_generated_default(card)


def _content_lines(text: str) -> list[str]:
    return [line.strip() for line in _HTML_COMMENT.sub("", text).splitlines() if line.strip()]


@functools.lru_cache(maxsize=1)
def _unfilled_template_lines() -> frozenset[str]:
    """The lines of huggingface_hub's card template with nothing filled in: peft's card for a folder without one,
    and, with transformers' one-line description, transformers' card for a repo without one."""
    unfilled = ModelCard.from_template(ModelCardData(), model_description=_TRANSFORMERS_DESCRIPTION)
    return frozenset(_content_lines(unfilled.text))


def _is_generated_default(card: ModelCard) -> bool:
    """A placeholder card peft or transformers wrote when the user gave none, which a real card replaces.

    That is the template's own lines and unfilled sections (plus what peft appends to every card), or no text at
    all. The template's comments stay when users fill it in (``ModelCard.from_template(data, model_description=...)``),
    so one line of their own - a filled section, a title, text - makes the card theirs.
    """
    template = _unfilled_template_lines()
    lines = _content_lines(_PEFT_ADDITIONS.sub("", card.text))
    return all(line in template or _PLACEHOLDER in line for line in lines)
