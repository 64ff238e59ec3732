"""Sharing peft-depth adapters: Hub round trips, model cards, and loading untrusted adapters safely.

What is real in the Hub round trips (``test_push_*``): every line of peft's ``push_to_hub`` / ``from_pretrained``,
transformers' ``PushToHubMixin`` and ``AutoPeftModelForCausalLM``, and huggingface_hub's HTTP client (create_repo,
create_branch, preupload + NDJSON create_commit, upload_folder, HEAD/GET downloads with ETag and the on-disk cache,
ModelCard.load) run unchanged. Only the server is a stand-in: ``peft_depth.hub.local_hub.LocalHub`` answers the
documented endpoints in memory through an ``httpx2.MockTransport`` installed with ``huggingface_hub.set_client_factory``
for the loopback endpoint http://127.0.0.1:18080 (no socket is opened; any other host fails the request). The Hub's
server-side LFS/xet storage is not exercised: the stand-in asks for every file inline ("regular" upload mode).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from allocation_guard import allocation_counter
from hub_cases import BASE_ID, METHODS, adapted, fresh_copy, inputs, method_configs, tiny_base
from huggingface_hub import HfApi, ModelCard, constants
from peft import AutoPeftModel, AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

import peft_depth
from peft_depth.core.config import CONFIG_FORMAT_VERSION
from peft_depth.hub import CARD_MARKER, check_safetensors_file, set_card_info
from peft_depth.hub.local_hub import LocalHub
from peft_depth.hub.methods import METHOD_CARD_INFO

FIXTURES = Path(__file__).parent / "fixtures"
# A 1x1 PNG (valid signature and chunks), as a routing plot stand-in.
PNG_BYTES = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082"
)


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _saved(tmp_path, method, **card_info):
    model, pristine = adapted(method)
    if card_info:
        set_card_info(model, **card_info)
    path = tmp_path / method
    model.save_pretrained(path)
    return model, pristine, path


# ---------------------------------------------------------------------------------------------------- local round trip


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip_is_exact_and_safetensors_only(tmp_path, method):
    model, pristine, path = _saved(tmp_path, method)
    batch = inputs()
    expected = _logits(model, batch)
    assert not torch.allclose(expected, _logits(fresh_copy(pristine), batch)), "adapter must change the outputs"
    assert sorted(os.listdir(path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_depth_version"] == CONFIG_FORMAT_VERSION
    assert config["base_model_facts"] == {
        "architecture": "LlamaForCausalLM",
        "model_type": "llama",
        "num_layers": 4,
        "hidden_size": 32,
    }
    loaded = PeftModel.from_pretrained(pristine, path).eval()
    assert torch.equal(_logits(loaded, batch), expected)


@pytest.mark.parametrize("method", METHODS)
def test_model_card_parses_with_metadata_config_count_and_usage(tmp_path, method):
    model, _, path = _saved(tmp_path, method)
    card = ModelCard.load(path / "README.md")
    peft_type = method.upper()
    info = METHOD_CARD_INFO[peft_type]
    assert card.data.library_name == "peft"
    assert card.data.base_model == BASE_ID
    assert card.data.license == "other"
    assert card.data.pipeline_tag == "text-generation"
    for tag in ("peft-depth", method, f"base_model:adapter:{BASE_ID}"):
        assert tag in card.data.tags
    text = card.text
    assert CARD_MARKER in text
    assert f"# {info.name} adapter for {BASE_ID}" in text
    assert f"[{info.paper_title}]({info.paper_url})" in text
    weights = load_file(path / "adapter_model.safetensors")
    assert f"**{sum(t.numel() for t in weights.values()):,}**" in text
    first_snippet = text.split("```python\n", 1)[1]
    assert first_snippet.startswith("import peft_depth")
    assert "AutoPeftModelForCausalLM.from_pretrained(" in first_snippet
    assert "num_layers = `4`" in text and "hidden_size = `32`" in text
    assert "- PEFT " in text and f"- peft-depth {peft_depth.__version__}" in text
    method_rows = {
        "mola": "| Experts per layer | `[2, 2, 3, 3]` |",
        "molex": "| MoLEx layers | `[1, 2]` |",
        "mod": "| Late layers (K) | `3`: layers `[1, 2, 3]` |",
        "dlo": "| Depth | 4 → 6 layers; copies (after, source): (1, 1), (3, 3) |",
    }
    assert method_rows[method] in text


def test_card_shows_metrics_and_plots_and_they_travel_with_the_adapter(tmp_path):
    plot = tmp_path / "routing.png"
    plot.write_bytes(PNG_BYTES)
    log_history = [{"loss": 2.5, "step": 1}, {"loss": 1.25, "eval_loss": 1.5, "step": 2}]
    _, _, path = _saved(tmp_path, "mola", metrics=log_history, plots={"Expert usage per layer": plot}, license="mit")
    card = ModelCard.load(path / "README.md")
    assert card.data.license == "mit"
    assert "| loss | 1.25 |" in card.text and "| eval_loss | 1.5 |" in card.text
    assert "![Expert usage per layer](plots/routing.png)" in card.text
    assert (path / "plots" / "routing.png").read_bytes() == PNG_BYTES


def test_plots_of_the_same_file_name_keep_their_own_images_and_titles(tmp_path):
    """Two folders' routing_0.png used to be copied onto one file, showing the second image under both titles."""
    before, after = tmp_path / "before" / "routing_0.png", tmp_path / "after" / "routing_0.png"
    for plot, extra in ((before, b""), (after, b"\x00")):  # two different files
        plot.parent.mkdir()
        plot.write_bytes(PNG_BYTES + extra)
    model, _ = adapted("mola")
    set_card_info(model, plots={"Routing before training": before, "Routing after training": after})
    model.save_pretrained(tmp_path / "out")
    text = (tmp_path / "out" / "README.md").read_text()
    assert "![Routing before training](plots/routing_0.png)" in text
    assert "![Routing after training](plots/1-routing_0.png)" in text
    assert (tmp_path / "out" / "plots" / "routing_0.png").read_bytes() == before.read_bytes()
    assert (tmp_path / "out" / "plots" / "1-routing_0.png").read_bytes() == after.read_bytes()
    set_card_info(model, plots=[before, after])  # a list: titles are the file stems, made unique
    model.save_pretrained(tmp_path / "listed")
    text = (tmp_path / "listed" / "README.md").read_text()
    assert "![routing_0](plots/routing_0.png)" in text and "![routing_0 (2)](plots/1-routing_0.png)" in text


def test_the_card_leads_with_the_adapter_at_the_root_and_says_where_the_others_are(tmp_path):
    """peft saves "default" at the folder's root and any other adapter in a subfolder of its name. With another
    adapter active, the card described that one as if at the root, and sent "default" to a `default/` that does not
    exist."""
    model, _ = adapted("mola")
    model.add_adapter("big", peft_depth.MoLAConfig(task_type="CAUSAL_LM", num_experts=3, top_k=1, r=8))
    model.set_adapter("big")
    model.save_pretrained(tmp_path / "both")
    text = (tmp_path / "both" / "README.md").read_text()
    assert "- `big` (MoLA, subfolder `big/`)" in text and "`default/`" not in text
    assert 'PeftModel.from_pretrained(base, "path/to/this/adapter")' in text
    root = json.loads((tmp_path / "both" / "adapter_config.json").read_text())
    assert f"| LoRA rank `r` / `lora_alpha` | `{root['r']}` / `{root['lora_alpha']}` |" in text
    only = get_peft_model(tiny_base(), peft_depth.MoLAConfig(task_type="CAUSAL_LM"), adapter_name="solo")
    only.save_pretrained(tmp_path / "solo")
    text = (tmp_path / "solo" / "README.md").read_text()
    assert 'PeftModel.from_pretrained(base, "path/to/this/adapter", subfolder="solo")' in text
    assert (tmp_path / "solo" / "solo" / "adapter_config.json").is_file()


@pytest.mark.parametrize("method", METHODS)
def test_routing_plots_from_the_last_forward_go_into_the_card(tmp_path, method):
    from peft_depth.hub import save_routing_plots

    model, _ = adapted(method)
    with pytest.raises(ValueError, match="run a forward pass"):
        save_routing_plots(model, tmp_path / "none")
    with torch.no_grad():
        model(**inputs())
    plots = save_routing_plots(model, tmp_path / "plots-src")
    assert plots and all(Path(p).read_bytes()[:8] == PNG_BYTES[:8] for p in plots.values())
    set_card_info(model, plots=plots)
    model.save_pretrained(tmp_path / "adapter")
    card = ModelCard.load(tmp_path / "adapter" / "README.md")
    for title, source in plots.items():
        assert f"![{title}](plots/{Path(source).name})" in card.text
        assert (tmp_path / "adapter" / "plots" / Path(source).name).is_file()


def test_card_templates_are_package_data_for_every_method():
    """The wheel ships ``peft_depth/hub/model_cards`` (a link to the repository's model_cards/ in the source tree)."""
    import peft_depth.hub.model_card as model_card

    folder = Path(model_card.__file__).parent / "model_cards"
    assert model_card.model_cards_dir() == folder
    for method in ("mola", "molex", "mod", "dlo", "_generic"):
        assert (folder / f"{method}.md").is_file(), method
    # pyproject's package-data glob is what puts them into the wheel
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '"peft_depth.hub" = ["model_cards/*.md"]' in pyproject


def test_missing_templates_keep_peft_card_and_the_save_succeeds(tmp_path, monkeypatch):
    import peft_depth.hub.model_card as model_card

    monkeypatch.setattr(model_card, "model_cards_dir", lambda: None)
    model, pristine = adapted("mola")
    with pytest.warns(UserWarning, match="kept peft's model card"):
        model.save_pretrained(tmp_path)
    assert CARD_MARKER not in (tmp_path / "README.md").read_text()
    assert torch.equal(
        _logits(PeftModel.from_pretrained(pristine, tmp_path).eval(), inputs()), _logits(model, inputs())
    )


def test_card_rejects_a_plot_that_is_not_png(tmp_path):
    model, _ = adapted("mola")
    bogus = tmp_path / "plot.png"
    bogus.write_text("not an image")
    with pytest.raises(ValueError, match="not a PNG"):
        set_card_info(model, plots=[bogus])


def test_user_written_card_is_kept_and_only_gains_metadata(tmp_path):
    model, _ = adapted("mola")
    path = tmp_path / "adapter"
    path.mkdir()
    (path / "README.md").write_text("---\nlicense: mit\n---\n# My adapter\n\nHand-written notes.\n")
    model.save_pretrained(path)
    card = ModelCard.load(path / "README.md")
    assert "Hand-written notes." in card.text and CARD_MARKER not in card.text
    assert card.data.library_name == "peft" and "mola" in card.data.tags and card.data.license == "mit"


@pytest.mark.parametrize("method", METHODS)
def test_transformers_add_and_load_adapter_are_refused_before_touching_the_model(tmp_path, method):
    """transformers' model.load_adapter loads weights with its own loader (no peft-depth check: pickles read, missing
    keys logged, extra keys written into the base); add_adapter goes through peft's inject_adapter_in_model, which
    drops the tuner. Each is refused with the way out, and the model is left as it was."""
    _saved(tmp_path, method)
    pristine = tiny_base()
    before = {k: v.clone() for k, v in pristine.state_dict().items()}
    with pytest.raises(ValueError, match=r"runs none of peft-depth's load checks.*PeftModel\.from_pretrained"):
        pristine.load_adapter(str(tmp_path / method))
    # transformers' add_adapter checks peft against its own minimum first (0.22 from transformers 5.24, when peft
    # 0.22 was not yet released): below it transformers refuses, for plain LoRA too; above it the refusal is ours.
    from packaging.version import Version
    from transformers.integrations.peft import MIN_PEFT_VERSION

    ours = Version(peft.__version__) >= Version(MIN_PEFT_VERSION)
    # MoLA keeps every weight in its layers, but its balance loss is collected through the tuner, which this path
    # never builds (aux_losses would be {}): refused while the loss is on
    refusal = r"auxiliary loss \(balance_loss_coef=0.001\).*get_peft_model" if method == "mola" else None
    with pytest.raises(ValueError, match=r"get_peft_model" if ours else r"PEFT you are using is not compatible"):
        pristine.add_adapter(method_configs()[method])
    # the path add_adapter takes once peft is new enough, reached directly: our refusal, whatever the versions
    with pytest.raises(ValueError, match=refusal or r"keeps adapter weights on the tuner.*get_peft_model"):
        peft.inject_adapter_in_model(method_configs()[method], pristine)
    assert not any(isinstance(m, BaseTunerLayer) for m in pristine.modules())  # refused before any injection
    assert pristine.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in pristine.state_dict().items())


def test_mola_without_its_balance_loss_injects_with_the_same_outputs():
    def config():
        return peft_depth.MoLAConfig(
            task_type="CAUSAL_LM", num_experts=2, top_k=1, balance_loss_coef=0.0, init_lora_weights=False
        )

    torch.manual_seed(0)
    injected = peft.inject_adapter_in_model(config(), tiny_base())
    torch.manual_seed(0)
    wrapped = get_peft_model(tiny_base(), config())
    batch = inputs()
    with torch.no_grad():
        assert torch.equal(injected(**batch).logits, wrapped(**batch).logits)
        assert not torch.allclose(injected(**batch).logits, tiny_base()(**batch).logits)
    assert peft_depth.aux_losses(injected) == {} == peft_depth.aux_losses(wrapped)
    # with the loss on, only an inference-mode injection is allowed (nothing trains, so nothing is dropped)
    frozen = peft_depth.MoLAConfig(task_type="CAUSAL_LM", num_experts=2, top_k=1, inference_mode=True)
    model = peft.inject_adapter_in_model(frozen, tiny_base())
    assert any(isinstance(m, BaseTunerLayer) for m in model.modules())
    assert not any(param.requires_grad for param in model.parameters())


def test_an_adapter_file_cannot_write_base_weights_through_transformers_load_adapter(tmp_path):
    """The attack the refusal above closes: a MoLA file with extra keys used to overwrite lm_head and the final norm
    through transformers' loader (peft-depth's own loader refuses the unexpected keys)."""
    model, pristine, path = _saved(tmp_path, "mola")
    weights = load_file(path / "adapter_model.safetensors")
    weights["base_model.model.lm_head.weight"] = torch.zeros_like(pristine.lm_head.weight)
    weights["base_model.model.model.norm.weight"] = torch.full_like(pristine.model.norm.weight, 7.0)
    save_file(weights, path / "adapter_model.safetensors")
    base = fresh_copy(pristine)
    with pytest.raises(ValueError, match="runs none of peft-depth's load checks"):
        base.load_adapter(str(path))
    with pytest.raises(ValueError, match="2 unexpected key"):
        PeftModel.from_pretrained(base, path)
    assert torch.equal(base.lm_head.weight, pristine.lm_head.weight)
    assert torch.equal(base.model.norm.weight, pristine.model.norm.weight)


def test_other_peft_methods_are_untouched(tmp_path):
    model = get_peft_model(tiny_base(), LoraConfig(target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)  # peft's own behaviour: allowed for LoRA
    assert (tmp_path / "bin" / "adapter_model.bin").exists()
    assert CARD_MARKER not in (tmp_path / "bin" / "README.md").read_text()


# ---------------------------------------------------------------------------------------------------- Hub round trip


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    hub = LocalHub()
    with hub.activate():
        yield hub
    assert hub.unhandled == [], f"requests the stand-in could not answer: {hub.unhandled}"


def test_push_to_hub_and_load_back_by_repo_id_revision_and_subfolder(local_hub, tmp_path):
    """MoLA through every Hub path: push (main and a branch), upload_folder into a subfolder, then
    PeftModel.from_pretrained and AutoPeftModelForCausalLM (base model downloaded from the stand-in too)."""
    base = tiny_base()
    base.push_to_hub(BASE_ID)
    pristine = fresh_copy(base)
    batch = inputs()

    main_model, _ = adapted("mola", base=fresh_copy(base), seed=1)
    commit = main_model.push_to_hub("org/mola-adapter")
    assert "127.0.0.1" in str(commit)
    v1_model, _ = adapted("mola", base=fresh_copy(base), seed=2)
    v1_model.push_to_hub("org/mola-adapter", revision="v1")
    sub_model, _ = adapted("mola", base=fresh_copy(base), seed=3)
    sub_model.save_pretrained(tmp_path / "variant")
    HfApi().upload_folder(folder_path=tmp_path / "variant", path_in_repo="variants/b", repo_id="org/mola-adapter")

    files = local_hub.files("org/mola-adapter")
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= set(files)
    assert "variants/b/adapter_model.safetensors" in files
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "peft" and "mola" in card.data.tags and card.data.base_model == BASE_ID
    assert 'from_pretrained("org/mola-adapter")' in card.text  # the usage snippet names the repo

    expected = {name: _logits(m, batch) for name, m in [("main", main_model), ("v1", v1_model), ("b", sub_model)]}
    loaded_main = PeftModel.from_pretrained(fresh_copy(pristine), "org/mola-adapter").eval()
    assert torch.equal(_logits(loaded_main, batch), expected["main"])
    loaded_v1 = PeftModel.from_pretrained(fresh_copy(pristine), "org/mola-adapter", revision="v1").eval()
    assert torch.equal(_logits(loaded_v1, batch), expected["v1"])
    loaded_sub = PeftModel.from_pretrained(fresh_copy(pristine), "org/mola-adapter", subfolder="variants/b").eval()
    assert torch.equal(_logits(loaded_sub, batch), expected["b"])
    auto = AutoPeftModelForCausalLM.from_pretrained("org/mola-adapter").eval()
    assert torch.equal(_logits(auto, batch), expected["main"])
    assert ("GET", f"/{BASE_ID}/resolve/{local_hub.repos[BASE_ID].branches['main']}/model.safetensors") in (
        local_hub.requests
    )
    assert not any(path.endswith(".bin") for _, path in local_hub.requests), "adapter_model.bin must never be fetched"


def test_auto_peft_model_from_a_hub_repo_refuses_to_resize_the_base_for_a_larger_tokenizer(
    local_hub, tmp_path, monkeypatch
):
    """As for a local folder (test_load_trust): a repo whose tokenizer is larger than the base's embeddings would
    make AutoPeftModel give the new tokens random rows."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    # peft asks the Hub for the repo's tokenizer only when HF_HUB_OFFLINE is off in the environment (the stand-in
    # answers every request; nothing leaves the process)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    base = tiny_base()
    base.push_to_hub(BASE_ID)
    model, _ = adapted("mola", base=fresh_copy(base))
    model.save_pretrained(tmp_path / "adapter")
    vocab = {f"w{i}": i for i in range(200)}  # the base has 128 embedding rows
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0")))
    tokenizer.save_pretrained(tmp_path / "adapter")
    HfApi().create_repo("org/mola-big-tokenizer")
    HfApi().upload_folder(folder_path=tmp_path / "adapter", repo_id="org/mola-big-tokenizer")
    # the stand-in lists the repo's tree, which transformers' tokenizer load asks for when online
    listed = {entry.path for entry in HfApi().list_repo_tree("org/mola-big-tokenizer")}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= listed
    with pytest.raises(ValueError, match="has 200 tokens but the base model .* has 128 embedding rows"):
        AutoPeftModelForCausalLM.from_pretrained("org/mola-big-tokenizer")


@pytest.mark.parametrize("method", [m for m in METHODS if m != "mola"])
def test_push_to_hub_round_trip_for_every_method(local_hub, method):
    base = tiny_base()
    base.push_to_hub(BASE_ID)
    model, pristine = adapted(method, base=fresh_copy(base))
    model.push_to_hub(f"org/{method}-adapter")
    files = local_hub.files(f"org/{method}-adapter")
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= set(files)
    assert method in ModelCard(files["README.md"].decode()).data.tags
    batch = inputs()
    expected = _logits(model, batch)
    auto = AutoPeftModelForCausalLM.from_pretrained(f"org/{method}-adapter").eval()
    assert torch.equal(_logits(auto, batch), expected)
    onto_base = PeftModel.from_pretrained(pristine, f"org/{method}-adapter").eval()
    assert torch.equal(_logits(onto_base, batch), expected)


def test_repo_with_only_a_pickle_is_refused_without_downloading_it(local_hub, tmp_path):
    model, pristine, path = _saved(tmp_path, "mola")
    weights = load_file(path / "adapter_model.safetensors")
    os.remove(path / "adapter_model.safetensors")
    torch.save(weights, path / "adapter_model.bin")
    HfApi().create_repo("org/pickled")
    HfApi().upload_folder(folder_path=path, repo_id="org/pickled")
    with pytest.raises(ValueError, match="safetensors only"):
        PeftModel.from_pretrained(pristine, "org/pickled")
    assert not any(p.endswith("adapter_model.bin") and m == "GET" for m, p in local_hub.requests)


# ---------------------------------------------------------------------------------------------------- safe loading


def test_saving_a_pickle_is_refused(tmp_path):
    model, _ = adapted("mola")
    with pytest.raises(ValueError, match="safetensors only"):
        model.save_pretrained(tmp_path, safe_serialization=False)
    assert not (tmp_path / "adapter_model.bin").exists()


def test_local_pickle_is_refused_and_never_unpickled(tmp_path, monkeypatch):
    model, pristine, path = _saved(tmp_path, "mola")
    torch.save(load_file(path / "adapter_model.safetensors"), path / "adapter_model.bin")
    os.remove(path / "adapter_model.safetensors")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load must not run on an untrusted adapter")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ValueError, match="only adapter_model.bin, a pickle, which is refused"):
        PeftModel.from_pretrained(pristine, path)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda raw: raw[: len(raw) - 100], "ends at byte|cover"),
        (lambda raw: raw[:5], "shorter than the 8-byte header"),
        (lambda raw: (10**12).to_bytes(8, "little") + raw[8:], "header length"),
        (lambda raw: raw[:8] + b"\xff" * 16 + raw[24:], "header is not JSON"),
        (lambda raw: raw + b"trailing", "cover"),
    ],
    ids=["truncated", "tiny", "huge-header", "garbage-header", "trailing-bytes"],
)
def test_corrupt_or_truncated_weights_give_a_clear_error(tmp_path, damage, message):
    _, pristine, path = _saved(tmp_path, "mola")
    file = path / "adapter_model.safetensors"
    file.write_bytes(damage(file.read_bytes()))
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(pristine, path)


def test_safetensors_check_rejects_a_shape_that_does_not_match_its_bytes(tmp_path):
    file = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(4)}, file)
    raw = bytearray(file.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + header_len].decode().replace("[4]", "[5]")
    file.write_bytes(bytes(raw[:8]) + header.encode() + bytes(raw[8 + header_len :]))
    with pytest.raises(ValueError, match="needs 20 bytes but spans 16"):
        check_safetensors_file(file)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["missing", "unexpected"])
def test_missing_or_unexpected_keys_are_an_error(tmp_path, method, kind):
    _, pristine, path = _saved(tmp_path, method)
    weights = load_file(path / "adapter_model.safetensors")
    if kind == "missing":
        weights.pop(sorted(weights)[-1])
    else:
        weights["base_model.model.model.layers.0.self_attn.q_proj.mola_extra.weight"] = torch.zeros(2)
    save_file(weights, path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=f"refuses partial loads|{kind}"):
        PeftModel.from_pretrained(pristine, path)


BASE_WEIGHTS = {
    "base_model.model.lm_head.weight": lambda base: base.lm_head.weight,
    "base_model.model.model.embed_tokens.weight": lambda base: base.model.embed_tokens.weight,
    "base_model.model.model.layers.1.mlp.up_proj.weight": lambda base: base.model.layers[1].mlp.up_proj.weight,
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("key", list(BASE_WEIGHTS))
def test_an_adapter_file_never_writes_a_base_weight(tmp_path, method, key):
    """A tensor named after a base parameter is refused from the header, before anything is read or written."""
    _, pristine, path = _saved(tmp_path, method)
    before = BASE_WEIGHTS[key](pristine).detach().clone()
    weights = load_file(path / "adapter_model.safetensors")
    weights[key] = torch.zeros_like(before)
    save_file(weights, path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"1 unexpected key.*never writes"):
        PeftModel.from_pretrained(pristine, path)
    assert torch.equal(BASE_WEIGHTS[key](pristine), before)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda t: t.to(torch.int64), r"non-floating-point.*allowed dtypes"),
        (lambda t: torch.zeros(*t.shape, 2), r"wrong shape"),
        (lambda t: torch.full_like(t, float("nan")), r"NaN or infinite"),
        (lambda t: torch.full_like(t, float("inf")), r"NaN or infinite"),
    ],
    ids=["int64", "shape", "nan", "inf"],
)
def test_wrong_dtype_shape_or_non_finite_tensors_are_refused(tmp_path, method, damage, message):
    _, pristine, path = _saved(tmp_path, method)
    weights = load_file(path / "adapter_model.safetensors")
    name = sorted(weights)[0]
    weights[name] = damage(weights[name])
    save_file(weights, path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(pristine, path)


@pytest.mark.parametrize("method", METHODS)
def test_passing_config_does_not_bypass_the_load_checks(tmp_path, method):
    model, pristine, path = _saved(tmp_path, method)
    weights = load_file(path / "adapter_model.safetensors")
    weights.pop(sorted(weights)[0])
    save_file(weights, path / "adapter_model.safetensors")
    config = type(model.peft_config["default"]).from_pretrained(path)
    (path / "adapter_config.json").unlink()  # the folder's own config is not read on this path
    with pytest.raises(ValueError, match="missing"):
        PeftModel.from_pretrained(pristine, path, config=config)


def test_dlo_refuses_an_adapter_without_its_new_layers(tmp_path):
    _, pristine, path = _saved(tmp_path, "dlo")
    weights = load_file(path / "adapter_model.safetensors")
    new_layer_keys = [k for k in weights if ".dlo_new_layers." in k]
    assert new_layer_keys
    save_file({k: v for k, v in weights.items() if k not in new_layer_keys}, path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=f"{len(new_layer_keys)} missing key"):
        PeftModel.from_pretrained(pristine, path)


def test_failed_load_adapter_leaves_no_half_loaded_adapter(tmp_path):
    model, pristine, path = _saved(tmp_path, "mola")
    weights = load_file(path / "adapter_model.safetensors")
    weights.pop(sorted(weights)[0])
    save_file(weights, path / "adapter_model.safetensors")
    fresh, _ = adapted("mola", base=pristine)
    with pytest.raises(ValueError, match="missing"):
        fresh.load_adapter(path, adapter_name="broken")
    assert list(fresh.peft_config) == ["default"]


@pytest.mark.parametrize(
    "other, differences",
    [
        (lambda: tiny_base(num_layers=6), ["number of layers: adapter saved with 4, this model has 6"]),
        (lambda: tiny_base(hidden_size=48), ["hidden size: adapter saved with 32, this model has 48"]),
    ],
    ids=["depth", "hidden-size"],
)
@pytest.mark.parametrize("method", METHODS)
def test_incompatible_base_model_names_what_differs(tmp_path, method, other, differences):
    _, _, path = _saved(tmp_path, method)
    target = other()
    modules_before = len(list(target.modules()))
    with pytest.raises(ValueError, match="different base model") as error:
        PeftModel.from_pretrained(target, path)
    for difference in differences:
        assert difference in str(error.value)
    assert len(list(target.modules())) == modules_before, "nothing may be injected before the check"


def test_different_architecture_is_named(tmp_path):
    from tiny_models import tiny_gpt2

    _, _, path = _saved(tmp_path, "mola")
    with pytest.raises(ValueError, match="different base model") as error:
        PeftModel.from_pretrained(tiny_gpt2(), path)
    message = str(error.value)
    assert "architecture (model class): adapter saved with 'LlamaForCausalLM', this model has 'GPT2LMHeadModel'" in (
        message
    )
    assert "model_type: adapter saved with 'llama', this model has 'gpt2'" in message


def test_facts_check_can_be_waived_explicitly(tmp_path):
    """An adapter recorded for another architecture name is refused by default and loads exactly once the caller
    passes a config with `base_model_facts=None` (the escape hatch the error message names)."""
    from peft import PeftConfig

    model, pristine, path = _saved(tmp_path, "mola")
    config_file = path / "adapter_config.json"
    raw = json.loads(config_file.read_text())
    raw["base_model_facts"]["architecture"] = "MyLlamaVariantForCausalLM"
    config_file.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="MyLlamaVariantForCausalLM"):
        PeftModel.from_pretrained(fresh_copy(pristine), path)
    config = PeftConfig.from_pretrained(path)
    config.base_model_facts = None
    loaded = PeftModel.from_pretrained(fresh_copy(pristine), path, config=config).eval()
    assert torch.equal(_logits(loaded, inputs()), _logits(model, inputs()))


def test_unknown_fields_from_a_newer_release_warn_and_load(tmp_path):
    model, pristine, path = _saved(tmp_path, "mola")
    config = json.loads((path / "adapter_config.json").read_text())
    config["expert_dropout_from_the_future"] = 0.1
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="expert_dropout_from_the_future"):
        loaded = PeftModel.from_pretrained(pristine, path).eval()
    assert torch.equal(_logits(loaded, inputs()), _logits(model, inputs()))


def test_newer_config_layout_is_refused_clearly(tmp_path):
    _, pristine, path = _saved(tmp_path, "mola")
    config = json.loads((path / "adapter_config.json").read_text())
    config["peft_depth_version"] = CONFIG_FORMAT_VERSION + 1
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="Upgrade peft-depth"):
        PeftModel.from_pretrained(pristine, path)


HOSTILE = {
    "mola": [
        ({"num_experts": 10**9, "expert_pattern": None, "top_k": 1}, "would allocate more than"),
        ({"r": 10**8}, "would allocate more than"),
        ({"r": -4}, "`r` must be a positive integer"),
        ({"expert_pattern": [2] * 100_000}, "groups but the model has only 4 layers"),
        ({"top_k": 10**6}, "top_k"),
    ],
    "molex": [
        ({"gate_proj_dim": 10**9, "gate_type": "cosine"}, "would allocate more than"),
        ({"molex_layers": [10**9]}, "molex_layers"),
        ({"alpha": -1.0}, "alpha"),
    ],
    "mod": [
        ({"num_late_layers": 10**9}, "num_late_layers"),
        ({"distill_chunk_size": -1}, "distill_chunk_size"),
    ],
    "dlo": [
        ({"expansion": [0] * 5_000, "init": "copy"}, "`expansion` lists 5000 new layers for a 4-layer model"),
        ({"expand_every": -2}, "expand_every"),
        ({"capacity": 7.0}, "capacity"),
    ],
}


@pytest.mark.parametrize(
    "method, overrides, message",
    [(m, o, msg) for m in METHODS for o, msg in HOSTILE.get(m, [])],
    ids=lambda v: v if isinstance(v, str) and v in METHODS else None,
)
def test_hostile_config_values_fail_before_any_large_allocation(tmp_path, monkeypatch, method, overrides, message):
    monkeypatch.setenv("PEFT_DEPTH_MAX_ADAPTER_BYTES", str(4 * 2**20))  # 4 MiB: 20x these tiny adapters
    _, pristine, path = _saved(tmp_path, method)
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(overrides)
    (path / "adapter_config.json").write_text(json.dumps(config))
    # Counted inside the call, not from the process's peak RSS (which an earlier, larger test in this worker hides).
    # These adapters allocate 7-230 KB when valid; each hostile value would build gigabytes if it were not refused.
    with allocation_counter(max_tensor_bytes=64 * 1024) as allocated:
        with pytest.raises(ValueError, match=message):
            PeftModel.from_pretrained(pristine, path)
    assert allocated.python_peak_bytes < 16 * 2**20, f"{allocated.python_peak_bytes} bytes of Python heap"


def test_allocation_budget_default_scales_with_the_model(monkeypatch):
    from peft_depth.core.safety import adapter_allocation_limit

    monkeypatch.delenv("PEFT_DEPTH_MAX_ADAPTER_BYTES", raising=False)
    assert adapter_allocation_limit(tiny_base()) == 2**30  # floor for small models
    big = torch.nn.Linear(1, 1)
    big.weight = torch.nn.Parameter(torch.empty(2**28, device="meta"))  # meta: counted by shape, not allocated
    monkeypatch.setenv("PEFT_DEPTH_MAX_ADAPTER_BYTES", "12345")
    assert adapter_allocation_limit(big) == 12345


def test_loading_without_the_plugin_fails_with_the_method_name(tmp_path):
    """peft has no plugin discovery: with the autoload hook switched off and no `import peft_depth`, the lookup of
    'MOLA' fails inside peft before any peft-depth code can run. The documented failure is a KeyError naming the
    method; the card says to import first."""
    _, _, path = _saved(tmp_path, "mola")
    script = (
        "import sys\n"
        "from peft import PeftConfig\n"
        "try:\n"
        f"    PeftConfig.from_pretrained({str(path)!r})\n"
        "except KeyError as error:\n"
        "    print('KEYERROR', error); sys.exit(3)\n"
        "import peft_depth\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PEFT_DEPTH_NO_AUTOLOAD": "1"}
    without = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert without.returncode == 3 and "KEYERROR 'MOLA'" in without.stdout, without.stderr[-2000:]
    card = (path / "README.md").read_text()
    assert "KeyError: 'MOLA'" in card and "`import peft_depth` must come first" in card


def test_no_code_from_the_adapter_folder_is_executed(tmp_path, monkeypatch):
    """Python files and auto_maps in a downloaded adapter are never imported, and nobody is asked at a prompt whether
    to run them (transformers asks on the terminal when ``trust_remote_code`` is left unset). The folder is on
    ``sys.path`` and the base loads from disk, so any import of the planted modules would run them."""
    model, pristine, path = _saved(tmp_path, "mola")
    base_dir = tmp_path / "base"
    pristine.save_pretrained(base_dir)
    marker = tmp_path / "executed"
    for name in ("modeling_evil.py", "tokenization_evil.py", "peft_depth_plugin.py"):
        (path / name).write_text(
            f"open({str(marker)!r}, 'w').write('pwned')\nclass EvilModel: pass\nclass EvilTokenizer: pass\n"
        )
    (path / "tokenizer_config.json").write_text(
        json.dumps({"auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}})
    )
    config = json.loads((path / "adapter_config.json").read_text())
    config["auto_mapping"] = {"base_model_class": "EvilModel", "parent_library": "modeling_evil"}
    config["base_model_name_or_path"] = str(base_dir)
    (path / "adapter_config.json").write_text(json.dumps(config))
    monkeypatch.syspath_prepend(str(path))

    prompts = []  # transformers turns any error of the prompt into its refusal, so the prompt answers "no"
    monkeypatch.setattr("builtins.input", lambda *args: prompts.append(args) or "n")
    loaded = PeftModel.from_pretrained(fresh_copy(pristine), path).eval()
    assert torch.equal(_logits(loaded, inputs()), _logits(model, inputs()))
    # the tokenizer's auto_map is refused (remote code is off unless the caller turns it on)
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoPeftModelForCausalLM.from_pretrained(path)
    # without a task type, AutoPeftModel would import auto_mapping's library: peft's allowlist refuses it
    (path / "tokenizer_config.json").unlink()
    config["task_type"] = None
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not in the import allowlist"):
        AutoPeftModel.from_pretrained(path)
    assert not marker.exists()
    assert not prompts, f"the load asked at a prompt whether to run the folder's code: {prompts}"


# ---------------------------------------------------------------------------------------------------- versioning


@pytest.mark.parametrize("method", METHODS)
def test_config_written_by_release_0_1_0_still_loads(method):
    """Fixtures are adapter_config.json files exactly as peft-depth 0.1.0 wrote them (before `base_model_facts`)."""
    from peft import PeftConfig

    fixture = FIXTURES / f"{method}_v1" / "adapter_config.json"
    raw = json.loads(fixture.read_text())
    assert raw["peft_depth_version"] == 1 and "base_model_facts" not in raw
    config = PeftConfig.from_pretrained(fixture.parent)
    assert type(config) is type(method_configs()[method])
    assert config.base_model_facts is None


def test_mola_adapter_written_by_release_0_1_0_reproduces_its_outputs():
    """A MoLA adapter (config + weights) saved by 0.1.0, with the logits it produced then on the same tiny model."""
    folder = FIXTURES / "mola_v1"
    expected = load_file(folder / "expected_logits.safetensors")["logits"]
    loaded = PeftModel.from_pretrained(tiny_base(seed=0), folder).eval()
    assert torch.allclose(_logits(loaded, inputs()), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_save_never_asks_the_hub_and_the_card_counts_the_saved_parameters(local_hub, tmp_path, method):
    """The card's parameter count came from peft's state dict with ``save_embedding_layers="auto"``: it looked the
    base's config up on the Hub at every save, and counted embedding matrices the file lacks when the local model's
    vocabulary differs from the Hub base's."""
    base = tiny_base()
    base.push_to_hub(BASE_ID)
    local = fresh_copy(base)
    local.resize_token_embeddings(local.config.vocab_size + 32, mean_resizing=False)
    model, _ = adapted(method, base=local, seed=1)
    local_hub.requests.clear()
    model.save_pretrained(tmp_path)
    assert local_hub.requests == []
    saved = load_file(tmp_path / "adapter_model.safetensors")
    card = ModelCard.load(tmp_path / "README.md")
    assert f"**{sum(t.numel() for t in saved.values()):,}**" in card.text
