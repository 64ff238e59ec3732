"""Which layers does DLO skip: the pretrained (original) layers or the inserted (new) ones? A small CPU run.

A tiny random Llama (8 layers, hidden 64 -> 10 layers with interleaved zero-out copies) trains with DLO's official
defaults (every layer routed, frozen original layers, cos_global router labels, capacity 1.0 -> 0.9) for a few
dozen steps on random token sequences, then evaluates with the threshold rule (s >= 0.5). It reports the executed MLP
fraction split by layer kind, from ``peft_depth.routing_stats`` (``executed_fraction_by_kind``), in training and in
eval. A random tiny model says nothing about a pretrained one's numbers; it shows where the cos_global ranking puts
the skipping while the new layers are still near their zero-out start.

    python benchmarks/dlo_skip_by_kind.py [--steps 40] [--unrouted-edge-layers 0] [--seed 0]
"""

from __future__ import annotations

import argparse
import json

import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import peft_depth
from peft_depth import DLOConfig


def tiny_model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config)


def mean_over_forwards(history: list[dict[str, float | None]], kind: str) -> float | None:
    values = [entry[kind] for entry in history if entry[kind] is not None]
    return sum(values) / len(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--unrouted-edge-layers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = DLOConfig(
        task_type="CAUSAL_LM",
        routed_layers="all",  # the measurement is of skipping in original and new layers alike
        capacity_annealing_fraction=0.5,
        unrouted_edge_layers=args.unrouted_edge_layers,
    )
    model = get_peft_model(tiny_model(args.seed), config)
    model.base_model.set_dlo_total_steps(args.steps)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    training = []
    for step in range(args.steps):
        tokens = torch.randint(1, 256, (8, 32), generator=generator)
        model.base_model.set_dlo_step(step)
        out = model(input_ids=tokens, labels=tokens)
        (out.loss + sum(peft_depth.aux_losses(model).values())).backward()
        optimizer.step()
        optimizer.zero_grad()
        stats = peft_depth.routing_stats(model)["dlo"]["default"]
        if step >= args.steps // 2:  # after annealing: capacity at its target
            training.append(stats["executed_fraction_by_kind"])
    model.eval()
    evaluation = []
    with torch.no_grad():
        for _ in range(8):
            model(input_ids=torch.randint(1, 256, (8, 32), generator=generator))
            evaluation.append(peft_depth.routing_stats(model)["dlo"]["default"]["executed_fraction_by_kind"])
    result = {
        kind: {"train": mean_over_forwards(training, kind), "eval": mean_over_forwards(evaluation, kind)}
        for kind in ("original", "new")
    }
    print(json.dumps({"steps": args.steps, "unrouted_edge_layers": args.unrouted_edge_layers, **result}, indent=1))


if __name__ == "__main__":
    main()
