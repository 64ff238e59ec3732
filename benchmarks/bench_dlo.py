"""DLO side by side on a SmolLM2-135M-shaped model (30 layers -> 37 with interleaved expansion).

Inference: the expanded model's forward (prefill: every prompt token through every layer, logits of the last
position only, as ``generate`` does) with the MLPs executing a fixed fraction 1.0 / 0.9 / 0.7 / 0.5 of the tokens
(``inference_selection='capacity'``: top fraction by router score per layer, the budget is exact), against the
unexpanded base model, dense expansion (LLaMA-Pro: the same 37 layers, no routing) and plain peft LoRA (r=8, all
projections, unmerged). An A/A line (the base against a second copy) shows the timing noise.

Training step (forward + LM loss + router loss + backward + AdamW): DLO (new layers trained fully + routers, capacity
0.9, cos_global) against dense expansion (same new layers, no routing), plain peft LoRA r=8 and an A/A LoRA.

    python benchmarks/bench_dlo.py [--repeats 12] [--batch-size 4] [--seq-len 128] [--train-repeats 8]
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from common import (
    ALL_PROJECTIONS,
    interleaved_timings,
    paired_ratio,
    report_timings,
    smollm2_shaped_model,
    token_batch,
    train_step_fn,
)
from peft import LoraConfig, get_peft_model

import peft_depth
from peft_depth import DLOConfig

FRACTIONS = (1.0, 0.9, 0.7, 0.5)


def build(variant: str, base: torch.nn.Module, copy_base: bool = True):
    model = copy.deepcopy(base) if copy_base else base
    if variant.startswith("base"):
        return model
    if variant.startswith("lora"):
        config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=ALL_PROJECTIONS)
    elif variant == "dense_expansion":
        config = DLOConfig(routed_layers="none")
    elif variant == "dlo":
        config = DLOConfig(
            routed_layers="all", capacity=0.9, capacity_annealing_steps=0, inference_selection="capacity"
        )
    else:
        raise ValueError(variant)
    config.task_type = "CAUSAL_LM"
    return get_peft_model(model, config)


def randomise_routers(model, seed: int = 0) -> None:
    # trained routers disagree between tokens; random ones make the capacity selection pick real subsets
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for router in model.base_model.dlo_routers["default"].values():
            router.weight.copy_(torch.randn(router.weight.shape, generator=generator))


def forward_fn(model, inputs, fraction: float | None = None):
    def forward():
        if fraction is not None:
            model.peft_config["default"].inference_capacity = fraction
        with torch.no_grad():
            model(**inputs, logits_to_keep=1)

    return forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--train-repeats", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--train-batch-size", type=int, default=2)
    parser.add_argument("--train-seq-len", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")

    base = smollm2_shaped_model(args.num_layers).eval()
    inputs = {k: v for k, v in token_batch(args.batch_size, args.seq_len).items() if k != "labels"}

    # ------------------------------------------------------------------ inference forward
    models = {name: build(name, base).eval() for name in ("base", "base_AA", "lora_r8", "dense_expansion", "dlo")}
    dlo = models["dlo"]
    randomise_routers(dlo)
    print(
        f"layers: base {base.config.num_hidden_layers}, expanded {dlo.base_model.model.config.num_hidden_layers}; "
        f"prefill batch {args.batch_size}x{args.seq_len}, logits of the last position"
    )
    variants = {name: forward_fn(model, inputs) for name, model in models.items() if name != "dlo"}
    for fraction in FRACTIONS:
        variants[f"dlo_exec_{fraction:.1f}"] = forward_fn(dlo, inputs, fraction)
    executed = {}
    for fraction in FRACTIONS:  # check the budget really is what the label says
        variants[f"dlo_exec_{fraction:.1f}"]()
        executed[fraction] = peft_depth.routing_stats(dlo)["dlo"]["default"]["executed_fraction"]
    print("measured executed fraction per label:", {f: round(e, 4) for f, e in executed.items()})
    times = interleaved_timings(variants, repeats=args.repeats)
    report_timings(times, "base", f"inference forward ({args.repeats} interleaved repeats, median of paired ratios)")
    print("\nratio to the expanded model at executed fraction 1.0 (paired):")
    for fraction in FRACTIONS:
        name = f"dlo_exec_{fraction:.1f}"
        print(f"  {name:<16} {paired_ratio(times, name, 'dlo_exec_1.0'):.3f}x")
    print(f"  {'dense_expansion':<16} {paired_ratio(times, 'dense_expansion', 'dlo_exec_1.0'):.3f}x")
    print(f"  A/A base_AA / base: {paired_ratio(times, 'base_AA', 'base'):.3f}x")
    medians = [statistics.median(times[f"dlo_exec_{f:.1f}"]) for f in FRACTIONS]
    monotone = all(a > b for a, b in zip(medians, medians[1:]))
    print(f"time falls with the executed fraction: {monotone}")
    del models, variants, dlo

    if args.skip_training:
        return
    # ------------------------------------------------------------------ training step
    batch = token_batch(args.train_batch_size, args.train_seq_len)
    train_models = {name: build(name, base) for name in ("lora_r8", "lora_r8_AA", "dense_expansion", "dlo")}
    for name, model in train_models.items():
        trainable, total = model.get_nb_trainable_parameters()
        print(f"{name:<16} trainable {trainable:>11,} ({100 * trainable / total:.2f}%)")
    steps = {name: train_step_fn(model, batch, lr=1e-5) for name, model in train_models.items()}
    times = interleaved_timings(steps, repeats=args.train_repeats, warmup=1)
    report_timings(
        times,
        "lora_r8",
        f"training step, batch {args.train_batch_size}x{args.train_seq_len} ({args.train_repeats} interleaved repeats)",
    )
    print(f"  dlo / dense_expansion (paired): {paired_ratio(times, 'dlo', 'dense_expansion'):.3f}x")


if __name__ == "__main__":
    main()
