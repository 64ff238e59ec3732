"""The report of a suite: a markdown table per task and a PNG, from the suite's JSONL ledger alone.

Per arm: the learning rate it ran at, accuracy mean ± std over seeds, the per-seed paired difference to its
budget-matched LoRA with the 95% paired t interval and the smallest effect the design could detect (``stats``), the
difference to the arm its paper claim names (DLO vs dense expansion, MoLA ▽ vs □), trainable parameters, training
FLOPs and training time. When a training run appears more than once for a (task, arm, seed) (a config default
changed between sweeps), the latest record counts.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base_scores import base_accuracies, base_ledger_path
from .inference_cost import inference_ledger_path, with_inference_flops
from .ledger import read_records
from .models import MINILM, MINILM_NOTE, SMOLLM2, SMOLLM2_NOTE
from .stats import PairedSummary, clears_majority, mean_std, paired_summary

if TYPE_CHECKING:  # matplotlib is imported only when a figure is drawn
    from matplotlib.figure import Figure

__all__ = [
    "latest_test_results",
    "runs_of_the_current_recipe",
    "summarise",
    "render_markdown",
    "plot",
    "accuracy_figure",
    "write_report",
]

_NOTES = {SMOLLM2: SMOLLM2_NOTE, MINILM: MINILM_NOTE}
Results = dict[str, dict[str, dict[int, dict[str, Any]]]]  # task -> arm -> seed -> record


def latest_test_results(records: list[dict[str, Any]], scorer: str | None = None) -> Results:
    """task -> arm -> seed -> the latest test record (of ``scorer`` when given)."""
    results: Results = defaultdict(lambda: defaultdict(dict))
    for record in records:
        if record["split"] != "test" or (scorer is not None and record.get("scorer") != scorer):
            continue
        results[record["task"]][record["arm"]][record["seed"]] = record
    return results


def _paired(results: dict[str, dict[int, dict[str, Any]]], arm: str, reference: str | None) -> PairedSummary | None:
    if reference is None or reference == arm or reference not in results:
        return None
    # Never pair a GPU run with a CPU run (issue 14): only seeds whose two runs used the same kind of device.
    seeds = sorted(
        s
        for s in set(results[arm]) & set(results[reference])
        if _device(results[arm][s]) == _device(results[reference][s])
    )
    if not seeds:
        return None
    return paired_summary(
        [results[arm][s]["accuracy"] for s in seeds], [results[reference][s]["accuracy"] for s in seeds]
    )


def _device(record: dict[str, Any]) -> str:
    """The kind of device a record's run trained on, and scored on when that differs (a reused adapter scored on the
    other kind): such a run pairs only with one split the same way."""
    trained = record.get("hardware", {}).get("device", "cpu")
    scored = record.get("score_device", trained)  # records before the field was written trained and scored alike
    return trained if scored == trained else f"{trained}-trained, {scored}-scored"


def summarise(results: Results) -> dict[str, list[dict[str, Any]]]:
    """task -> one row per arm with every number the table and the plot show."""
    table: dict[str, list[dict[str, Any]]] = {}
    for task, arms in results.items():
        rows = []
        for arm, by_seed in arms.items():
            records = [by_seed[s] for s in sorted(by_seed)]
            first = records[0]
            accuracy, spread = mean_std([r["accuracy"] for r in records])
            rows.append(
                {
                    "arm": arm,
                    "label": first.get("arm_label", arm),
                    "method": first["method"],
                    "lr": sorted({r["lr"] for r in records}),
                    "seeds": sorted(by_seed),
                    "accuracies": [r["accuracy"] for r in records],
                    "accuracy": accuracy,
                    "std": spread,
                    "f1": statistics.fmean(r["f1"] for r in records) if all("f1" in r for r in records) else None,
                    "partner": first.get("budget_partner"),
                    "vs_partner": _paired(arms, arm, first.get("budget_partner")),
                    "claim_reference": first.get("claim_reference"),
                    "vs_claim": _paired(arms, arm, first.get("claim_reference")),
                    "trainable_params": first["trainable_params"],
                    "test_rows": (first.get("split_sizes") or {}).get("test"),
                    "train_flops": statistics.fmean(r["train_flops"] for r in records),
                    "train_wall_s": statistics.fmean(r["train_wall_s"] for r in records),
                    # Older records lack it unless backfilled from their kept adapter (inference_cost): mean of those.
                    "inference_flops": _mean_present(records, "inference_flops_per_token"),
                    "inference_flops_seeds": sum(r.get("inference_flops_per_token") is not None for r in records),
                    # Scored one row per batch, a batch-voting arm's rows each vote alone (runner.scoring_batch_size).
                    "voting": first.get("config", {}).get("routing") == "batch_vote",
                    "batch_dependent": first.get("config", {}).get("routing") == "batch_vote"
                    and any(r.get("eval_batch_size") != 1 for r in records),
                    "start_kl": _mean_start(records, "mean_kl"),
                    "start_hidden": _mean_start(records, "hidden_relative_change"),
                    "encoder": first.get("config", {}).get("task_type") == "SEQ_CLS",
                }
            )
        rows.sort(key=lambda row: (row["method"] != "lora", row["trainable_params"] if row["method"] == "lora" else 0))
        table[task] = rows
    return table


def _mean_present(records: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return statistics.fmean(values) if values else None


def _inference_flops(row: dict[str, Any]) -> str:
    if row["inference_flops"] is None:
        return "–"
    measured = row["inference_flops_seeds"]
    partial = "" if measured == len(row["seeds"]) else f" ({measured} seed{'s' if measured > 1 else ''})"
    return f"{row['inference_flops']:.3g}{partial}"


def _mean_start(records: list[dict[str, Any]], key: str) -> float | None:
    """Mean of one ``distance_from_base`` field of the untrained adapter (first training batch) over the records
    that have it; None where none does (records older than the field)."""
    values = [r["start_distance"][key] for r in records if key in (r.get("start_distance") or {})]
    return statistics.fmean(values) if values else None


def _start_distance(row: dict[str, Any]) -> str:
    # An encoder's new 2-way head is random, so its KL says little: its start is the change of what the head reads.
    parts = [] if row["encoder"] or row["start_kl"] is None else [f"KL {row['start_kl']:.3g}"]
    if row["start_hidden"] is not None:
        parts.append(f"Δh {row['start_hidden']:.3g}")
    return ", ".join(parts) or "–"


def _precision_note(records: list[dict[str, Any]]) -> str:
    # Records older than the field ran in float32.
    found = sorted({r.get("precision", "fp32") for r in records})
    notes = {
        "fp32": "float32 throughout",
        "bf16-mixed": "bf16 mixed precision (float32 weights and optimizer, bfloat16 autocast in training and scoring)",
    }
    return " and ".join(notes.get(p, p) for p in found)


def _pct(value: float) -> str:
    return f"{100 * value:+.1f}"


def _difference(summary: PairedSummary | None, reference: str | None) -> tuple[str, str, str]:
    if summary is None:
        return "–", "–", "–"
    per_seed = ", ".join(_pct(d) for d in summary.differences)
    if len(summary.differences) == 1:
        return f"{_pct(summary.mean)} vs {reference}", "1 seed: none", "–"
    interval = f"[{_pct(summary.low)}, {_pct(summary.high)}]" + (" excl. 0" if summary.excludes_zero else "")
    return f"{_pct(summary.mean)} vs {reference} ({per_seed})", interval, f"{100 * summary.detectable:.1f}"


def _versus_base(row: dict[str, Any], base: float | None) -> str:
    # The base is one deterministic score: the interval is the seeds' spread around it, not the test set's noise.
    if base is None:
        return "–"
    summary = paired_summary(row["accuracies"], [base] * len(row["accuracies"]))
    if len(summary.differences) == 1:
        return _pct(summary.mean)
    return f"{_pct(summary.mean)} [{_pct(summary.low)}, {_pct(summary.high)}]"


def _learning_rate_note(lr_from: str | None) -> str:
    if lr_from:
        # An indicative suite has no dev phase of its own (sweep.borrowed_lr).
        return (
            f"learning rate per arm taken from `{lr_from}`'s dev phase (the grid value with the best dev accuracy "
            "averaged over its tasks, seed 0); one seed, indicative."
        )
    return (
        "learning rate per arm chosen on the dev split from its grid (3 values for LoRA, 2 per method; seed 0), "
        "then every seed at that rate."
    )


def _header(records: list[dict[str, Any]], suite: str, scorer: str | None, lr_from: str | None) -> list[str]:
    models = sorted({r["model"] for r in records})
    commits = sorted(
        {(r.get("git_commit") or "?")[:10] + ("+edits" if r.get("git_src_dirty") else "") for r in records}
    )
    hardware = sorted(
        {
            f"{r['hardware'].get('gpu') or r['hardware']['cpu']} ({r['hardware']['torch_threads']} threads)"
            for r in records
        }
    )
    versions = records[-1]["versions"]
    recipe = sorted({(r["steps"], r["batch_size"], r.get("max_length")) for r in records})
    lines = [f"# Quality comparison: `{suite}`", ""]
    devices = sorted({_device(r) for r in records})
    if len(devices) > 1:
        lines += [
            f"**Runs on {' and '.join(devices)} are mixed in this ledger; paired differences only pair runs made on "
            "the same kind of device.**",
            "",
        ]
    for model in models:
        lines.append(f"- **Model**: {_NOTES.get(model, model)}.")
    lines += [
        "- **Recipe**: "
        + "; ".join(f"{s} steps of {b} examples, max length {m}" for s, b, m in recipe)
        + f"; {_precision_note(records)}; linear schedule with 10% warm-up; {_learning_rate_note(lr_from)}",
        f"- **Scorer** (test): {scorer or 'any'}; accuracy = the choice with the highest summed log-likelihood "
        "(decoders) or the classifier's argmax (encoders).",
        f"- **Hardware**: {'; '.join(hardware)}. **Code**: {', '.join(commits)}. **Versions**: "
        + ", ".join(f"{k} {v}" for k, v in versions.items() if v),
        "- **Statistics**: Δ = arm − reference on the same seed (percentage points), mean and per seed; 95% interval "
        "= mean Δ ± t₀.₉₇₅,ₙ₋₁ · SE, SE = the sample standard deviation of Δ over the n seeds / √n (a paired t "
        "interval: with 3 seeds t₀.₉₇₅,₂ = 4.30); detectable = (t₀.₉₇₅,ₙ₋₁ + t₀.₈₀,ₙ₋₁) · SE (5.4 · SE with 3 seeds, "
        "3.7 · SE with 5): the smallest true difference this design finds about 80% of the time at α = 0.05 (77% "
        "with 3 seeds, 79% with 5, by the exact noncentral t). The test set is fixed, so its sampling noise is not in "
        "the interval.",
    ]
    return lines


def render_markdown(
    records: list[dict[str, Any]],
    suite: str,
    scorer: str | None = None,
    majority: dict[str, float] | None = None,
    base: dict[str, float] | None = None,
    lr_from: str | None = None,
) -> str:
    """The suite's report; ``majority``: task -> accuracy of always giving the test split's most frequent label;
    ``base``: task -> the untrained base model's accuracy on the same rows, scorer and precision; ``lr_from``: the
    suite an indicative suite takes its learning rates from (``Suite.lr_from``), None for a suite with a dev phase."""
    base = base or {}
    tests = [r for r in records if r["split"] == "test" and (scorer is None or r.get("scorer") == scorer)]
    if not tests:
        return f"# Quality comparison: `{suite}`\n\nNo finished test runs yet.\n"
    lines = _header(tests, suite, scorer, lr_from)
    sizes = {r["task"]: (r["split_sizes"], r["split_fingerprint"]) for r in tests}
    for task, rows in summarise(latest_test_results(tests, scorer)).items():
        split, fingerprint = sizes[task]
        lines += [
            "",
            f"## {task}",
            "",
            f"train {split['train']} / dev {split['dev']} / test {split['test']} (data fingerprint `{fingerprint}`)"
            + (
                f"; always answering the most frequent label scores {majority[task]:.4f}, the floor a learned score "
                "must clear"
                if majority and task in majority
                else ""
            )
            + (
                f"; the untrained base model scores {base[task]:.4f} (same rows, scorer and precision)"
                if task in base
                else ""
            ),
            "",
            "| arm | lr | seeds | accuracy (mean ± std) | Δ vs budget-matched LoRA, pp | 95% interval | detectable, pp"
            " | Δ vs claim reference, pp | claim interval | Δ vs base, pp [95% interval] | trainable params "
            "| train FLOPs | inference FLOPs / token | train time | start distance |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            mark = " †" if row["batch_dependent"] else ""
            partner = _difference(row["vs_partner"], row["partner"])
            if row["vs_partner"] is not None and not _has_signal(row, rows, majority, task):
                partner = (partner[0], partner[1] + " (no signal: majority class)", partner[2])
            claim = _difference(row["vs_claim"], row["claim_reference"])
            f1 = f", F1 {row['f1']:.3f}" if row["f1"] is not None else ""
            lines.append(
                f"| {row['label']}{mark} | {', '.join(f'{lr:g}' for lr in row['lr'])} | {len(row['seeds'])} | "
                f"{row['accuracy']:.4f} ± {row['std']:.4f}{f1} | {partner[0]} | {partner[1]} | {partner[2]} | "
                f"{claim[0]} | {claim[1]} | {_versus_base(row, base.get(task))} | {row['trainable_params']:,} | "
                f"{row['train_flops']:.3g} | {_inference_flops(row)} | "
                f"{row['train_wall_s']:.0f} s | {_start_distance(row)} |"
            )
    lines += [
        "",
        "Start distance (`peft_depth.analysis.distance_from_base`, the untrained adapter on the first training batch): "
        "how far the method starts from the base model, 0 being exactly the base. KL: KL(base ‖ adapted) of the "
        "next-token distributions, nats per position (decoders). Δh: mean ‖h_adapted − h_base‖ / ‖h_base‖ of the "
        "final hidden states over real tokens (what a classifier head reads; an encoder's new head is random, so "
        "its KL is not shown). Inference FLOPs / token (`inference_cost`): the trained adapter's forward on the "
        "first 16 scored rows, each alone (no padding); what DLO's router saves shows here, not in its training "
        "FLOPs (its training runs every token's MLP, for the labels). (n seeds): measured on n seeds only, from "
        "kept adapters of runs older than the field. – : not recorded (older runs).",
    ]
    summary_rows = [row for rows in summarise(latest_test_results(tests, scorer)).values() for row in rows]
    if any(row["voting"] and not row["batch_dependent"] for row in summary_rows):
        lines += [
            "",
            "MoLEx `batch_vote` arms without † were scored one row per batch: each row's expert layer is chosen by "
            "a vote over its own tokens, as for a request served alone.",
        ]
    if any(row["batch_dependent"] for row in summary_rows):
        lines += [
            "",
            "† Routes by a vote over the whole evaluation batch (MoLEx `batch_vote`): its accuracy depends on how the "
            "scorer batches rows (size, order, padding), so it is comparable only under the same scorer; "
            "`crosscheck.md` measures how much.",
        ]
    return "\n".join(lines) + "\n"


def plot(
    records: list[dict[str, Any]],
    path: str | Path,
    scorer: str | None = None,
    majority: dict[str, float] | None = None,
    base: dict[str, float] | None = None,
) -> None:
    """Write ``accuracy_figure`` to ``path`` (nothing when there are no test results)."""
    figure = accuracy_figure(records, scorer, majority, base)
    if figure is None:
        return
    import matplotlib.pyplot as plt

    figure.savefig(path, dpi=120)
    plt.close(figure)


def accuracy_figure(
    records: list[dict[str, Any]],
    scorer: str | None = None,
    majority: dict[str, float] | None = None,
    base: dict[str, float] | None = None,
) -> Figure | None:
    """Accuracy per seed and mean (top, with the majority-class rate dashed and the untrained base dotted), paired
    difference to the budget-matched LoRA with its interval (bottom); a matplotlib Figure, None without test results."""
    base = base or {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summarise(latest_test_results(records, scorer))
    if not table:
        return None
    figure, axes = plt.subplots(2, len(table), figsize=(4.5 * len(table), 7), squeeze=False)
    for column, (task, rows) in enumerate(table.items()):
        top, bottom = axes[0][column], axes[1][column]
        for x, row in enumerate(rows):
            top.scatter([x] * len(row["accuracies"]), row["accuracies"], s=14, color="tab:blue", alpha=0.7)
            top.hlines(row["accuracy"], x - 0.3, x + 0.3, color="black")
            summary = row["vs_partner"]
            if summary is not None:
                bottom.errorbar(
                    x,
                    100 * summary.mean,
                    yerr=[[100 * (summary.mean - summary.low)], [100 * (summary.high - summary.mean)]],
                    fmt="o",
                    color="tab:red"
                    if summary.excludes_zero and _has_signal(row, rows, majority, task)
                    else "tab:gray",
                    capsize=3,
                )
        labels = [row["label"] for row in rows]
        for axis in (top, bottom):
            axis.set_xticks(range(len(rows)))
            axis.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        if majority and task in majority:
            top.axhline(majority[task], color="tab:gray", linestyle="--", linewidth=0.8, label="majority class")
        if task in base:
            top.axhline(base[task], color="tab:green", linestyle=":", linewidth=1.0, label="base model (untrained)")
        top.set_title(task)
        top.set_ylabel("test accuracy")
        bottom.axhline(0, color="black", linewidth=0.8)
        bottom.set_ylabel("Δ vs matched LoRA (pp), 95% CI")
    # One legend above the panels: inside a panel it covered the arms scored near a floor (SciQ's DLO at 0.236,
    # SST-2's MoLEx + LoRA at 0.511), exactly the points the floors are drawn to be read against.
    floors = {label: handle for axis in axes[0] for handle, label in zip(*axis.get_legend_handles_labels())}
    if floors:
        figure.legend(list(floors.values()), list(floors), loc="upper center", ncol=len(floors), fontsize=8)
        figure.tight_layout(rect=(0, 0, 1, 0.96))
    else:
        figure.tight_layout()
    return figure


def _has_signal(row: dict[str, Any], rows: list[dict[str, Any]], majority: dict[str, float] | None, task: str) -> bool:
    """Whether the arm or its LoRA partner clears the majority class beyond test noise (else: no signal)."""
    if not majority or task not in majority:
        return True
    partner = next((r for r in rows if r["arm"] == row["partner"]), None)
    accuracies = [row["accuracy"]] + ([partner["accuracy"]] if partner else [])
    return any(clears_majority(a, majority[task], row["test_rows"]) for a in accuracies)


def _majority_rates(records: list[dict[str, Any]]) -> dict[str, float]:
    from .data import majority_rate

    rates = {}
    for task in {r["task"] for r in records}:
        try:
            rates[task] = majority_rate(task)
        except (FileNotFoundError, ValueError):  # a task whose data is not here: the report leaves the floor out
            continue
    return rates


def runs_of_the_current_recipe(
    records: list[dict[str, Any]], run_keys: set[str] | None
) -> tuple[list[dict[str, Any]], int]:
    """``(records of the runs in run_keys, how many test records were left out)``; all records when ``run_keys`` is
    None. A report pairs runs by seed: a record of another recipe (other steps, model or config default) must never
    stand in for one of the current recipe."""
    if run_keys is None:
        return records, 0
    kept = [r for r in records if r["run_key"] in run_keys]
    left_out = sum(r["split"] == "test" for r in records) - sum(r["split"] == "test" for r in kept)
    return kept, left_out


def write_report(
    records: list[dict[str, Any]],
    suite: str,
    folder: str | Path,
    scorer: str | None = None,
    run_keys: set[str] | None = None,
    lr_from: str | None = None,
) -> Path:
    """Write ``<suite>.md`` and ``<suite>.png`` into ``folder``; returns the markdown path. ``run_keys``: the
    training runs the suite asks for now (``sweep.current_run_keys``); records of other runs are left out.
    ``lr_from``: as in ``render_markdown``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    markdown = folder / f"{suite}.md"
    figure = folder / f"{suite}.png"
    records, left_out = runs_of_the_current_recipe(records, run_keys)
    records = with_inference_flops(records, read_records(inference_ledger_path(suite, folder)))
    majority = _majority_rates(records)
    tests = [r for r in records if r["split"] == "test" and (scorer is None or r.get("scorer") == scorer)]
    base = base_accuracies(read_records(base_ledger_path(suite, folder)), tests)
    text = render_markdown(records, suite, scorer, majority, base, lr_from)
    if left_out:
        text += (
            f"\n{left_out} test record(s) of runs this suite no longer asks for (another recipe, model or config "
            "default) are in the ledger and left out of this report.\n"
        )
    if any(r["split"] == "test" for r in records):
        plot(records, figure, scorer, majority, base)
        text += f"\n![{suite}]({figure.name})\n"
    markdown.write_text(text)
    return markdown
