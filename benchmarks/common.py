"""Shared pieces of the side-by-side benchmarks: the SmolLM2-135M-shaped model, paired interleaved timing, peak memory.

Every benchmark measures its variants in one process, interleaving them repeat by repeat in a shuffled order, and
reports the median of the per-repeat ratios to a reference, so slow drifts of machine load cancel. An A/A line (the
reference against a second copy of itself) shows how much noise remains.
"""

from __future__ import annotations

import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peft_depth

SMOLLM2_SHAPE = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    rope_theta=100000.0,
)
#: Smoke-mode shape: 8 layers (MoD's 4 late layers, DLO's interleave every 4), width 64 (bitsandbytes' CPU block).
TINY_SHAPE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def smollm2_shaped_model(num_layers: int = 30, seed: int = 0) -> LlamaForCausalLM:
    """Random-weight model with SmolLM2-135M's exact shape (timing does not depend on the weights' values)."""
    torch.manual_seed(seed)
    config = LlamaConfig(**{**SMOLLM2_SHAPE, "num_hidden_layers": num_layers})
    return LlamaForCausalLM(config)


def token_batch(batch_size: int, seq_len: int, vocab: int = 49152, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch_size, seq_len), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def interleaved_timings(
    variants: dict[str, Callable[[], None]], repeats: int, warmup: int = 2, seed: int = 0
) -> dict[str, list[float]]:
    """Run each variant ``warmup`` times, then ``repeats`` rounds in shuffled order; seconds per call."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    rng = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for _ in range(repeats):
        rng.shuffle(names)
        for name in names:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return times


def train_step_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor], lr: float = 1e-4) -> Callable[[], None]:
    """One optimizer step per call on LM loss plus every aux loss: what ``DepthSFTTrainer`` optimises."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def step() -> None:
        model.train()  # a forward benchmark may have switched the model to eval between steps
        out = model(**batch)
        loss = out.loss + sum(peft_depth.aux_losses(model).values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def paired_ratio(times: dict[str, list[float]], name: str, reference: str) -> float:
    """Median over repeats of time[name] / time[reference] in the same round."""
    return statistics.median(a / b for a, b in zip(times[name], times[reference]))


def report_timings(times: dict[str, list[float]], reference: str, title: str) -> dict[str, dict[str, float]]:
    print(f"\n{title}")
    print(f"{'variant':<34} {'median s':>9} {'ratio vs ' + reference:>22}")
    rows = {}
    for name, values in times.items():
        ratio = paired_ratio(times, name, reference)
        rows[name] = {"median_s": statistics.median(values), "ratio": ratio}
        print(f"{name:<34} {statistics.median(values):>9.4f} {ratio:>21.3f}x")
    return rows


def peak_rss_mb_in_subprocess(module: str, variant: str, extra_args: list[str] | None = None) -> dict[str, float]:
    """Peak resident memory (MB) of the training steps of a fresh ``python -m module --memory-child variant``.

    Returns ``{"peak_rss_mb", "baseline_mb"}``: the peak while stepping (model included) and the RSS just before.

    One process per variant, because a process's peak RSS cannot be attributed to one of several variants run in it.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-m", module, "--memory-child", variant, *(extra_args or [])],
        capture_output=True,
        text=True,
        env=env,
        cwd=os.path.dirname(__file__),
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> float:
    """Reset the kernel's high-water mark of this process's RSS (Linux) and return the current RSS in MB.

    Lets a child measure the peak of its training steps alone, not of building the model (random init of a 49k-row
    embedding briefly needs more memory than training a step).
    """
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return _status_mb("VmRSS")


def print_peak_rss_json(baseline_mb: float) -> None:
    """Print peak RSS since ``reset_peak_rss`` as the last stdout line (child side of ``peak_rss_mb_in_subprocess``)."""
    print(json.dumps({"peak_rss_mb": _status_mb("VmHWM"), "baseline_mb": baseline_mb}))
