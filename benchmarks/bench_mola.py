"""MoLA vs plain peft LoRA, side by side on a SmolLM2-135M-shaped model.

Training step (forward + LM loss + balance loss + backward + AdamW step) for LoRA r=8 and MoLA (8 experts, top-2,
r=8), all seven projections, same dropout; MoLA with its default dropout mask per expert and with one mask shared by
a token's experts (`expert_dropout="shared"`); an A/A line (LoRA against a second LoRA); peak memory per variant in
fresh processes; batch-1 greedy decode latency of MoLA against LoRA merged into the base (MoLA cannot merge).

    python benchmarks/bench_mola.py [--repeats 12] [--batch-size 4] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import copy

import torch
from common import (
    ALL_PROJECTIONS,
    interleaved_timings,
    peak_rss_mb_in_subprocess,
    print_peak_rss_json,
    report_timings,
    reset_peak_rss,
    smollm2_shaped_model,
    token_batch,
    train_step_fn,
)
from peft import LoraConfig, get_peft_model

from peft_depth import MoLAConfig

R, ALPHA, DROPOUT = 8, 16, 0.05


def build(variant: str, base: torch.nn.Module, copy_base: bool = True):
    model = copy.deepcopy(base) if copy_base else base
    if variant.startswith("lora"):
        config = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=ALL_PROJECTIONS)
    elif variant in ("mola_e8_k2", "mola_e8_k2_shared"):
        config = MoLAConfig(
            r=R,
            lora_alpha=ALPHA,
            lora_dropout=DROPOUT,
            target_modules=ALL_PROJECTIONS,
            num_experts=8,
            top_k=2,
            expert_dropout="shared" if variant.endswith("shared") else "per_expert",
        )
    elif variant == "mola_2468_k2":
        config = MoLAConfig(
            r=R,
            lora_alpha=ALPHA,
            lora_dropout=DROPOUT,
            target_modules=ALL_PROJECTIONS,
            expert_pattern=[2, 4, 6, 8],
            top_k=2,
        )
    else:
        raise ValueError(variant)
    config.task_type = "CAUSAL_LM"
    model = get_peft_model(model, config)
    model.train()
    return model


def decode_fn(model, prompt, new_tokens):
    def decode():
        with torch.no_grad():
            model.generate(
                **prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True
            )

    return decode


def memory_child(variant: str, args) -> None:
    torch.set_num_threads(args.threads)
    base = smollm2_shaped_model(args.num_layers)
    model = build(variant, base)
    del base
    step = train_step_fn(model, token_batch(args.batch_size, args.seq_len))
    baseline = reset_peak_rss()
    for _ in range(3):
        step()
    print_peak_rss_json(baseline)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=30)
    parser.add_argument("--decode-repeats", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per decode measurement")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args)
        return
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch_size}x{args.seq_len}")

    base = smollm2_shaped_model(args.num_layers)
    batch = token_batch(args.batch_size, args.seq_len)
    variants = ["lora_r8", "lora_r8_AA", "mola_e8_k2", "mola_e8_k2_shared", "mola_2468_k2"]
    models = {name: build(name, base) for name in variants}
    for name, model in models.items():
        trainable, total = model.get_nb_trainable_parameters()
        print(f"{name:<14} trainable {trainable:>10,} ({100 * trainable / total:.2f}%)")
    steps = {name: train_step_fn(model, batch) for name, model in models.items()}
    times = interleaved_timings(steps, repeats=args.repeats)
    report_timings(times, "lora_r8", f"training step ({args.repeats} interleaved repeats, median of paired ratios)")

    print("\npeak RSS during 3 training steps in a fresh process (model included), and growth over the model")
    peaks = {
        name: peak_rss_mb_in_subprocess("bench_mola", name, _child_args(args))
        for name in ("lora_r8", "mola_e8_k2", "mola_e8_k2_shared")
    }
    ref = peaks["lora_r8"]
    for name, peak in peaks.items():
        growth, ref_growth = peak["peak_rss_mb"] - peak["baseline_mb"], ref["peak_rss_mb"] - ref["baseline_mb"]
        print(
            f"{name:<14} peak {peak['peak_rss_mb']:>7.0f} MB (ratio {peak['peak_rss_mb'] / ref['peak_rss_mb']:.3f}x)"
            f"  growth {growth:>6.0f} MB (ratio {growth / ref_growth:.3f}x)"
        )

    # Inference: MoLA must stay unmerged; LoRA's honest inference baseline is merged into the base weights.
    merged = build("lora_r8", base).merge_and_unload().eval()
    mola = models["mola_e8_k2"].eval()
    unmerged_lora = models["lora_r8"].eval()
    prompt = {k: v[:1, :16] for k, v in token_batch(1, 16).items() if k != "labels"}
    new_tokens = args.new_tokens
    decode = {
        "lora_merged": decode_fn(merged, prompt, new_tokens),
        "lora_unmerged": decode_fn(unmerged_lora, prompt, new_tokens),
        "mola_e8_k2": decode_fn(mola, prompt, new_tokens),
    }
    times = interleaved_timings(decode, repeats=args.decode_repeats, warmup=1)
    rows = report_timings(times, "lora_merged", f"batch-1 greedy decode, 16-token prompt + {new_tokens} new tokens")
    for name, row in rows.items():
        print(f"{name:<14} {1000 * row['median_s'] / new_tokens:.1f} ms/token")


def _child_args(args) -> list[str]:
    return [
        "--batch-size",
        str(args.batch_size),
        "--seq-len",
        str(args.seq_len),
        "--num-layers",
        str(args.num_layers),
        "--threads",
        str(args.threads),
    ]


if __name__ == "__main__":
    main()
