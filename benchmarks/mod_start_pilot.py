"""Pilot for MoD's start (issue 14): with g = 0 the router and norms get no LM-loss gradient until the gate moves,
so short runs stay at the base model. This trains MoD alone from several starts (``gate_init``, ``gate_lr``) for the
same short budget, and reports how far each starts from the base (KL), where its gate ends, and its dev accuracy
next to the base model's, on one task and seed (indicative: it chooses which start the 3-seed sweep uses)::

    python benchmarks/mod_start_pilot.py --threads 1                      # PIQA dev, 40 steps of 8
    python benchmarks/mod_start_pilot.py --task boolq --steps 60

The table goes to ``benchmarks/results/mod_start_pilot.md``; runs are kept in a JSONL next to it so a rerun resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality.data import choice_examples, load_splits  # noqa: E402
from quality.models import load_model, load_tokenizer, resolve_model  # noqa: E402
from quality.train_causal import RunSettings, train_causal  # noqa: E402

from peft_depth import MoDConfig  # noqa: E402
from peft_depth.analysis import paired_bootstrap  # noqa: E402
from peft_depth.tasks import multiple_choice_predictions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: (label, MoDConfig fields): the starts compared. lr 1e-2 is the upper end of the sweep's MoD-alone grid.
STARTS = [
    ("g0 = 0 (current default)", {}),
    ("g0 = 0, gate_lr 0.1", {"gate_lr": 0.1}),
    ("g0 = 0.5", {"gate_init": 0.5}),
    ("g0 = 1", {"gate_init": 1.0}),
]


def _correct(model, tokenizer, examples) -> list[bool]:
    return [int(p) == ex.label for p, ex in zip(multiple_choice_predictions(model, tokenizer, examples), examples)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="piqa")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = resolve_model("smollm2")
    splits = load_splits(args.task)
    train, dev = choice_examples(args.task, splits.train), choice_examples(args.task, splits.dev)
    settings = RunSettings(steps=args.steps, batch_size=8)
    results_dir = ROOT / "benchmarks" / "results"
    ledger = results_dir / f"mod_start_pilot_{args.task}.jsonl"
    done = (
        {json.loads(line)["label"]: json.loads(line) for line in ledger.read_text().splitlines()}
        if ledger.is_file()
        else {}
    )
    tokenizer = load_tokenizer(spec)
    if "base" not in done:
        record = {"label": "base", "correct": _correct(load_model(spec).eval(), tokenizer, dev)}
        with ledger.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        done["base"] = record
    for label, fields in STARTS:
        if label in done:
            continue
        config = MoDConfig(task_type="CAUSAL_LM", **fields)
        trained = train_causal(spec, config, train, args.lr, args.seed, settings)
        gate = float(trained.model.base_model.mod_ensemble["default"].gate.detach())
        record = {
            "label": label,
            "fields": fields,
            "lr": args.lr,
            "steps": args.steps,
            "seed": args.seed,
            "start_kl": trained.start_distance["mean_kl"],
            "final_gate": gate,
            "train_s": trained.train_wall_s,
            "final_loss": trained.final_loss,
            "correct": _correct(trained.model, tokenizer, dev),
        }
        with ledger.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        done[label] = record
        print(f"{label}: gate {gate:.3f}, dev {sum(record['correct']) / len(dev):.3f}", flush=True)
    base = done["base"]["correct"]
    lines = [
        f"# MoD start pilot: {args.task} dev ({len(dev)} rows), SmolLM2-135M-Instruct, MoD alone, {args.steps} steps of 8, "
        f"lr {args.lr:g}, seed {args.seed} (indicative: one task, one seed)",
        "",
        f"Command: `python benchmarks/mod_start_pilot.py {' '.join(argv if argv is not None else sys.argv[1:])}`. Base "
        f"model dev accuracy {sum(base) / len(base):.3f}. Start KL: KL(base ‖ untrained adapter) per position on the "
        "first training batch.",
        "",
        "| start | start KL | gate after training | final train loss | dev accuracy | Δ vs base, pp (95% paired interval) |",
        "|---|---|---|---|---|---|",
    ]
    for label, _ in STARTS:
        r = done[label]
        lines.append(
            f"| {label} | {r['start_kl']:.3g} | {r['final_gate']:.3f} | {r['final_loss']:.3f} | "
            f"{sum(r['correct']) / len(dev):.3f} | {paired_bootstrap(r['correct'], base)} |"
        )
    (results_dir / f"mod_start_pilot_{args.task}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
