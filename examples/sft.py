"""Supervised fine-tuning with a depth-aware adapter (MoLA, MoLEx, MoD, DLO) or plain LoRA, the TRL way.

With no arguments it runs the main job offline on CPU: SmolLM2-135M-Instruct + MoLA (experts 2-4-6-8 over the four
quarters of the layer stack, top-2, r=8) fine-tuned on SST-2 for a few steps; it scores the base model on held-out
rows, saves the adapter (safetensors) to the output directory, reloads it with ``PeftModel.from_pretrained`` and scores
the reloaded model, then does the same for plain peft LoRA (same targets, rank, steps and learning rate; skip with
``--lora_baseline false``), and ends with the three accuracies and paired-bootstrap intervals of the differences::

    python examples/sft.py
    python examples/sft.py --peft_method molex --routing batch_vote --max_steps 50
    python examples/sft.py --peft_method mola --expert_pattern 8,6,4,2 --top_k 2 --lora_r 8
    python examples/sft.py --peft_method dlo --adapter_kwargs '{"capacity": 0.8}'
    python examples/sft.py --peft_method lora          # the plain peft LoRA baseline, same targets

Multi-process (2 CPU processes over gloo)::

    OMP_NUM_THREADS=1 accelerate launch --config_file examples/accelerate_cpu_2proc.yaml examples/sft.py \
        --sync_routing_stats --per_device_train_batch_size 4

Arguments follow TRL's scripts: ``ModelConfig`` (``--model_name_or_path``, ``--lora_r``, ``--lora_alpha``,
``--lora_dropout``, ``--lora_target_modules``), the script and method options below, and every ``DepthSFTConfig`` /
``SFTConfig`` / ``TrainingArguments`` field (``--max_steps``, ``--learning_rate``, ``--routing_loss_coef``, ...).
``--config file.yaml`` works too. Lists take commas: ``--expert_pattern 2,4,6,8``.

Embedded defaults and why (each can be overridden on the command line):
- ``bf16`` is on only with a CUDA GPU that supports it. SFTConfig turns bf16 on by default, but on CPU bf16 autocast
  is slower than fp32 for a model this size and loses the small differences the routers learn from.
- ``gradient_checkpointing`` is off: SFTConfig turns it on to save memory, but a 135M model needs ~1 GB in fp32, and
  recomputing every block costs about a third more time. Every method is exact under checkpointing
  (``tests/test_trainer.py``) if you turn it on.
- ``use_cpu`` is on when there is no CUDA device, so processes started by ``accelerate launch`` form a gloo group.
- 40 steps of 8 examples at lr 1e-3: the answer format and a measurable change, not a converged fine-tune (raise
  ``--max_steps``). Measured CPU time on one core (torch threads = 1): a MoLA training step on 8 ARC examples ~7 s,
  scoring 32 held-out examples ~8 s; so the default run (method and LoRA baseline) is about
  2 × 40 × 7 s + 3 × 50 s + loading ≈ 12 min of one core, less on two.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import ModelConfig, TrlParser  # noqa: E402

import peft_depth  # noqa: E402  (registers the methods with peft)
import peft_depth.assets  # noqa: E402
from peft_depth import DepthSFTConfig, DepthSFTTrainer  # noqa: E402
from peft_depth.analysis import paired_bootstrap  # noqa: E402
from peft_depth.tasks import (  # noqa: E402
    fit_examples,
    load_task,
    multiple_choice_predictions,
    to_sft_dataset,
    train_test_split,
)

SMOLLM2 = "smollm2"  # resolved to the offline SmolLM2-135M-Instruct directory (peft_depth.assets.smollm2_path)


@dataclass
class ScriptArguments:
    task: str = field(
        default="sst2",
        metadata={
            "help": "Task from peft_depth.tasks (arc_easy, arc_challenge, boolq, piqa, sst2, sciq). Default sst2: of the "
            "pool, the task where the main job's few minutes of training beat both the base model (with its best "
            "prompt) and the majority class (benchmarks/results/main_job_tasks.md)."
        },
    )
    num_test: int = field(
        default=500,
        metadata={"help": "Held-out examples for the accuracy before/after (SST-2: 500 of 872, the rest trains)."},
    )
    num_train: int | None = field(default=None, metadata={"help": "Cap on training examples (default: all others)."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the train/test split."})
    eval_batch_size: int = field(default=16, metadata={"help": "Batch size of the accuracy evaluation."})
    skip_accuracy: bool = field(default=False, metadata={"help": "Skip the accuracy evaluations (smoke runs)."})
    lora_baseline: bool = field(
        default=True,
        metadata={
            "help": "Also train plain peft LoRA (--lora_r and --lora_alpha, on the method's LoRA targets, or every "
            "linear layer for a method without LoRA; same steps and learning rate) and print base, method and LoRA "
            "held-out accuracy with paired-bootstrap intervals. --lora_baseline false skips it."
        },
    )


@dataclass
class MethodArguments:
    """Which adapter, and its options. Unset options keep the method's config defaults: MoLA and MoLEx take the LoRA
    fields of ModelConfig (--lora_r, ...); MoD and DLO, whose LoRA is optional and off by default, take them only from
    --adapter_kwargs (e.g. '{"r": 8}')."""

    peft_method: str = field(default="mola", metadata={"help": "mola, molex, mod, dlo or lora."})
    # MoLA
    # Unset by default, so that MoLAConfig's own default (the paper's ▽, 2,4,6,8) applies and an explicit
    # --num_experts is never mistaken for a clash with an embedded pattern.
    expert_pattern: str | None = field(
        default=None,
        metadata={"help": "MoLA experts per group of layers, e.g. 8,6,4,2 (default: MoLAConfig's ▽ 2,4,6,8)."},
    )
    num_experts: str | None = field(
        default=None, metadata={"help": "MoLA experts: one int or a comma list per layer."}
    )
    top_k: str | None = field(default=None, metadata={"help": "MoLA experts per token: one int or a comma list."})
    balance_loss_coef: float | None = field(default=None, metadata={"help": "MoLA/MoLEx balance-loss coefficient."})
    # MoLEx
    molex_layers: str | None = field(default=None, metadata={"help": "MoLEx: comma list of mixing layers."})
    routing: str | None = field(default=None, metadata={"help": "MoLEx routing: batch_vote, sequence or token."})
    alpha: float | None = field(default=None, metadata={"help": "MoLEx mixing weight of the layer's own block."})
    learn_alpha: bool | None = field(default=None, metadata={"help": "MoLEx: learn alpha."})
    gate_type: str | None = field(default=None, metadata={"help": "MoLEx gate: linear or cosine."})
    # MoD
    num_late_layers: int | None = field(default=None, metadata={"help": "MoD: K late layers in the ensemble."})
    router_granularity: str | None = field(default=None, metadata={"help": "MoD router: token, sequence, static."})
    mix_space: str | None = field(default=None, metadata={"help": "MoD: logits (fused-head friendly) or log_probs."})
    # DLO
    expansion: str | None = field(default=None, metadata={"help": "DLO: interleave, stack, or a comma list."})
    expand_every: int | None = field(default=None, metadata={"help": "DLO: one new layer after every N layers."})
    routed_layers: str | None = field(default=None, metadata={"help": "DLO: all or new."})
    capacity: float | None = field(default=None, metadata={"help": "DLO: target training capacity."})
    capacity_annealing_steps: int | None = field(default=None, metadata={"help": "DLO: steps from 1.0 to capacity."})
    # anything else
    adapter_kwargs: str | None = field(
        default=None, metadata={"help": 'JSON object of further adapter-config fields, e.g. \'{"loss_type": "cos"}\'.'}
    )


# Options given as comma lists on the command line: name -> whether a single value stays a scalar.
_INT_LISTS = {"expert_pattern": False, "num_experts": True, "top_k": True, "molex_layers": False}


def _parse_int_list(name: str, text: Any, scalar_if_single: bool) -> int | list[int]:
    """A comma list from the command line, or an int / a list of ints from a --config YAML."""
    parts = text if isinstance(text, (list, tuple)) else str(text).replace(" ", "").split(",")
    try:
        values = [_strict_int(part) for part in parts if part != ""]
    except (TypeError, ValueError):
        raise ValueError(f"`--{name}` takes integers separated by commas, e.g. 2,4,6,8; got {text!r}.") from None
    if not values:
        raise ValueError(f"`--{name}` is empty.")
    return values[0] if scalar_if_single and len(values) == 1 else values


def _strict_int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(value)
    return int(value)


def _adapter_kwargs(value: Any) -> dict[str, Any]:
    """``--adapter_kwargs``: a JSON object on the command line, or a mapping in a --config YAML."""
    if isinstance(value, dict):
        return dict(value)
    try:
        extra = json.loads(value)
    except (TypeError, json.JSONDecodeError) as error:
        raise ValueError(f"`--adapter_kwargs` must be a JSON object, e.g. '{{\"capacity\": 0.8}}': {error}.") from None
    if not isinstance(extra, dict):
        raise ValueError(f"`--adapter_kwargs` must be a JSON object, e.g. '{{\"capacity\": 0.8}}'; got {value!r}.")
    return extra


#: Methods whose LoRA is an option (none by default): the script's LoRA defaults (r=8, alpha 16) are not theirs, so
#: they take LoRA fields only from --adapter_kwargs (e.g. '{"r": 8}'), and otherwise keep their own defaults.
_LORA_IS_OPTIONAL = ("mod", "dlo")


def _method_config_class(method: str):
    import peft_depth.tuners as tuners  # noqa: F401

    if method == "mola":
        from peft_depth.tuners.mola import MoLAConfig as cls
    elif method == "molex":
        from peft_depth.tuners.molex import MoLExConfig as cls
    elif method == "mod":
        from peft_depth.tuners.mod import MoDConfig as cls
    elif method == "dlo":
        from peft_depth.tuners.dlo import DLOConfig as cls
    else:
        raise ValueError(f"`--peft_method` must be one of mola, molex, mod, dlo, lora; got {method!r}.")
    return cls


def build_peft_config(method_args: MethodArguments, model_args: ModelConfig):
    """The adapter config from the command line: ModelConfig's LoRA fields plus the method's own options."""
    method = method_args.peft_method
    if method == "lora":
        ignored = sorted(_given_method_options(method_args))
        if ignored:
            raise ValueError(
                f"`--peft_method lora` takes ModelConfig's LoRA fields (--lora_r, --lora_alpha, --lora_dropout, "
                f"--lora_target_modules), not the depth methods' options {ignored}."
            )
        # the seven projections, the same targets MoLA's default uses
        return lora_baseline_config(model_args)
    cls = _method_config_class(method)
    allowed = {f.name for f in fields(cls)}
    kwargs: dict[str, Any] = {"task_type": "CAUSAL_LM"}
    if method not in _LORA_IS_OPTIONAL:
        for name, value in (("r", model_args.lora_r), ("lora_alpha", model_args.lora_alpha)):
            if name in allowed:
                kwargs[name] = value
        if "lora_dropout" in allowed:
            kwargs["lora_dropout"] = model_args.lora_dropout
    if model_args.lora_target_modules:
        kwargs["target_modules"] = model_args.lora_target_modules
    kwargs.update(_given_method_options(method_args))
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"{cls.__name__} has no option(s) {unknown}; its options: {sorted(allowed)}.")
    return cls(**kwargs)


def _given_method_options(method_args: MethodArguments) -> dict[str, Any]:
    """The method options set on the command line (or in --config), parsed."""
    given: dict[str, Any] = {}
    for f in fields(MethodArguments):
        if f.name in ("peft_method", "adapter_kwargs"):
            continue
        value = getattr(method_args, f.name)
        if value is None or value == "":
            continue
        if f.name in _INT_LISTS:
            value = _parse_int_list(f.name, value, _INT_LISTS[f.name])
        elif f.name == "expansion" and value not in ("interleave", "stack"):
            value = _parse_int_list(f.name, value, False)
        given[f.name] = value
    if method_args.adapter_kwargs:
        given.update(_adapter_kwargs(method_args.adapter_kwargs))
    return given


def lora_baseline_config(model_args: ModelConfig, method_targets: Any = None) -> LoraConfig:
    """Plain peft LoRA at the script's rank and alpha, on the method's LoRA targets when it has LoRA (so the two
    adapt the same linears), else on ``--lora_target_modules`` or every linear layer."""
    targets = sorted(method_targets) if isinstance(method_targets, (set, list, tuple)) else method_targets
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=targets or model_args.lora_target_modules or "all-linear",
    )


EMBEDDED_DEFAULTS = dict(
    model_name_or_path=SMOLLM2,
    output_dir="outputs/sft-smollm2",
    max_steps=40,
    per_device_train_batch_size=8,
    gradient_accumulation_steps=1,
    learning_rate=1e-3,
    lr_scheduler_type="linear",
    warmup_steps=0,
    logging_steps=5,
    save_strategy="no",
    report_to="none",
    max_length=256,
    gradient_checkpointing=False,
    bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
    # explicit, so that processes started by `accelerate launch` on a CPU machine form a gloo group
    use_cpu=not torch.cuda.is_available(),
    lora_r=8,
    lora_alpha=16,
    lora_dropout=0.05,
    seed=0,
    dataloader_num_workers=0,
)


def correctness(model, tokenizer, examples, args: ScriptArguments) -> list[bool]:
    """Per held-out example, whether the model's highest-scoring choice is the answer."""
    predictions = multiple_choice_predictions(model, tokenizer, examples, batch_size=args.eval_batch_size)
    return [int(p) == ex.label for p, ex in zip(predictions, examples)]


def _accuracy(correct: list[bool]) -> float:
    return sum(correct) / len(correct)


def parse_args(argv: list[str] | None = None):
    """``(script_args, method_args, model_args, training_args)`` from the command line over the embedded defaults."""
    parser = TrlParser((ScriptArguments, MethodArguments, ModelConfig, DepthSFTConfig))
    parser.set_defaults(**EMBEDDED_DEFAULTS)
    return parser.parse_args_and_config(args=argv)


def main() -> None:
    script_args, method_args, model_args, training_args = parse_args()
    state = PartialState(cpu=training_args.use_cpu)
    if model_args.model_name_or_path == SMOLLM2:
        if state.is_main_process:
            model_args.model_name_or_path = peft_depth.assets.smollm2_path()  # converts once (GGUF -> fp32)
        state.wait_for_everyone()
        model_args.model_name_or_path = peft_depth.assets.smollm2_path()
    peft_config = build_peft_config(method_args, model_args)
    if script_args.lora_baseline and method_args.peft_method != "lora":
        lora_baseline_config(model_args)  # a baseline that cannot be built fails now, not after the method's run

    examples = load_task(script_args.task)
    train_examples, test_examples = train_test_split(
        examples, script_args.num_test, seed=script_args.split_seed, num_train=script_args.num_train
    )
    dtype = model_args.dtype if model_args.dtype not in (None, "auto") else torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    # a row longer than max_length loses its answer to TRL's truncation and trains on nothing: leave it out
    fitting, _ = fit_examples(train_examples, tokenizer, training_args.max_length)
    if len(fitting) < len(train_examples) and state.is_main_process:
        print(
            f"{len(train_examples) - len(fitting)} of {len(train_examples)} training rows are longer than max_length "
            f"{training_args.max_length} tokens with their answer and are left out.",
            flush=True,
        )
    train_dataset = to_sft_dataset(fitting)

    def load_base():
        return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, dtype=dtype)

    results: dict[str, Any] = {"method": method_args.peft_method, "task": script_args.task}
    # the adapter's checks against the real model (layer indices, target names, ...) before minutes of base scoring
    get_peft_model(load_base(), copy.deepcopy(peft_config))
    if not script_args.skip_accuracy and state.is_main_process:
        start = time.perf_counter()
        base_correct = correctness(load_base(), tokenizer, test_examples, script_args)
        results["accuracy_before"] = _accuracy(base_correct)
        results["correct_before"] = "".join("1" if c else "0" for c in base_correct)
        print(
            f"[before] {script_args.task} held-out accuracy ({len(test_examples)} examples): "
            f"{results['accuracy_before']:.4f}  ({time.perf_counter() - start:.0f}s)",
            flush=True,
        )
    state.wait_for_everyone()

    def train_and_score(config, output_dir: str, label: str) -> dict[str, Any]:
        """Train ``config`` from the base, save to ``output_dir``, reload it and score the reloaded adapter."""
        run: dict[str, Any] = {}
        training_args.output_dir = output_dir
        trainer = DepthSFTTrainer(
            model=load_base(),
            args=training_args,
            train_dataset=train_dataset,
            processing_class=tokenizer,
            peft_config=config,
        )
        if state.is_main_process:
            trainer.model.print_trainable_parameters()
        adapter_config = trainer.model.peft_config["default"]
        run["lora_targets"] = (
            sorted(adapter_config.target_modules)
            if getattr(adapter_config, "r", 0) and isinstance(adapter_config.target_modules, (set, list, tuple))
            else None
        )
        start = time.perf_counter()
        train_output = trainer.train()
        run["train_seconds"] = time.perf_counter() - start
        run["train_loss"] = train_output.training_loss
        run["log_history"] = [e for e in trainer.state.log_history if "loss" in e]
        trainer.save_model(output_dir)
        state.wait_for_everyone()
        if not state.is_main_process:
            return run
        saved = sorted(p.name for p in Path(output_dir).iterdir())
        print(f"saved adapter to {output_dir}: {saved}", flush=True)
        reloaded = PeftModel.from_pretrained(load_base(), output_dir).eval()
        trained = trainer.model.eval()
        probe = tokenizer([test_examples[0].prompt], return_tensors="pt")
        with torch.no_grad():
            difference = (
                (reloaded(**probe).logits - trained(**probe.to(trained.device)).logits.to(reloaded.device)).abs().max()
            ).item()
        run["reload_max_abs_logit_difference"] = difference
        print(f"reloaded adapter vs trained model: max |Δlogit| = {difference:.2e}", flush=True)
        if not script_args.skip_accuracy:
            start = time.perf_counter()
            correct = correctness(reloaded, tokenizer, test_examples, script_args)
            run["accuracy_after"] = _accuracy(correct)
            run["correct_after"] = "".join("1" if c else "0" for c in correct)
            print(
                f"[after]  {script_args.task} held-out accuracy of the reloaded {label} adapter: "
                f"{run['accuracy_after']:.4f}  ({time.perf_counter() - start:.0f}s)",
                flush=True,
            )
        return run

    results.update(train_and_score(peft_config, training_args.output_dir, method_args.peft_method))
    output_dir = training_args.output_dir
    if script_args.lora_baseline and method_args.peft_method != "lora":
        # the same linears as the method's LoRA (MoLEx: q/v by default); a method without LoRA gets every linear
        lora_config = lora_baseline_config(model_args, results["lora_targets"])
        results["lora_baseline"] = train_and_score(lora_config, output_dir.rstrip("/") + "-lora-baseline", "LoRA")
        training_args.output_dir = output_dir
    if state.is_main_process:
        if not script_args.skip_accuracy:
            print_comparison(results, method_args.peft_method)
        with open(Path(output_dir) / "sft_results.json", "w") as handle:
            json.dump(results, handle, indent=2)
        summary = {
            k: v for k, v in results.items() if k not in ("log_history", "lora_baseline") and "correct" not in k
        }
        print(json.dumps(summary, indent=2), flush=True)


def print_comparison(results: dict[str, Any], method: str) -> None:
    """Base, method and LoRA held-out accuracy, and the paired differences with 95% bootstrap intervals."""
    rows = {"base model": results["correct_before"], method: results["correct_after"]}
    if "lora_baseline" in results:
        rows["LoRA"] = results["lora_baseline"]["correct_after"]
    correct = {name: [c == "1" for c in text] for name, text in rows.items()}
    print(f"\n=== {results['task']}: held-out accuracy ({len(correct['base model'])} examples) ===", flush=True)
    if "lora_baseline" in results:
        targets = results["lora_baseline"]["lora_targets"]
        same = results["lora_targets"] == targets
        print(
            f"LoRA baseline on {', '.join(targets or ['every linear'])}"
            + (" (the method's LoRA targets)" if same else f" ({method} has no LoRA on these: not a matched budget)"),
            flush=True,
        )
    for name, values in correct.items():
        print(f"{name:>12}: {_accuracy(values):.4f}", flush=True)
    pairs = [(method, "base model")] + ([("LoRA", "base model"), (method, "LoRA")] if "LoRA" in correct else [])
    results["paired_differences"] = {}
    for a, b in pairs:
        difference = paired_bootstrap(correct[a], correct[b])
        results["paired_differences"][f"{a} - {b}"] = difference.__dict__
        print(f"{a} - {b}: {difference}", flush=True)


if __name__ == "__main__":
    main()
