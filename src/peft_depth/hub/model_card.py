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
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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
        "config": _json_config(config),
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


def _auto_class(task_type: str | None) -> str:
    return {
        "CAUSAL_LM": "AutoPeftModelForCausalLM",
        "SEQ_CLS": "AutoPeftModelForSequenceClassification",
        "SEQ_2_SEQ_LM": "AutoPeftModelForSeq2SeqLM",
        "TOKEN_CLS": "AutoPeftModelForTokenClassification",
        "QUESTION_ANS": "AutoPeftModelForQuestionAnswering",
        "FEATURE_EXTRACTION": "AutoPeftModelForFeatureExtraction",
    }.get(task_type or "", "AutoPeftModel")


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
    existing: ModelCard | None = None,
) -> ModelCard:
    """The card of the peft-depth adapters of ``model`` (the first one leads; others are listed).

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
    data = existing.data.to_dict() if existing is not None else {}
    tags = list(data.get("tags") or [])
    for tag in ["peft", "peft-depth", *(a["peft_type"].lower() for a in adapters), *info.get("tags", [])]:
        if tag not in tags:
            tags.append(tag)
    hub_base = (
        base_model
        if isinstance(base_model, str) and _REPO_ID.match(base_model) and not os.path.exists(base_model)
        else None
    )
    if hub_base:
        adapter_tag = f"base_model:adapter:{hub_base}"
        if adapter_tag not in tags:
            tags.append(adapter_tag)
    data.update(library_name="peft", tags=tags, license=info.get("license") or data.get("license") or _DEFAULT_LICENSE)
    if hub_base:
        data["base_model"] = hub_base
    else:
        data.pop("base_model", None)
    if info.get("datasets"):
        data["datasets"] = info["datasets"]
    if lead["task_type"] == "CAUSAL_LM":
        data.setdefault("pipeline_tag", "text-generation")
    card_data = ModelCardData(**data)

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
            auto_class=_auto_class(lead["task_type"]),
            metrics=info.get("metrics") or {},
            plots=plots,
            description=info.get("description"),
            peft_version=peft.__version__,
            peft_depth_version=__version__,
        )
    )
    return ModelCard(text)


def write_model_card(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    adapter_names: Sequence[str] | None = None,
    repo_id: str | None = None,
    replace_text: bool = False,
) -> ModelCard:
    """Render the card into ``save_directory/README.md`` and copy the plots into ``save_directory/plots/``.

    A README that peft-depth did not write (no marker) is kept; it only gains the library, method and base-model
    metadata, like peft treats an existing card. ``replace_text=True`` replaces its text and keeps only its metadata
    (``DepthSFTTrainer`` does this with the card TRL writes before a push).
    """
    path = Path(save_directory) / "README.md"
    existing = ModelCard.load(path) if path.is_file() else None
    foreign = existing is not None and CARD_MARKER not in existing.text and not _is_generated_default(existing)
    if foreign and not replace_text:
        rendered = render_model_card(model, adapter_names=adapter_names, repo_id=repo_id, existing=existing)
        existing.data = rendered.data
        card = existing
    else:
        card = render_model_card(model, adapter_names=adapter_names, repo_id=repo_id, existing=existing)
    plots = get_card_info(model).get("plots", {})
    if plots:
        folder = Path(save_directory) / PLOTS_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        files = _plot_files(plots)
        for title, source in plots.items():
            shutil.copyfile(source, folder / files[title])
    card.save(path)
    return card


def _is_generated_default(card: ModelCard) -> bool:
    """peft's and transformers' placeholder cards, which a real card replaces."""
    text = card.text
    return (
        "This is the model card of a 🤗 transformers model that has been pushed on the Hub" in text
        or "<!-- Provide a quick summary of what the model is/does. -->" in text
        or not text.strip()
        or text.strip().startswith("### Framework versions")
    )
