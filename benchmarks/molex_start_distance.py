"""How far MoLEx starts from the pretrained encoder, by fixed mixing weight α (issue 14's MoLEx diagnosis).

For all-MiniLM-L6-v2 with the official SST-2 preset (``MoLExConfig.for_task("sst2")``), the untrained adapter's
relative change of the final hidden states on the first training batch the quality sweep uses
(``peft_depth.analysis.distance_from_base``), per seed of the gate initialisation, for α = 0.5 (the GLUE scripts')
and α = 0.95 (CoLA's and GPT-2's). Prints a markdown table.

    python benchmarks/molex_start_distance.py
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import set_seed

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality.arms import arm_by_name, arms_for, build_config  # noqa: E402
from quality.data import load_splits, pair_examples  # noqa: E402
from quality.models import load_model, load_tokenizer, resolve_model  # noqa: E402
from quality.sweep import SUITES  # noqa: E402
from quality.train_encoder import collate_pairs, encode_pairs  # noqa: E402

from peft_depth.analysis import distance_from_base  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    spec = resolve_model("minilm")
    settings = SUITES["minilm"].settings_for("sst2")
    tokenizer = load_tokenizer(spec)
    rows = encode_pairs(pair_examples("sst2", load_splits("sst2").train), tokenizer, settings.max_length)
    first = collate_pairs(rows[: settings.batch_size], tokenizer.pad_token_id)
    first.pop("labels")
    arms = {arm.name: arm for arm in arms_for(spec)}
    print("| arm | α | Δh per seed (0-4) | mean |\n|---|---|---|---|")
    for name in ("molex_lora", "molex_lora_alpha95"):
        arm = arm_by_name(list(arms.values()), name)
        changes = []
        for seed in range(5):
            set_seed(seed)  # as the sweep's runs: the gates are initialised after set_seed(seed)
            config = build_config(arm, spec, "sst2", settings.steps)
            model = get_peft_model(load_model(spec, num_labels=2), config)
            changes.append(distance_from_base(model, **first).hidden_relative_change)
        alpha = config.resolve_alpha(causal=False)
        print(
            f"| {arm.label} | {alpha:g} | {', '.join(f'{c:.3f}' for c in changes)} | {statistics.fmean(changes):.3f} |"
        )


if __name__ == "__main__":
    main()
