"""MoD vs plain peft LoRA, side by side on a SmolLM2-135M-shaped model (vocab 49,152).

Variants (all with LoRA r=8 on the seven projections, same dropout, so the only difference is MoD's ensemble):

- ``lora_r8`` and ``lora_r8_AA``: plain peft LoRA twice (the A/A line shows the timing noise);
- ``mod_k4_lora``: MoD with K=4 late layers, token router, full distillation (every label position);
- ``mod_k4_f025_lora``: the same with ``distill_fraction=0.25``;
- ``mod_k4_alone``: MoD alone (no LoRA), for the parameter count.

Timed: a training step as the trainer runs it (forward with labels, LM loss + ``aux_losses``, backward, AdamW step),
and an inference forward (eval, no labels, no grad: scoring / prefill; MoD skips the distillation there). Variants
run interleaved repeat by repeat in shuffled order; ratios are medians of per-repeat ratios to ``lora_r8``.

Peak memory: each variant runs two training steps in a fresh process; the peak-RSS counter is reset just before the
first step (``/proc/self/clear_refs`` 5), and we report the peak RSS during the steps (``VmHWM``) and the training
increment (that peak minus the RSS just before the first step: activations, logits, gradients, optimizer state and
MoD's distillation chunks, without the weights every variant shares). CPU has no allocator
peak counter like ``torch.cuda.max_memory_allocated``, and a process's peak cannot be split between variants run in
it, hence one process per variant.

    python benchmarks/bench_mod.py [--repeats 10] [--batch-size 4] [--seq-len 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys

import torch
from common import (
    ALL_PROJECTIONS,
    interleaved_timings,
    print_peak_rss_json,
    report_timings,
    reset_peak_rss,
    smollm2_shaped_model,
    token_batch,
    train_step_fn,
)
from peft import LoraConfig, get_peft_model

from peft_depth import MoDConfig

R, ALPHA, DROPOUT = 8, 16, 0.05
ALL_VARIANTS = ["lora_r8", "lora_r8_AA", "mod_k4_lora", "mod_k4_f025_lora", "mod_k4_alone"]
TRAIN_VARIANTS = ["lora_r8", "lora_r8_AA", "mod_k4_lora", "mod_k4_f025_lora"]
INFER_VARIANTS = ["lora_r8", "lora_r8_AA", "mod_k4_lora"]
MEMORY_VARIANTS = ["lora_r8", "mod_k4_lora", "mod_k4_f025_lora"]


def build(variant: str, base: torch.nn.Module, copy_base: bool = True):
    model = copy.deepcopy(base) if copy_base else base
    lora = dict(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=ALL_PROJECTIONS)
    if variant.startswith("lora"):
        config = LoraConfig(**lora)
    elif variant == "mod_k4_lora":
        config = MoDConfig(num_late_layers=4, **lora)
    elif variant == "mod_k4_f025_lora":
        config = MoDConfig(num_late_layers=4, distill_fraction=0.25, **lora)
    elif variant == "mod_k4_alone":
        config = MoDConfig(num_late_layers=4)
    else:
        raise ValueError(variant)
    config.task_type = "CAUSAL_LM"
    return get_peft_model(model, config)


def forward_fn(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def forward():
        model.eval()
        with torch.no_grad():
            model(**inputs)

    return forward


def memory_child(variant: str, args) -> None:
    torch.set_num_threads(args.threads)
    model = build(variant, smollm2_shaped_model(args.num_layers), copy_base=False)
    step = train_step_fn(model, token_batch(args.batch_size, args.seq_len))
    baseline = reset_peak_rss()  # the peak afterwards is the training steps', not the model's construction
    for _ in range(2):
        step()
    print_peak_rss_json(baseline)


def measure_memory(variants: list[str], args) -> dict[str, dict[str, float]]:
    """Run one fresh process per variant, all at once (a process's own peak RSS does not depend on the others)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    procs = {
        name: subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--memory-child", name, *_child_args(args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        for name in variants
    }
    rows = {}
    for name, proc in procs.items():
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"memory child {name} failed with exit code {proc.returncode}")
        rows[name] = json.loads(out.strip().splitlines()[-1])
    return rows


def report_memory(rows: dict[str, dict[str, float]]) -> None:
    print("peak memory of a fresh process running 2 training steps (peak counter reset before the first step)")
    ref = rows["lora_r8"]
    ref_increment = ref["peak_rss_mb"] - ref["baseline_mb"]
    for name, row in rows.items():
        increment = row["peak_rss_mb"] - row["baseline_mb"]
        print(
            f"{name:<18} peak RSS {row['peak_rss_mb']:>7.0f} MB ({row['peak_rss_mb'] / ref['peak_rss_mb']:.3f}x)   "
            f"training increment {increment:>6.0f} MB ({increment / ref_increment:.3f}x)",
            flush=True,
        )


def _child_args(args) -> list[str]:
    return [
        "--batch-size", str(args.memory_batch_size), "--seq-len", str(args.memory_seq_len),
        "--num-layers", str(args.num_layers), "--threads", str(args.threads),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--infer-repeats", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-batch-size", type=int, default=4)
    parser.add_argument("--memory-seq-len", type=int, default=128)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args)
        return
    torch.set_num_threads(args.threads)
    if not args.skip_memory:  # first, before this process holds its own copies of the model
        print(f"memory: batch {args.memory_batch_size}x{args.memory_seq_len}, {args.num_layers} layers")
        report_memory(measure_memory(MEMORY_VARIANTS, args))
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch_size}x{args.seq_len}, "
        f"{args.num_layers} layers, vocab 49152"
    )
    base = smollm2_shaped_model(args.num_layers)
    batch = token_batch(args.batch_size, args.seq_len)
    models = {name: build(name, base) for name in ALL_VARIANTS}
    for name, model in models.items():
        trainable, total = model.get_nb_trainable_parameters()
        print(f"{name:<18} trainable {trainable:>10,} ({100 * trainable / total:.3f}%)", flush=True)
    del models["mod_k4_alone"]  # counted only: its step differs from mod_k4_lora by LoRA's cost, not MoD's

    infer = {name: forward_fn(models[name], batch) for name in INFER_VARIANTS}
    times = interleaved_timings(infer, repeats=args.infer_repeats)
    report_timings(times, "lora_r8", f"inference forward, eval, no labels ({args.infer_repeats} interleaved repeats)")

    steps = {name: train_step_fn(models[name], batch) for name in TRAIN_VARIANTS}
    times = interleaved_timings(steps, repeats=args.repeats)
    report_timings(
        times, "lora_r8", f"training step, LM loss + aux_losses ({args.repeats} interleaved repeats, paired medians)"
    )


if __name__ == "__main__":
    main()
