"""Which layer experts move SmolLM2 furthest from the base when MoLEx mixes them in (issue 14's MoLEx diagnosis).

An untrained MoLEx block i with expert j outputs α·u_i(z) + (1 − α)·u_j(z) instead of u_i(z): it moves the residual
stream by (1 − α)·(u_j(z) − u_i(z)). This script measures, on the first training batch the quality sweep uses (PIQA,
SmolLM2-135M-Instruct dequantized from the Q4_1 GGUF), the relative size of that move for every pair (i, j):

    shift(i, j) = ‖u_j(z_i) − u_i(z_i)‖ / ‖u_i(z_i)‖      over the real (non-padding) tokens,

with z_i the base model's input to block i and each block called with block i's mask and position embeddings (as
MoLEx calls its expert). Then, for the default decoder config (α = 0.95, MoLEx on the first half of the blocks) and
for the same config with the worst experts left out of ``expert_layers``, how far the untrained adapter's next-token
distribution starts from the base (``peft_depth.analysis.distance_from_base``, mean over gate seeds).

    python benchmarks/molex_expert_shift.py [--task piqa] [--seeds 3] [--exclude 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import set_seed

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality.arms import arm_by_name, arms_for, build_config  # noqa: E402
from quality.data import choice_examples, load_splits  # noqa: E402
from quality.models import load_model, load_tokenizer, resolve_model  # noqa: E402
from quality.sweep import SUITES  # noqa: E402

from peft_depth.analysis import distance_from_base  # noqa: E402
from peft_depth.core.layer_stack import find_layer_stack  # noqa: E402
from peft_depth.tasks import collate_answer_batch, encode_answer_only, fit_examples  # noqa: E402


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def expert_shifts(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``shift[i, j]`` as in the module docstring, for every pair of blocks of ``model`` (a base causal LM)."""
    layers = find_layer_stack(model).layers
    calls: dict[int, tuple[tuple, dict]] = {}

    def capture(index):
        def hook(module, args, kwargs):
            calls[index] = (args, dict(kwargs))

        return hook

    handles = [layer.register_forward_pre_hook(capture(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        model(**batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    real = batch["attention_mask"].bool()
    shifts = torch.zeros(len(layers), len(layers))
    for i, (args, kwargs) in calls.items():
        outputs = [_hidden(layer(*args, **kwargs))[real] for layer in layers]
        own = outputs[i]
        for j, other in enumerate(outputs):
            shifts[i, j] = (other - own).norm() / own.norm()
    return shifts


def _start_kl(spec, task: str, batch, seeds: int, expert_layers: list[int] | None) -> tuple[list[float], list[float]]:
    """Mean KL and top-1 agreement of the sweep's MoLEx arm (its config, seeds 0..seeds-1) against the base."""
    arm = arm_by_name(arms_for(spec), "molex_lora")
    kls, agreements = [], []
    for seed in range(seeds):
        set_seed(seed)  # as the sweep's runs: the gates are initialised after set_seed(seed)
        config = build_config(arm, spec, task, SUITES["smollm2-main"].settings_for(task).steps)
        config.expert_layers = expert_layers
        model = get_peft_model(load_model(spec), config)
        distance = distance_from_base(model, batch["input_ids"], batch["attention_mask"])
        kls.append(distance.mean_kl)
        agreements.append(distance.top1_agreement)
    return kls, agreements


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="piqa")
    parser.add_argument("--seeds", type=int, default=3, help="gate initialisations per start-distance row")
    parser.add_argument("--exclude", type=int, default=2, help="leave out this many of the worst experts")
    args = parser.parse_args()
    torch.set_num_threads(1)

    spec = resolve_model("smollm2")
    settings = SUITES["smollm2-main"].settings_for(args.task)
    tokenizer = load_tokenizer(spec)
    kept, _ = fit_examples(choice_examples(args.task, load_splits(args.task).train), tokenizer, settings.max_length)
    batch = collate_answer_batch(encode_answer_only(kept[: settings.batch_size], tokenizer), tokenizer.pad_token_id)
    batch = {key: batch[key] for key in ("input_ids", "attention_mask")}

    shifts = expert_shifts(load_model(spec).eval(), batch)
    num_layers = shifts.shape[0]
    molex_layers = list(range(num_layers // 2))  # the decoder default: the first half of the blocks
    rows = shifts[molex_layers]
    print(f"SmolLM2-135M-Instruct, {args.task} first training batch ({int(batch['attention_mask'].sum())} tokens)\n")
    print(
        "Relative move ‖u_j(z_i) − u_i(z_i)‖ / ‖u_i(z_i)‖ by expert j, over the default MoLEx blocks i (0-"
        f"{molex_layers[-1]}); MoLEx at α = 0.95 moves the block output by 0.05× this.\n"
    )
    # Block i choosing itself changes nothing: those entries (0) are left out of expert j's column.
    columns = [
        torch.cat([rows[:j, j], rows[j + 1 :, j]]) if j < len(molex_layers) else rows[:, j] for j in range(num_layers)
    ]
    print("| expert j | mean over i | max over i |\n|---|---|---|")
    for j, column in enumerate(columns):
        print(f"| {j} | {column.mean():.2f} | {column.max():.2f} |")
    mean_by_expert = torch.stack([column.mean() for column in columns])
    worst = sorted(mean_by_expert.topk(args.exclude).indices.tolist()) if args.exclude else []
    kept_experts = [j for j in range(num_layers) if j not in worst]
    print(f"\nThe sweep's untrained MoLEx + LoRA adapter vs the base (mean over gate seeds 0-{args.seeds - 1}):\n")
    print("| expert_layers | mean KL (nats/position) per seed | mean | top-1 agreement (mean) |\n|---|---|---|---|")
    for label, experts in (("all (default)", None), (f"all but {worst}", kept_experts)):
        kls, agreements = _start_kl(spec, args.task, batch, args.seeds, experts)
        print(
            f"| {label} | {', '.join(f'{kl:.2f}' for kl in kls)} | {statistics.fmean(kls):.2f} "
            f"| {statistics.fmean(agreements):.3f} |"
        )


if __name__ == "__main__":
    main()
