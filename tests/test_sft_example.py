"""examples/sft.py parses TRL-style command lines into the right adapter and training configs (no model is loaded)."""

import importlib.util
import sys
from pathlib import Path

import pytest
from peft import LoraConfig

import peft_depth
from peft_depth import DepthSFTConfig

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sft.py"


@pytest.fixture(scope="module")
def sft():
    spec = importlib.util.spec_from_file_location("sft_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def parse(sft, *argv):
    script, method, model, training = sft.parse_args(["--output_dir", "/tmp/unused", *argv])
    return script, sft.build_peft_config(method, model), model, training


def test_embedded_defaults_are_the_main_job(sft):
    script, config, model, training = parse(sft)
    assert isinstance(config, peft_depth.MoLAConfig)
    assert config.expert_pattern == [2, 4, 6, 8] and config.r == 8 and config.lora_alpha == 16
    assert isinstance(training, DepthSFTConfig)
    assert model.model_name_or_path == sft.SMOLLM2 and script.task == "sst2" and script.num_test == 500
    assert training.max_steps == 40 and training.report_to in ([], "none", ["none"])
    assert training.gradient_checkpointing is False


def test_method_options_and_comma_lists(sft):
    _, config, _, training = parse(
        sft, "--expert_pattern", "8,6,4,2", "--top_k", "1", "--lora_r", "4", "--routing_loss_coef", "0.01"
    )
    assert config.expert_pattern == [8, 6, 4, 2] and config.top_k == 1 and config.r == 4
    assert training.routing_loss_coef == 0.01
    _, config, _, _ = parse(sft, "--num_experts", "2,2,4,4", "--top_k", "1,1,2,2")
    assert config.num_experts == [2, 2, 4, 4] and config.top_k == [1, 1, 2, 2] and config.expert_pattern is None
    _, config, _, _ = parse(sft, "--peft_method", "lora")
    assert isinstance(config, LoraConfig) and config.target_modules == "all-linear"
    _, config, _, _ = parse(sft, "--peft_method", "molex", "--routing", "token", "--molex_layers", "0,1")
    assert config.routing == "token" and config.molex_layers == [0, 1]


def test_bad_options_are_refused_clearly(sft):
    with pytest.raises(ValueError, match="expert_pattern"):
        parse(sft, "--expert_pattern", "2,x")
    with pytest.raises(ValueError, match="has no option"):
        parse(sft, "--peft_method", "molex", "--num_late_layers", "2")
    with pytest.raises(ValueError, match="peft_method"):
        parse(sft, "--peft_method", "prefix")
    with pytest.raises(ValueError, match="`--adapter_kwargs` must be a JSON object"):
        parse(sft, "--peft_method", "dlo", "--adapter_kwargs", "{capacity: 0.8}")
    # options of another method are refused, not dropped
    with pytest.raises(ValueError, match=r"DLOConfig has no option\(s\) \['expert_pattern'\]"):
        parse(sft, "--peft_method", "dlo", "--expert_pattern", "8,6,4,2")
    # ... the ▽ pattern too: it is MoLAConfig's default, not a value the script fills in for every method
    with pytest.raises(ValueError, match=r"DLOConfig has no option\(s\) \['expert_pattern'\]"):
        parse(sft, "--peft_method", "dlo", "--expert_pattern", "2,4,6,8")
    # an explicit pattern next to --num_experts is a clash, not a pattern to drop silently
    with pytest.raises(ValueError, match="either `num_experts` or `expert_pattern`, not both"):
        parse(sft, "--num_experts", "8", "--expert_pattern", "2,4,6,8")
    with pytest.raises(ValueError, match=r"not the depth methods' options \['adapter_kwargs_bogus', 'top_k'\]"):
        parse(sft, "--peft_method", "lora", "--top_k", "2", "--adapter_kwargs", '{"adapter_kwargs_bogus": 1}')


def test_mod_and_dlo_keep_their_own_lora_default(sft):
    """The script's r=8 is MoLA's and MoLEx's: DLO kept LoRA on all 30 original layers (27M trainable, every layer
    routed) where its own default trains only the new layers, and MoD alone has no LoRA. LoRA comes from
    --adapter_kwargs for them."""
    _, dlo, _, _ = parse(sft, "--peft_method", "dlo")
    assert dlo.r == 0 and dlo.routed_layers == "new"
    _, mod, _, _ = parse(sft, "--peft_method", "mod")
    assert mod.target_modules is None and not mod.uses_lora
    _, dlo, _, _ = parse(sft, "--peft_method", "dlo", "--adapter_kwargs", '{"r": 4}')
    assert dlo.r == 4


def test_a_config_yaml_with_plain_yaml_types(sft, tmp_path):
    (tmp_path / "run.yaml").write_text(
        "peft_method: mola\nexpert_pattern: [8, 6, 4, 2]\ntop_k: 1\nadapter_kwargs: {balance_loss_coef: 0.01}\n"
    )
    _, config, _, _ = parse(sft, "--config", str(tmp_path / "run.yaml"))
    assert config.expert_pattern == [8, 6, 4, 2] and config.top_k == 1 and config.balance_loss_coef == 0.01


def test_the_lora_baseline_adapts_the_methods_lora_targets(sft):
    _, _, model, _ = parse(sft)
    assert sft.lora_baseline_config(model, {"v_proj", "q_proj"}).target_modules == {"q_proj", "v_proj"}
    assert sft.lora_baseline_config(model, None).target_modules == "all-linear"  # a method without LoRA


def test_the_main_job_runs_end_to_end_and_compares_with_lora(sft, tmp_path, monkeypatch, capsys):
    # A tiny random Llama in place of SmolLM2 (same code path): trains the method and the LoRA baseline, saves and
    # reloads both, and prints the three accuracies with paired intervals computed from the saved per-row results.
    import json

    from tiny_models import tiny_llama, word_tokenizer

    from peft_depth.analysis import paired_bootstrap

    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    word_tokenizer().save_pretrained(base)
    out = tmp_path / "run"
    argv = [
        "sft.py",
        "--model_name_or_path",
        str(base),
        "--output_dir",
        str(out),
        "--task",
        "sst2",
        "--num_test",
        "24",
        "--num_train",
        "16",
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--logging_steps",
        "1",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    sft.main()
    printed = capsys.readouterr().out
    results = json.loads((out / "sft_results.json").read_text())
    assert (out / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run-lora-baseline" / "adapter_model.safetensors").is_file()
    assert results["reload_max_abs_logit_difference"] == 0.0
    assert results["lora_baseline"]["reload_max_abs_logit_difference"] == 0.0
    before = [c == "1" for c in results["correct_before"]]
    after = [c == "1" for c in results["correct_after"]]
    assert len(before) == len(after) == 24 and results["accuracy_after"] == sum(after) / 24
    expected = paired_bootstrap(after, before)
    assert results["paired_differences"]["mola - base model"]["difference"] == pytest.approx(expected.difference)
    assert f"mola - base model: {expected}" in printed
    assert "LoRA - base model:" in printed and "mola - LoRA:" in printed
