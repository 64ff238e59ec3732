"""Do SmolLM2's training step and scoring forward give bit-identical results at 1 and 2 torch threads?

The quality sweep ran SmolLM2's runs as two single-thread processes until BoolQ's memory peaks (training about 10 GB,
lm-eval scoring 12-15 GB) stopped fitting two processes on the 24 GB machine; the rest of BoolQ runs as one process
with two threads. Seeds run at different thread counts can only be compared as the same experiment if the thread
count does not change the arithmetic. This checks it at the sweep's shapes for every arm of the sweep (LoRA, MoLA,
MoD, MoLEx, DLO, dense expansion, each built by the sweep's own `build_config`): SmolLM2's config (hidden size,
heads, vocabulary) with random weights and fewer blocks, one 8 x 320-token training step under bf16 autocast (the
loss with the adapter's auxiliary losses, every trainable gradient, the weights after one AdamW step), and one no-grad
scoring forward of 16 x 512 tokens followed by the float32 log-softmax lm-eval takes. Prints one line per arm and
exits 1 if anything differs.

    python benchmarks/thread_determinism.py [--layers 4] [--arms lora,dlo]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality.arms import Arm, arms_for, build_config  # noqa: E402
from quality.cpu_arithmetic import cpu_arithmetic  # noqa: E402
from quality.models import ModelSpec, resolve_model  # noqa: E402

import peft_depth  # noqa: E402


def _build(spec: ModelSpec, arm: Arm, layers: int) -> torch.nn.Module:
    config = AutoConfig.from_pretrained(spec.path)
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_config(config).float(), build_config(arm, spec, steps=10))
    # zero-initialised parameters (LoRA's B, MoD's gate...) get a random value, so every gradient is non-trivial
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad and not param.any():
                param.normal_(std=0.02)
    return model


def _train_step(spec: ModelSpec, arm: Arm, layers: int, threads: int, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    torch.set_num_threads(threads)
    model = _build(spec, arm, layers).train()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-3, weight_decay=0.01)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss = loss + sum(peft_depth.aux_losses(model).values())
    loss.backward()
    result = {"loss": loss.detach().clone()}
    result.update({f"grad {name}": p.grad.clone() for name, p in trainable.items() if p.grad is not None})
    optimizer.step()
    result.update({f"after AdamW {name}": p.detach().clone() for name, p in trainable.items()})
    return result


@torch.no_grad()
def _score(spec: ModelSpec, arm: Arm, layers: int, threads: int, tokens: torch.Tensor) -> torch.Tensor:
    torch.set_num_threads(threads)
    model = _build(spec, arm, layers).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=tokens).logits
    return torch.log_softmax(logits.float(), dim=-1)


def _check_arm(spec: ModelSpec, arm: Arm, layers: int, train: torch.Tensor, score: torch.Tensor) -> bool:
    one, two = (_train_step(spec, arm, layers, threads, train) for threads in (1, 2))
    differing = [name for name in one if not torch.equal(one[name], two[name])]
    grads = sum(name.startswith("grad ") for name in one)
    same_scores = torch.equal(*(_score(spec, arm, layers, threads, score) for threads in (1, 2)))
    print(
        f"{arm.name}: training step (loss, {grads} gradients, {grads} weights after AdamW): "
        f"{len(differing)} differ; scoring log-softmax: {'identical' if same_scores else 'differs'}"
    )
    for name in differing:
        print(f"  differs: {name} (max |diff| {(one[name] - two[name]).abs().max().item():.3g})")
    return not differing and same_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks of the random SmolLM2 (30 in full)")
    parser.add_argument("--arms", default=None, help="comma-separated arm names (default: every SmolLM2 arm)")
    args = parser.parse_args()
    spec = resolve_model("smollm2")
    arms = arms_for(spec)
    if args.arms:
        wanted = args.arms.split(",")
        unknown = sorted(set(wanted) - {arm.name for arm in arms})
        if unknown:
            parser.error(f"--arms: unknown {unknown}; allowed: {[arm.name for arm in arms]}")
        arms = [arm for arm in arms if arm.name in wanted]
    vocab = AutoConfig.from_pretrained(spec.path).vocab_size
    generator = torch.Generator().manual_seed(0)
    train_tokens = torch.randint(0, vocab, (8, 320), generator=generator)
    score_tokens = torch.randint(0, vocab, (16, 512), generator=generator)
    print(
        f"random SmolLM2, {args.layers} blocks; 8 x 320-token training step and 16 x 512-token scoring forward, "
        f"bf16 autocast; 1 vs 2 torch threads; CPU {cpu_arithmetic()} (the answer holds for this kind of CPU's kernels)"
    )
    results = [_check_arm(spec, arm, args.layers, train_tokens, score_tokens) for arm in arms]
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
