"""MoLEx vs plain peft LoRA, side by side on a SmolLM2-135M-shaped model.

Training step (forward + LM loss + MoLEx balance loss + backward + AdamW step) for LoRA r=8 on q_proj/v_proj (peft's
default targets, the paper's setting) and MoLEx with the same LoRA:

- ``molex_all_vote``: every layer mixes, ``batch_vote`` routing (the official algorithm), α = 0.95; the gates are
  biased so that each layer votes for another layer (every layer pays for two blocks, the worst case; a layer that
  votes for itself pays as much in training, where it runs a second time as in the official code);
- ``molex_half_vote``: the first half of the layers mix (the default for decoders, the paper's GPT-2 setting);
- ``molex_half_token``: the first half mix with per-token routing (each distinct chosen layer costs a full pass).

An A/A line (LoRA against a second LoRA) shows the timing noise. Ratios are medians of per-repeat ratios to
``lora_r8`` measured in the same round (interleaved, shuffled order).

    python benchmarks/bench_molex.py [--repeats 10] [--batch-size 4] [--seq-len 128] [--num-layers 30]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from common import interleaved_timings, report_timings, smollm2_shaped_model, token_batch, train_step_fn
from peft import LoraConfig, get_peft_model

import peft_depth
from peft_depth import MoLExConfig

R, ALPHA, DROPOUT = 8, 16, 0.05
TARGETS = ["q_proj", "v_proj"]


def build(variant: str, base: torch.nn.Module, num_layers: int, copy_base: bool = True):
    model = copy.deepcopy(base) if copy_base else base
    common = dict(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=TARGETS)
    if variant.startswith("lora"):
        config = LoraConfig(**common)
    elif variant == "molex_all_vote":
        # per-layer gates so that every layer can be made to mix (see force_mixing)
        config = MoLExConfig(**common, molex_layers=list(range(num_layers)), routing="batch_vote", shared_gate=False)
    elif variant == "molex_half_vote":
        config = MoLExConfig(**common, routing="batch_vote")
    elif variant == "molex_half_token":
        config = MoLExConfig(**common, routing="token")
    else:
        raise ValueError(variant)
    config.task_type = "CAUSAL_LM"
    model = get_peft_model(model, config)
    if variant == "molex_all_vote":
        force_mixing(model, num_layers)
    model.train()
    return model


def force_mixing(model, num_layers: int) -> None:
    """Bias layer i's gate towards layer (i+1) mod L, so that every layer pays for a second block (the worst case).

    With a random gate the vote lands on the layer itself about once in L layers, which would flatter the timing.
    """
    with torch.no_grad():
        for key, gate in model.base_model.molex_gate["default"].items():
            index = int(key.removeprefix("layer"))
            gate.proj.weight.zero_()
            gate.proj.bias.fill_(0.0)
            gate.proj.bias[(index + 1) % num_layers] = 10.0


def expert_passes(model) -> float:
    """Mean number of extra block passes per MoLEx layer in the last (training) forward: the distinct chosen layers,
    the layer itself included where it runs a second time (``self_choice_second_pass``, as the official code)."""
    rows = peft_depth.routing_stats(model).get("molex", {}).get("default", [])
    if not rows:
        return 0.0
    second_pass = model.peft_config["default"].self_choice_second_pass
    extra = []
    for row in rows:
        chosen = row["chosen"] if isinstance(row["chosen"], list) else [row["chosen"]]
        extra.append(len({j for j in chosen if second_pass or j != row["layer"]}))
    return statistics.mean(extra)


def _announce(name, fn):
    def run():
        start = time.perf_counter()
        fn()
        print(f"  {name}: {time.perf_counter() - start:.2f}s", flush=True)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default="lora_r8,lora_r8_AA,molex_all_vote,molex_half_vote,molex_half_token")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch_size}x{args.seq_len}, "
        f"{args.num_layers} layers, LoRA r={R} on {TARGETS}"
    )
    base = smollm2_shaped_model(args.num_layers)
    batch = token_batch(args.batch_size, args.seq_len)
    variants = args.variants.split(",")
    models = {name: build(name, base, args.num_layers) for name in variants}
    del base
    steps = {name: train_step_fn(model, batch) for name, model in models.items()}
    times = interleaved_timings(
        {name: _announce(name, fn) for name, fn in steps.items()}, repeats=args.repeats, warmup=1
    )
    for name, model in models.items():
        trainable, total = model.get_nb_trainable_parameters()
        print(
            f"{name:<18} trainable {trainable:>9,} ({100 * trainable / total:.3f}%)  "
            f"extra block passes per MoLEx layer (last step): {expert_passes(model):.2f}"
        )
    report_timings(times, "lora_r8", f"training step ({args.repeats} interleaved repeats, median of paired ratios)")


if __name__ == "__main__":
    main()
