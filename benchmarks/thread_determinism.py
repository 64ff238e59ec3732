"""Do SmolLM2's training step and scoring forward give bit-identical results at 1 and 2 torch threads?

The quality sweep ran SmolLM2's runs as two single-thread processes until BoolQ's memory peaks (training about 10 GB,
lm-eval scoring 12-15 GB) stopped fitting two processes on the 24 GB machine; the rest of BoolQ runs as one process
with two threads. Seeds run at different thread counts can only be compared as the same experiment if the thread
count does not change the arithmetic. This checks it at the sweep's shapes: SmolLM2's config (hidden size, heads,
vocabulary) with random weights and fewer blocks, LoRA r=8 on the sweep's target modules, one 8 x 320-token
training step under bf16 autocast (loss, every LoRA gradient, the weights after one AdamW step), and one no-grad
scoring forward of 16 x 512 tokens followed by the float32 log-softmax lm-eval takes. Prints one line per quantity
and exits 1 if any differs.

    python benchmarks/thread_determinism.py [--layers 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality.models import resolve_model  # noqa: E402


def _build(layers: int) -> torch.nn.Module:
    config = AutoConfig.from_pretrained(resolve_model("smollm2").path)
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float()
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    model = get_peft_model(model, lora)
    # peft initialises B at zero; random B makes every LoRA gradient non-trivial
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return model


def _train_step(layers: int, threads: int, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    torch.set_num_threads(threads)
    model = _build(layers)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-3, weight_decay=0.01)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    result = {"loss": loss.detach().clone()}
    result.update({f"grad {name}": p.grad.clone() for name, p in trainable.items()})
    optimizer.step()
    result.update({f"after AdamW {name}": p.detach().clone() for name, p in trainable.items()})
    return result


@torch.no_grad()
def _score(layers: int, threads: int, tokens: torch.Tensor) -> torch.Tensor:
    torch.set_num_threads(threads)
    model = _build(layers).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=tokens).logits
    return torch.log_softmax(logits.float(), dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks of the random SmolLM2 (30 in full)")
    args = parser.parse_args()
    vocab = AutoConfig.from_pretrained(resolve_model("smollm2").path).vocab_size
    generator = torch.Generator().manual_seed(0)
    train_tokens = torch.randint(0, vocab, (8, 320), generator=generator)
    score_tokens = torch.randint(0, vocab, (16, 512), generator=generator)

    one, two = _train_step(args.layers, 1, train_tokens), _train_step(args.layers, 2, train_tokens)
    differing = [name for name in one if not torch.equal(one[name], two[name])]
    grads = sum(name.startswith("grad ") for name in one)
    print(
        f"training step ({args.layers} blocks, 8 x 320 tokens, bf16 autocast): loss, {grads} LoRA gradients and "
        f"{grads} weights after AdamW; {len(differing)} differ between 1 and 2 threads"
    )
    for name in differing:
        print(f"  differs: {name} (max |diff| {(one[name] - two[name]).abs().max().item():.3g})")

    scored_one, scored_two = _score(args.layers, 1, score_tokens), _score(args.layers, 2, score_tokens)
    same_scores = torch.equal(scored_one, scored_two)
    print(
        f"scoring forward (16 x 512 tokens, bf16 autocast, float32 log-softmax): "
        f"{'identical' if same_scores else 'differs'} at 1 and 2 threads"
    )
    sys.exit(0 if not differing and same_scores else 1)


if __name__ == "__main__":
    main()
