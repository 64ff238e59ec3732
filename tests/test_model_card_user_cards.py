"""Model cards against the cards already there: a user's card (filled from the Hub's template or hand-written) keeps
its text and metadata, the package's own card is re-rendered without stale metadata, and the usage snippets the card
prints run as printed (task type, subfolder, revision).

The Hub is ``LocalHub`` (see ``test_hub``): huggingface_hub's client runs unchanged against an in-memory server.
"""

from __future__ import annotations

import json
import re

import pytest
import test_hub
import torch
from hub_cases import BASE_ID, adapted, fresh_copy, inputs, method_configs, perturb_adapter, tiny_base
from huggingface_hub import HfApi, ModelCard, ModelCardData
from peft import LoraConfig, get_peft_model
from tiny_models import batch, tiny_bert

import peft_depth
from peft_depth.hub import CARD_MARKER
from peft_depth.hub.model_card import _cell

local_hub = test_hub.local_hub  # the in-memory Hub fixture, shared with test_hub
USER_DESCRIPTION = "Trained on our support tickets; not for medical advice."


def _template_card() -> ModelCard:
    """A card as users write them: huggingface_hub's standard template with some sections filled in."""
    return ModelCard.from_template(
        ModelCardData(license="apache-2.0", language="en"), model_description=USER_DESCRIPTION, developers="ACME"
    )


def _logits(model, batch_) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**batch_).logits


def _run_snippets(text: str, adapter_path: str | None = None) -> list:
    """Execute every python block of the card as printed (the placeholder path replaced by ``adapter_path``) and
    return the ``model`` each one builds."""
    models = []
    for snippet in re.findall(r"```python\n(.*?)```", text, re.S):
        if adapter_path is not None:
            snippet = snippet.replace("path/to/this/adapter", adapter_path)
        namespace: dict = {}
        exec(snippet, namespace)  # noqa: S102 - the card's own code, on local files and the in-memory Hub
        models.append(namespace["model"])
    return models


def _push_user_card(repo_id: str, text: str) -> None:
    HfApi().create_repo(repo_id, exist_ok=True)
    HfApi().upload_file(path_or_fileobj=text.encode(), path_in_repo="README.md", repo_id=repo_id)


def _remote_card(hub, repo_id: str, revision: str = "main") -> ModelCard:
    return ModelCard(hub.files(repo_id, revision)["README.md"].decode())


# ---------------------------------------------------------------------------------------------------- user cards


def test_a_card_filled_from_the_hub_template_is_kept_on_save(tmp_path):
    """The template's HTML comments made a filled-in card look like peft's placeholder, and the save replaced it."""
    path = tmp_path / "adapter"
    path.mkdir()
    _template_card().save(path / "README.md")
    model, _ = adapted("mola")
    model.save_pretrained(path)
    card = ModelCard.load(path / "README.md")
    assert USER_DESCRIPTION in card.text and "ACME" in card.text and CARD_MARKER not in card.text
    assert card.data.language == "en" and card.data.license == "apache-2.0"
    assert card.data.library_name == "peft" and {"peft-depth", "mola"} <= set(card.data.tags)


def test_the_placeholder_cards_peft_and_transformers_write_are_still_replaced(tmp_path, local_hub):
    """What peft writes into a fresh folder (the template left empty), and what transformers' push writes into a
    repo without a card, carry nothing of the user's: the package's card replaces them."""
    lora = get_peft_model(tiny_base(), LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path)  # peft's unfilled template card
    adapted("mola")[0].save_pretrained(tmp_path)
    assert CARD_MARKER in (tmp_path / "README.md").read_text()
    adapted("mola")[0].push_to_hub("org/fresh")  # transformers' generated card on the remote first
    assert CARD_MARKER in _remote_card(local_hub, "org/fresh").text


def test_a_card_filled_from_the_hub_template_is_kept_on_push(local_hub):
    _push_user_card("org/templated", str(_template_card()))
    adapted("mola")[0].push_to_hub("org/templated")
    card = _remote_card(local_hub, "org/templated")
    assert USER_DESCRIPTION in card.text and CARD_MARKER not in card.text
    assert card.data.language == "en" and "mola" in card.data.tags


def test_push_keeps_the_base_model_a_user_card_names(local_hub, tmp_path):
    """The adapter's base was loaded from a local folder (no Hub id to record): the user's ``base_model`` stays, as
    plain LoRA keeps it."""
    user = "---\nbase_model: org-a/base-a\nlicense: apache-2.0\ntags:\n- my-tag\n---\n# My card\nHand written.\n"
    base = tiny_base()
    base.save_pretrained(tmp_path / "base")
    base.name_or_path = base.config._name_or_path = str(tmp_path / "base")
    for kind, config in [("mola", method_configs()["mola"]), ("lora", LoraConfig(r=2, target_modules=["q_proj"]))]:
        _push_user_card(f"org/{kind}", user)
        get_peft_model(fresh_copy(base), config).push_to_hub(f"org/{kind}")
        card = _remote_card(local_hub, f"org/{kind}")
        assert card.data.base_model == "org-a/base-a", kind
        assert "Hand written." in card.text and "my-tag" in card.data.tags, kind


# ---------------------------------------------------------------------------------------------------- metadata


def test_a_hub_id_without_a_namespace_is_the_base_model(tmp_path):
    """``gpt2``, ``roberta-base``: single-segment Hub ids, as huggingface_hub accepts them."""
    model, _ = adapted("mola", base=tiny_base(name="gpt2"))
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "gpt2" and "base_model:adapter:gpt2" in card.data.tags
    assert "# MoLA adapter for gpt2" in card.text and "a local path" not in card.text


@pytest.mark.parametrize("name", ["", "/some/local/dir"])
def test_a_base_model_that_is_no_hub_id_leaves_no_adapter_tag(tmp_path, name):
    """peft tags ``base_model:adapter:<name_or_path>`` whatever it is; the card drops ``base_model`` for a path (the
    Hub refuses it), so the tag naming it goes too."""
    model, _ = adapted("mola", base=tiny_base(name=name))
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model is None
    assert not [tag for tag in card.data.tags if tag.startswith("base_model:")]


def test_repushing_the_package_card_replaces_its_generated_metadata(local_hub):
    """A MoLA adapter on base A, then a sequence-classification adapter on base B pushed to the same repo: the card
    named both methods and both bases, and kept the text-generation pipeline tag. Tags added by hand stay."""
    adapted("mola", base=tiny_base(name="org-a/base-a"))[0].push_to_hub("org/reused")
    card = _remote_card(local_hub, "org/reused")
    assert card.data.pipeline_tag == "text-generation"
    card.data.tags.append("hand-added")
    _push_user_card("org/reused", str(card))
    bert = tiny_bert()
    bert.name_or_path = bert.config._name_or_path = "org-b/bert"
    seq_cls = peft_depth.MoLAConfig(task_type="SEQ_CLS", num_experts=2, r=2, target_modules=["query", "value"])
    get_peft_model(bert, seq_cls).push_to_hub("org/reused")
    data = _remote_card(local_hub, "org/reused").data
    assert data.base_model == "org-b/bert" and data.pipeline_tag is None
    assert sorted(data.tags) == sorted(["peft", "peft-depth", "mola", "base_model:adapter:org-b/bert", "hand-added"])


# ---------------------------------------------------------------------------------------------------- snippets


def test_the_snippets_of_a_sequence_classification_card_load_the_classifier(tmp_path):
    """The "base model you loaded yourself" snippet loaded every base with AutoModelForCausalLM."""
    tiny_bert().save_pretrained(tmp_path / "bert")
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "bert")
    config = peft_depth.MoLAConfig(task_type="SEQ_CLS", num_experts=2, r=2, target_modules=["query", "value"])
    model = get_peft_model(base, config)
    perturb_adapter(model)
    model.save_pretrained(tmp_path / "adapter")
    text = (tmp_path / "adapter" / "README.md").read_text()
    loaded = _run_snippets(text, str(tmp_path / "adapter"))
    assert len(loaded) == 2
    for each in loaded:
        assert torch.equal(_logits(each, batch()), _logits(model, batch()))


def test_the_card_of_an_adapter_in_a_subfolder_prints_only_snippets_that_run(tmp_path):
    """peft's AutoPeftModel passes ``subfolder`` on to the base model's load, which then fails: not printed."""
    base = tiny_base()
    base.save_pretrained(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"), method_configs()["mola"], adapter_name="solo"
    )
    perturb_adapter(model)
    model.save_pretrained(tmp_path / "adapter")
    text = (tmp_path / "adapter" / "README.md").read_text()
    assert "AutoPeftModelForCausalLM.from_pretrained(" not in text
    loaded = _run_snippets(text, str(tmp_path / "adapter"))
    assert len(loaded) == 1 and torch.equal(_logits(loaded[0], inputs()), _logits(model, inputs()))


def test_the_card_pushed_to_a_revision_loads_that_revision(local_hub):
    base = tiny_base()
    base.push_to_hub(BASE_ID)
    adapted("mola", base=fresh_copy(base), seed=1)[0].push_to_hub("org/revised")
    v1, _ = adapted("mola", base=fresh_copy(base), seed=2)
    v1.push_to_hub("org/revised", revision="v1")
    text = _remote_card(local_hub, "org/revised", "v1").text
    assert 'revision="v1"' in text
    loaded = _run_snippets(text)
    assert len(loaded) == 2
    for each in loaded:
        assert torch.equal(_logits(each, inputs()), _logits(v1, inputs()))


# ---------------------------------------------------------------------------------------------------- fields


@pytest.mark.parametrize("method", list(method_configs()))
def test_the_full_config_table_shows_the_saved_config(tmp_path, method):
    """The table showed ``inference_mode`` False and no ``base_model_facts``, where adapter_config.json has both."""
    adapted(method)[0].save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text().split("adapter_config.json fields", 1)[1]
    rows = dict(re.findall(r"^\| (\w+) \| (.*) \|$", text, re.M))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {key for key, value in saved.items() if value is not None} == set(rows) - {"Field"}
    for key, value in saved.items():
        if isinstance(value, (bool, int, float, str, dict)):
            assert rows[key] == _cell(value), key
    assert rows["inference_mode"] == "`True`"


def test_a_dense_dlo_card_lists_no_router_settings(tmp_path):
    """``routed_layers='none'`` builds no router: capacity, annealing, inference selection and router loss do not
    apply."""
    config = peft_depth.DLOConfig(task_type="CAUSAL_LM", expand_every=2, routed_layers="none")
    get_peft_model(tiny_base(), config).save_pretrained(tmp_path)
    settings = (tmp_path / "README.md").read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    assert "no routers" in settings
    for row in ("| Capacity", "| Inference selection", "| Router loss"):
        assert row not in settings, row
    routed = peft_depth.DLOConfig(task_type="CAUSAL_LM", expand_every=2, routed_layers="all")
    get_peft_model(tiny_base(), routed).save_pretrained(tmp_path / "routed")
    assert "| Router loss |" in (tmp_path / "routed" / "README.md").read_text()
