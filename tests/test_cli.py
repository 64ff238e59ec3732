"""The `peft-depth` command line: analyze and inspect on a tiny random Llama with a tiny offline tokenizer.

Numbers in the JSON are checked against direct computation: each text run alone (no padding) with
`output_hidden_states`, and routing statistics of one forward over the whole sample.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import peft_depth
from peft_depth.analysis import LayerAnalysis, RoutingAccumulator, lens_positions, suggest_configs
from peft_depth.analysis.suggest import layer_importance, suggest_dlo, suggest_mod, suggest_mola
from peft_depth.cli import build_parser, main

WORDS = (
    "the a cat dog bird sat ran flew on under over mat log tree and then quickly slowly big small red blue green "
    "house garden river saw heard found every morning night day sun moon rain wind"
).split()
TEXTS = [
    " ".join(WORDS[(7 * i + 3 * j) % len(WORDS)] for j in range(3 + (5 * i) % 14))  # 3 to 16 words: real padding
    for i in range(14)
]
MAX_LENGTH = 12  # some texts are truncated too


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{word: i + 3 for i, word in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def _tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-unit norm weights, so a lens that skipped the final norm would be caught
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the models here are tiny: on a loaded machine, thread synchronisation costs far more than it saves
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model_dir = root / "tiny-llama"
    _tiny_llama().save_pretrained(model_dir)
    _tokenizer().save_pretrained(model_dir)
    bare_dir = root / "no-tokenizer"
    _tiny_llama().save_pretrained(bare_dir)
    data = root / "texts.jsonl"
    data.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(TEXTS)), encoding="utf-8")
    return {"root": root, "model": model_dir, "bare": bare_dir, "data": data}


def _run_cli(argv, capsys):
    capsys.readouterr()  # drop what the test itself printed before
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_png(path: Path) -> None:
    assert path.is_file(), path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 50 and image.size[1] > 50


# ---------------------------------------------------------------------------------------------- analyze


def _direct_statistics(model_dir: Path) -> dict:
    """Per-layer statistics computed by hand: each text alone (no padding), from output_hidden_states."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    L = model.config.num_hidden_layers
    cos, update, redundant = [[] for _ in range(L - 1)], [[] for _ in range(L - 1)], [[] for _ in range(L - 1)]
    lens_loss, lens_correct = [[] for _ in range(L + 1)], [[] for _ in range(L + 1)]
    tokens = positions = 0
    with torch.no_grad():
        for text in TEXTS:
            ids = torch.tensor([tokenizer(text, truncation=True, max_length=MAX_LENGTH)["input_ids"]])
            out = model(ids, output_hidden_states=True)
            hs = [h[0] for h in out.hidden_states]
            tokens += ids.shape[1]
            positions += ids.shape[1] - 1
            for layer in range(L - 1):  # the last entry of hidden_states may be normed: checked through the logits
                x, y = hs[layer], hs[layer + 1]
                c = F.cosine_similarity(x, y, dim=-1)
                cos[layer].append(c)
                update[layer].append((y - x).norm(dim=-1) / x.norm(dim=-1))
                redundant[layer].append((c >= 0.98).float())  # the default --redundancy-threshold
            targets = ids[0, 1:]
            for row in range(L + 1):
                if row < L:  # row 0: embeddings, row l: output of block l-1
                    logits = model.lm_head(model.model.norm(hs[row]))[:-1]
                else:
                    logits = out.logits[0, :-1]
                lens_loss[row].append(F.cross_entropy(logits, targets, reduction="none"))
                lens_correct[row].append((logits.argmax(-1) == targets).float())

    def mean(chunks):
        return torch.cat(chunks).mean().item()

    return {
        "tokens": tokens,
        "positions": positions,
        "cosine": [mean(c) for c in cos],
        "relative_update": [mean(u) for u in update],
        "redundant_fraction": [mean(r) for r in redundant],
        "lens_loss": [mean(v) for v in lens_loss],
        "lens_accuracy": [mean(v) for v in lens_correct],
    }


def test_analyze_json_matches_direct_computation(workspace, capsys, tmp_path):
    out = tmp_path / "analysis"
    argv = ["analyze", workspace["model"], "--dataset", workspace["data"], "--output-dir", out]
    argv += ["--num-samples", 100, "--batch-size", 4, "--max-length", MAX_LENGTH, "--lens-positions", 0]
    code, stdout, stderr = _run_cli(argv, capsys)
    assert code == 0, stderr
    assert "Suggested configs" in stdout
    report = json.loads((out / "analysis.json").read_text())
    expected = _direct_statistics(workspace["model"])
    layers = report["layers"]
    assert report["counts"] == {
        "layers": 4,
        "sequences": len(TEXTS),
        "tokens": expected["tokens"],  # padding excluded
        "lens_positions": expected["positions"],
    }
    for key in ("cosine", "relative_update", "redundant_fraction"):
        assert layers[key][:3] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
    assert report["embedding"]["lens_loss"] == pytest.approx(expected["lens_loss"][0], rel=1e-4)
    assert report["embedding"]["lens_accuracy"] == pytest.approx(expected["lens_accuracy"][0], abs=1e-6)
    assert layers["lens_loss"] == pytest.approx(expected["lens_loss"][1:], rel=1e-4)
    assert layers["lens_accuracy"] == pytest.approx(expected["lens_accuracy"][1:], abs=1e-6)
    assert layers["lens_agreement"][-1] == 1.0
    for name in ("overview", "redundancy", "update_norm", "logit_lens"):
        _assert_png(out / f"{name}.png")
    summary = (out / "summary.txt").read_text()
    assert "MoLAConfig(" in summary and "DLOConfig(" in summary and "MoDConfig(" in summary and "why:" in summary

    # the suggestions follow from the numbers and are valid configs that build on the model
    analysis = LayerAnalysis(
        num_layers=4,
        redundancy_threshold=report["settings"]["redundancy_threshold"],
        embedding=report["embedding"],
        **{k: layers[k] for k in ("cosine", "relative_update", "redundant_fraction", "lens_loss", "lens_accuracy")},
    )
    assert report["suggestions"] == json.loads(json.dumps(suggest_configs(analysis)))
    model = AutoModelForCausalLM.from_pretrained(workspace["model"])
    suggestions = report["suggestions"]
    for config in (
        peft_depth.MoLAConfig(r=2, target_modules=["q_proj", "v_proj"], **suggestions["mola"]["config"]),
        peft_depth.DLOConfig(**suggestions["dlo"]["config"]),
        peft_depth.MoDConfig(**suggestions["mod"]["config"]),
    ):
        peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(workspace["model"]), config)
        peft_model(torch.tensor([[3, 4, 5, 6]]))
    del model


def test_analyze_batch_size_and_lens_sampling(workspace, capsys, tmp_path):
    base = ["analyze", workspace["model"], "--dataset", workspace["data"], "--max-length", MAX_LENGTH, "--quiet"]
    reports = []
    for batch_size, lens in ((1, 0), (5, 3)):
        out = tmp_path / f"b{batch_size}-l{lens}"
        code, stdout, stderr = _run_cli(
            [*base, "--batch-size", batch_size, "--lens-positions", lens, "--output-dir", out], capsys
        )
        assert code == 0, stderr
        assert stdout == ""  # --quiet
        reports.append(json.loads((out / "analysis.json").read_text()))
    full, sampled = reports
    # padding never enters a statistic: batching changes nothing (the lens is checked against unpadded runs above)
    for key in ("cosine", "relative_update", "redundant_fraction"):
        assert sampled["layers"][key] == pytest.approx(full["layers"][key], rel=1e-4, abs=1e-6)
    lengths = [min(len(t.split()), MAX_LENGTH) for t in TEXTS]
    assert sampled["counts"]["lens_positions"] == sum(min(3, n - 1) for n in lengths)
    assert sampled["counts"]["tokens"] == full["counts"]["tokens"] == sum(lengths)


def test_lens_positions_keeps_only_real_next_tokens():
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    every = lens_positions(mask, None)
    assert every.tolist() == [
        [True, True, True, True, False, False],
        [True, False, False, False, False, False],
        [False] * 6,
    ]
    some = lens_positions(mask, 2, torch.Generator().manual_seed(0))
    assert some.sum(dim=1).tolist() == [2, 1, 0]
    assert not (some & ~every).any()


def _synthetic(cosine, lens_accuracy, lens_loss, redundant=None) -> LayerAnalysis:
    n = len(cosine)
    return LayerAnalysis(
        num_layers=n,
        cosine=list(cosine),
        relative_update=[1 - c for c in cosine],
        redundant_fraction=list(redundant or [0.0] * n),
        lens_loss=list(lens_loss),
        lens_accuracy=list(lens_accuracy),
        lens_agreement=[0.0] * n,
        embedding={"lens_loss": 10.0, "lens_accuracy": 0.0},
    )


def test_suggestions_follow_the_numbers():
    # later layers change more and gain more accuracy: MoLA gives them more experts (the paper's ▽ shape)
    cosine = [0.98, 0.97, 0.96, 0.95, 0.9, 0.85, 0.8, 0.7]
    loss = [9.9, 9.8, 9.6, 9.3, 8.8, 8.0, 6.5, 4.0]
    accuracy = [0.0, 0.0, 0.05, 0.1, 0.2, 0.3, 0.45, 0.5]
    analysis = _synthetic(cosine, accuracy, loss, redundant=[0.9, 0.8, 0.7, 0.6, 0.2, 0.1, 0.0, 0.0])
    importance = layer_importance(analysis)
    assert sum(importance) == pytest.approx(1.0)
    change = [(1 - c) / sum(1 - c for c in cosine) for c in cosine]
    gain = [a - b for a, b in zip(accuracy, [0.0, *accuracy[:-1]])]
    assert importance == pytest.approx([(c + g / 0.5) / 2 for c, g in zip(change, gain)])
    mola = suggest_mola(analysis)
    pattern = mola["config"]["expert_pattern"]
    assert len(pattern) == 4 and pattern == sorted(pattern) and pattern[0] < pattern[-1]
    assert all(2 <= e <= 8 for e in pattern)
    assert len(mola["num_experts_per_layer"]) == 8 and "Layers 6-7 matter most" in mola["reason"]
    # a single outlier layer does not claim its whole group (group scores are medians)
    cosine12 = [0.0] + [0.96] * 8 + [0.9] * 3  # layer 0 turns embeddings into the residual stream
    accuracy12 = [0.01 * i for i in range(12)]
    pattern = suggest_mola(_synthetic(cosine12, accuracy12, [5.0] * 12))["config"]["expert_pattern"]
    assert pattern[0] < pattern[-1], pattern  # a group mean would give layers 0-2 the most experts
    dlo = suggest_dlo(analysis)
    assert dlo["config"]["expansion"] == [6, 7]  # two most important of 8 layers (one per four)
    assert dlo["skip_points"] == [0, 1]  # highest cosine
    assert dlo["config"]["capacity"] == pytest.approx(1 - sum(analysis.redundant_fraction) / 8, abs=0.005)
    mod = suggest_mod(analysis)
    assert mod["config"]["num_late_layers"] == 2  # 0.45 >= 0.9 * 0.5, 0.3 is not
    assert suggest_mod(_synthetic(cosine, [0.0] * 4 + [0.48, 0.49, 0.5, 0.5], loss))["config"] == {
        "num_late_layers": 4
    }
    # only the final layer predicts: MoD's minimum of 2, and the reason says so
    lonely = suggest_mod(_synthetic(cosine, [0.0] * 7 + [0.5], loss))
    assert lonely["config"] == {"num_late_layers": 2} and "at least 2" in lonely["reason"]


# ---------------------------------------------------------------------------------------------- errors and help


def test_errors_are_one_line_without_traceback(workspace, capsys, tmp_path):
    out = ["--output-dir", tmp_path / "x", "--quiet"]
    cases = [
        (["analyze", tmp_path / "missing-model", *out], 1, "Model not found"),
        (["analyze", workspace["bare"], "--dataset", workspace["data"], *out], 1, "--tokenizer"),
        (["analyze", workspace["model"], "--dataset", tmp_path / "missing.jsonl", *out], 1, "Dataset not found"),
        (["analyze", workspace["model"], "--dataset", workspace["data"], "--text-field", "body", *out], 1, "body"),
        (["analyze", workspace["model"], "--num-samples", "0"], 2, "--num-samples"),
        (["analyze", workspace["model"], "--max-length", "1"], 2, "--max-length"),
        (["analyze", workspace["model"], "--frobnicate"], 2, "--frobnicate"),
        (["inspect", tmp_path / "missing-adapter", *out], 1, "Adapter not found"),
        (["inspect", workspace["model"], *out], 1, "adapter_config.json"),
    ]
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    long_texts = tmp_path / "long.txt"
    long_texts.write_text(" ".join(WORDS * 20) + "\n")
    small_vocab = tmp_path / "small-vocab"
    LlamaForCausalLM(replace(_tiny_llama().config, vocab_size=8)).save_pretrained(small_vocab)
    _tokenizer().save_pretrained(small_vocab)
    data = ["--dataset", workspace["data"]]
    cases += [
        # checked before the model loads: no traceback from mkdir after minutes of loading
        (["analyze", workspace["model"], *data, "--output-dir", a_file, "--quiet"], 1, "Cannot write --output-dir"),
        (["inspect", workspace["model"], *data, "--output-dir", a_file / "x", "--quiet"], 1, "adapter_config.json"),
        (["analyze", workspace["model"], *data, "--split", "nosuch", *out], 1, "--split 'nosuch'"),
        (["analyze", workspace["model"], "--dataset", "boolq", "--split", "train", *out], 1, "validation split only"),
        (["analyze", workspace["model"], "--dataset", long_texts, "--max-length", "100", *out], 1, "64 positions"),
        (["analyze", small_vocab, *data, *out], 1, "embeddings have 8 rows"),
    ]
    one_word = tmp_path / "one-word.txt"
    one_word.write_text("hello\nthere\n")
    listed, untyped = tmp_path / "listed", tmp_path / "untyped"
    for folder, config in ((listed, []), (untyped, {"peft_type": "NOT_A_METHOD", "base_model_name_or_path": "x"})):
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps(config))
    cases += [
        (["analyze", workspace["model"], "--dataset", one_word, *out], 1, "the logit lens measured nothing"),
        (["analyze", workspace["model"], "--seed", "99999999999999999999999"], 2, "--seed"),
        (["analyze", workspace["model"], *data, "--device", "meta", *out], 1, "--device 'meta': use a compute device"),
        (["inspect", listed, *out], 1, "holds a JSON list, not the object"),
        (["inspect", untyped, "--base", workspace["model"], *out], 1, "`peft_type` 'NOT_A_METHOD'; expected"),
    ]
    for argv, expected_code, needle in cases:
        code, _, stderr = _run_cli(argv, capsys)
        assert code == expected_code, (argv, stderr)
        assert needle in stderr, (argv, stderr)
        assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr, stderr
    # the model without a tokenizer works once --tokenizer names one
    code, _, stderr = _run_cli(
        ["analyze", workspace["bare"], "--tokenizer", workspace["model"], "--dataset", workspace["data"], *out], capsys
    )
    assert code == 0, stderr


def test_every_option_is_explained():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(subparsers.choices) == {"analyze", "inspect"}
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            assert action.help and len(action.help) > 10, (name, action.dest)


def test_console_script_help():
    script = shutil.which("peft-depth", path=str(Path(sys.executable).parent))
    assert script is not None, "the peft-depth console script is not installed"
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "analyze" in result.stdout and "inspect" in result.stdout


# ---------------------------------------------------------------------------------------------- inspect


def _method_configs() -> dict:
    return {
        "mola": peft_depth.MoLAConfig(expert_pattern=[2, 3], r=2, target_modules=["q_proj", "v_proj", "down_proj"]),
        "molex": peft_depth.MoLExConfig(r=2, target_modules=["q_proj"], routing="token", molex_layers=[1, 2]),
        "mod": peft_depth.MoDConfig(num_late_layers=3, router_granularity="token"),
        "dlo": peft_depth.DLOConfig(expand_every=2, r=2, target_modules=["q_proj"]),
    }


def _one_forward_stats(model, tokenizer) -> dict:
    """routing_stats of a single forward over the whole sample: the reference for the merged statistics."""
    encoded = [tokenizer(t, truncation=True, max_length=MAX_LENGTH)["input_ids"] for t in TEXTS]
    width = max(map(len, encoded))
    ids = torch.zeros(len(encoded), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(encoded):
        ids[row, : len(e)] = torch.tensor(e)
        mask[row, : len(e)] = 1
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    return peft_depth.routing_stats(model)


def _assert_close(actual, expected, path="") -> None:
    if isinstance(expected, dict):
        assert set(actual) == set(expected), path
        for key in expected:
            _assert_close(actual[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected)):
            _assert_close(a, e, f"{path}[{i}]")
    elif isinstance(expected, float) and math.isnan(expected):
        assert actual is None or math.isnan(actual), path
    elif isinstance(expected, (int, float)) and not isinstance(expected, bool):
        assert actual == pytest.approx(expected, rel=1e-4, abs=1e-6), path
    else:
        assert actual == expected, path


@pytest.mark.parametrize("method", ["mola", "molex", "mod", "dlo"])
def test_inspect_merges_batches_like_one_forward(workspace, capsys, tmp_path, method):
    base = AutoModelForCausalLM.from_pretrained(workspace["model"])
    model = get_peft_model(base, _method_configs()[method])
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter: routers and gates away from their neutral start
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.5)
    adapter_dir = tmp_path / f"{method}-adapter"
    model.save_pretrained(adapter_dir)

    out = tmp_path / "inspect"
    argv = ["inspect", adapter_dir, "--dataset", workspace["data"], "--output-dir", out]
    argv += ["--batch-size", 3, "--max-length", MAX_LENGTH, "--num-samples", 100]
    code, stdout, stderr = _run_cli(argv, capsys)
    assert code == 0, stderr
    report = json.loads((out / "routing.json").read_text())
    assert report["counts"]["forwards"] == math.ceil(len(TEXTS) / 3) > 1
    assert report["base_model"] == str(workspace["model"])  # read from the adapter config

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workspace["model"]), adapter_dir).eval()
    expected = json.loads(
        json.dumps(_one_forward_stats(reloaded, PreTrainedTokenizerFast.from_pretrained(workspace["model"])))
    )
    assert set(report["routing"]) == {method}
    _assert_close(report["routing"], expected)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [f"{method}_default.png"]
    _assert_png(out / pngs[0])
    assert method in stdout


def test_inspect_with_explicit_base_and_tokenizer(workspace, capsys, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(workspace["model"])
    model = get_peft_model(base, _method_configs()["mola"])
    model.peft_config["default"].base_model_name_or_path = "org/not-a-cached-model"
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    common = ["--dataset", workspace["data"], "--output-dir", tmp_path / "o", "--quiet", "--num-samples", 4]
    code, _, stderr = _run_cli(["inspect", adapter_dir, *common], capsys)
    assert code == 1 and "--base" in stderr and len(stderr.strip().splitlines()) == 1
    code, _, stderr = _run_cli(
        ["inspect", adapter_dir, "--base", workspace["bare"], "--tokenizer", workspace["model"], *common], capsys
    )
    assert code == 0, stderr
    report = json.loads((tmp_path / "o" / "routing.json").read_text())
    assert report["counts"]["sequences"] == 4
    rows = report["routing"]["mola"]["default"]
    assert [row["num_tokens"] for row in rows] == [report["counts"]["tokens"]] * 4  # real tokens only, every layer


def _accumulator_input(num_tokens, expert_fraction, mean_prob, balance_loss, executed_fraction, chosen):
    """`routing_stats` of one forward with one MoLA layer, one DLO layer and one MoLEx layer, all of adapter "a"."""
    mola_row = {"layer": 0, "num_experts": 2, "top_k": 1, "num_tokens": num_tokens, "usage_entropy": 0.0}
    mola_row |= {"expert_fraction": expert_fraction, "mean_prob": mean_prob, "balance_loss": balance_loss}
    dlo_layer = {"layer": 0, "new": False, "num_tokens": num_tokens, "executed_fraction": executed_fraction}
    return {
        "mola": {"a": [mola_row]},
        "dlo": {"a": {"layers": [dlo_layer], "executed_fraction": executed_fraction, "step": 0}},
        "molex": {"a": [{"layer": 1, "chosen": chosen, "num_tokens": num_tokens, "alpha": 0.9}]},
    }


def test_routing_accumulator_weights_by_tokens():
    acc = RoutingAccumulator()
    acc.add(_accumulator_input(3, [1.0, 0.0], [0.8, 0.2], balance_loss=1.6, executed_fraction=1.0, chosen=0))
    acc.add(_accumulator_input(1, [0.0, 1.0], [0.4, 0.6], balance_loss=1.2, executed_fraction=0.0, chosen=3))
    merged = acc.result()
    row = merged["mola"]["a"][0]
    assert row["num_tokens"] == 4 and row["num_experts"] == 2 and row["layer"] == 0
    assert row["expert_fraction"] == pytest.approx([0.75, 0.25])
    assert row["mean_prob"] == pytest.approx([0.7, 0.3])
    assert row["usage_entropy"] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert row["balance_loss"] == pytest.approx(2 * (0.75 * 0.7 + 0.25 * 0.3))
    assert merged["dlo"]["a"]["executed_fraction"] == pytest.approx(0.75)
    assert merged["dlo"]["a"]["layers"][0]["executed_fraction"] == pytest.approx(0.75)
    assert merged["molex"]["a"][0]["chosen"] == [0, 3] and merged["molex"]["a"][0]["alpha"] == 0.9


# ---------------------------------------------------------------------------------------------- inputs, other architectures


def test_load_texts_from_each_source(tmp_path):
    from peft_depth.analysis.data import load_texts

    lines = tmp_path / "lines.txt"
    lines.write_text("first line\n\n  second line  \nthird\n", encoding="utf-8")
    assert load_texts(str(lines), 10) == ["first line", "second line", "third"]
    sample = load_texts(str(lines), 2, seed=3)
    assert len(sample) == 2 and set(sample) <= {"first line", "second line", "third"}
    table = tmp_path / "rows.csv"
    table.write_text("label,body\n1,hello there\n0,general kenobi\n", encoding="utf-8")
    assert load_texts(str(table), 5, text_field="body") == ["hello there", "general kenobi"]
    # the bundled default: BoolQ's Wikipedia passages, offline
    passages = load_texts(None, 3)
    assert len(passages) == 3 and all(len(p.split()) > 20 for p in passages)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=32))


def _granite():
    from transformers import GraniteConfig, GraniteForCausalLM

    config = GraniteConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        logits_scaling=8.0,
    )  # fmt: skip
    return GraniteForCausalLM(config)


def _opt_with_projection():
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=64, hidden_size=32, word_embed_proj_dim=16, num_hidden_layers=3, num_attention_heads=4,
        ffn_dim=64, max_position_embeddings=32,
    )  # fmt: skip
    return OPTForCausalLM(config)


# GPT-2; Granite divides its logits by `logits_scaling`; OPT-350m's layout projects the final state before the head
@pytest.mark.parametrize("build", [_gpt2, _granite, _opt_with_projection], ids=["gpt2", "granite", "opt_project_out"])
def test_final_lens_equals_model_loss(build):
    from peft_depth.analysis import analyze_layers
    from peft_depth.analysis.data import TextBatch

    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0)  # peaked logits: a missed scaling changes the loss clearly
    ids = torch.randint(1, 64, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    analysis = analyze_layers(model, [TextBatch(ids, mask)])
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    valid = torch.zeros_like(mask, dtype=torch.bool)
    valid[:, :-1] = mask[:, :-1].bool() & mask[:, 1:].bool()
    expected = F.cross_entropy(logits[valid], ids.roll(-1, dims=1)[valid]).item()
    assert analysis.num_tokens == 14 and analysis.num_lens_positions == 12
    assert analysis.lens_loss[-1] == pytest.approx(expected, rel=1e-5)


def test_unknown_method_gets_a_generic_heatmap(tmp_path):
    from peft_depth.analysis.inspect_adapter import plot_routing, summarize_routing

    merged = {
        "newmethod": {
            "default": [
                {"layer": 0, "num_tokens": 5, "score": 0.2, "weights": [0.1, 0.9]},
                {"layer": 1, "num_tokens": 5, "score": 0.7, "weights": [0.6, 0.4]},
            ]
        },
        "scalars": {"default": {"layers": [{"layer": 0, "num_tokens": 5, "score": 0.5}]}},
    }
    written = plot_routing(merged, tmp_path)
    assert set(written) == {"newmethod_default", "scalars_default"}
    for path in written.values():
        _assert_png(Path(path))
    assert "newmethod / default" in summarize_routing(merged)


@pytest.mark.slow
def test_analyze_smollm2_final_lens_is_the_model_loss(capsys, tmp_path):
    """The real bundled model: the last layer's logit lens is the model's own next-token loss on the sample."""
    from peft_depth.analysis.data import load_texts, load_tokenizer, make_batches, resolve_model

    code, _, stderr = _run_cli(
        ["analyze", "--num-samples", 8, "--lens-positions", 0, "--output-dir", tmp_path, "--quiet"], capsys
    )
    assert code == 0, stderr
    report = json.loads((tmp_path / "analysis.json").read_text())
    path = resolve_model(None)
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in make_batches(load_texts(None, 8), tokenizer, 8, 64):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            valid = torch.zeros_like(batch.attention_mask, dtype=torch.bool)
            valid[:, :-1] = batch.attention_mask[:, :-1].bool() & batch.attention_mask[:, 1:].bool()
            targets = batch.input_ids.roll(-1, dims=1)[valid]
            total += F.cross_entropy(logits[valid], targets, reduction="sum").item()
            count += int(valid.sum())
    assert report["counts"]["lens_positions"] == count
    assert report["layers"]["lens_loss"][-1] == pytest.approx(total / count, rel=1e-4)
    assert report["counts"]["layers"] == 30 and len(report["suggestions"]["mola"]["num_experts_per_layer"]) == 30


@pytest.mark.parametrize(
    "planted, refused",
    [("tokenizer_with_a_local_class", False), ("tokenizer_code_only", True), ("base_code_only", True)],
)
def test_inspect_never_runs_or_asks_about_code_from_a_downloaded_folder(
    workspace, capsys, tmp_path, monkeypatch, planted, refused
):
    """`inspect` reads the adapter's tokenizer (when it ships one) and the base its config names. A stranger's auto_map
    there is never imported and nobody is asked at a prompt whether to run it (transformers asks on the terminal
    when trust_remote_code is left unset and no library class fits): a folder with a library class loads with it,
    one with code only is refused in one line."""
    base_dir = tmp_path / "base"
    shutil.copytree(workspace["model"], base_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), _method_configs()["mola"])
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    marker = tmp_path / "executed"
    folder = base_dir if planted == "base_code_only" else adapter_dir
    (folder / "evil_code.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\nclass Evil: pass\n")
    tokenizer_auto_map = {"auto_map": {"AutoTokenizer": ["evil_code.Evil", None]}}
    if planted == "tokenizer_with_a_local_class":
        _tokenizer().save_pretrained(adapter_dir)
        config = json.loads((adapter_dir / "tokenizer_config.json").read_text())
        (adapter_dir / "tokenizer_config.json").write_text(json.dumps({**config, **tokenizer_auto_map}))
    elif planted == "tokenizer_code_only":
        (adapter_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_auto_map))
    else:
        config = json.loads((base_dir / "config.json").read_text())
        config.update(model_type="evil-arch", auto_map={"AutoConfig": "evil_code.Evil"})
        (base_dir / "config.json").write_text(json.dumps(config))
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(base_dir)
    (adapter_dir / "adapter_config.json").write_text(json.dumps(adapter_config))
    monkeypatch.syspath_prepend(str(folder))
    prompts = []  # transformers turns any error of the prompt into its refusal, so the prompt answers "no"
    monkeypatch.setattr("builtins.input", lambda *args: prompts.append(args) or "n")

    argv = ["inspect", adapter_dir, "--dataset", workspace["data"], "--output-dir", tmp_path / "out", "--quiet"]
    code, _, stderr = _run_cli(argv, capsys)
    if refused:
        assert code == 1 and "contains custom code" in stderr, stderr
        assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr, stderr
    else:
        assert code == 0, stderr
    assert not prompts, f"inspect asked at a prompt whether to run the folder's code: {prompts}"
    assert not marker.exists()


def test_mod_is_not_suggested_without_a_basis():
    """One layer (MoDConfig needs 2), or a final lens accuracy of 0 or NaN (no lens positions): every layer passed
    the 90%-of-final threshold, so the suggestion was the whole depth (or 2 with a NaN reason)."""
    one = suggest_mod(_synthetic([0.9], [0.4], [3.0]))
    assert one["config"] is None and "this model has 1" in one["reason"]
    for final in (0.0, math.nan):
        none = suggest_mod(_synthetic([0.9] * 4, [0.3, 0.2, 0.1, final], [3.0] * 4))
        assert none["config"] is None and "no basis for `num_late_layers`" in none["reason"]
