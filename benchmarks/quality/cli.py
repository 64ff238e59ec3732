"""Command line of the quality harness: budgets, measure, plan, run, base, inference-flops, report, verdicts,
crosscheck."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from .cpu_arithmetic import require_fast_bf16

__all__ = ["build_parser", "main"]


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N such as 0/2, got {text!r}") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"expected 0 <= I < N, got {text!r}")
    return index, count


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _csv(text: str) -> list[str]:
    return [part for part in text.split(",") if part]


def build_parser() -> argparse.ArgumentParser:
    from .sweep import RESULTS, SUITES
    from .train_causal import PRECISIONS

    parser = argparse.ArgumentParser(prog="quality.py", description=__doc__)
    parser.add_argument("--threads", type=_positive, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--allow-slow-bf16",
        action="store_true",
        help="run a bf16-mixed suite on a CPU without native bf16 products (refused by default: cpu_arithmetic.py)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    budgets = commands.add_parser("budgets", help="print the matched-budget pairing table of a model's arms")
    budgets.add_argument("--model", default="smollm2", help="smollm2, minilm or a local model folder")
    budgets.add_argument("--task", default=None, help="task (encoders: the MoLEx preset depends on it)")

    measure = commands.add_parser("measure", help="time one training step of every arm (writes step_times_*.json)")
    measure.add_argument("--model", default="smollm2")
    measure.add_argument("--task", default="boolq")
    measure.add_argument("--suite", default=None, help="take batch size and max length from this suite")
    measure.add_argument("--steps", type=_positive, default=3, help="steps per arm; the first is a warm-up")
    measure.add_argument("--arms", type=_csv, default=None, help="comma list of arms (default: all)")
    measure.add_argument("--precision", choices=PRECISIONS, default=None, help="override the suite's arithmetic")
    measure.add_argument("--output", default=None, help="default: results/quality/step_times_<model>.json")

    plan = commands.add_parser("plan", help="write the sweep plan with its CPU-hour estimate")
    plan.add_argument("--suites", type=_csv, default=list(SUITES))
    plan.add_argument("--output", default=str(RESULTS / "plan.md"))

    run = commands.add_parser("run", help="run (or resume) a suite's sweep, appending to its JSONL")
    run.add_argument("--suite", required=True, choices=sorted(SUITES))
    run.add_argument("--shard", type=_shard, default=(0, 1), help="I/N: run only this share of the (task, arm)s")
    run.add_argument("--model", default=None, help="override the suite's model (a local folder, for smoke runs)")
    run.add_argument("--tasks", type=_csv, default=None, help="override the suite's tasks (jsonl:DIR allowed)")
    run.add_argument("--arms", type=_csv, default=None, help="only these arms (LoRA partners are kept)")
    run.add_argument("--seeds", type=lambda t: tuple(int(s) for s in _csv(t)), default=None)
    run.add_argument("--steps", type=_positive, default=None, help="override the training steps (smoke runs)")
    run.add_argument("--batch-size", type=_positive, default=None)
    run.add_argument("--precision", choices=PRECISIONS, default=None, help="override the suite's arithmetic")
    run.add_argument("--scorer", choices=("peft_depth", "lm_eval"), default=None, help="override the test scorer")
    run.add_argument("--results-dir", default=str(RESULTS), help="where the JSONL ledger lives")
    run.add_argument("--adapters-dir", default=None, help="where dev-phase adapters are kept (default outputs/)")
    run.add_argument("--no-progress", action="store_true")
    run.add_argument(
        "--in-process",
        action="store_true",
        help="run every run in this process (default: each in a fresh process, so no run inherits another's memory)",
    )

    base = commands.add_parser("base", help="score the untrained base model on the suite's test splits")
    base.add_argument("--suite", required=True, choices=sorted(SUITES))
    base.add_argument("--model", default=None, help="override the suite's model (a local folder, for smoke runs)")
    base.add_argument("--tasks", type=_csv, default=None, help="override the suite's tasks (jsonl:DIR allowed)")
    base.add_argument("--precision", choices=PRECISIONS, default=None, help="override the suite's arithmetic")
    base.add_argument("--scorer", choices=("peft_depth", "lm_eval"), default=None, help="override the test scorer")
    base.add_argument("--results-dir", default=str(RESULTS), help="where <suite>-base.jsonl lives")
    base.set_defaults(steps=None, batch_size=None, seeds=None)  # what `_suite` reads; the base is not trained

    inference = commands.add_parser(
        "inference-flops", help="count inference FLOPs/token of finished runs that lack it, from their kept adapters"
    )
    inference.add_argument("--suite", required=True, choices=sorted(SUITES))
    inference.add_argument(
        "--arms", type=_csv, default=None, help="comma list (default: the arms of FLOPs claims and their references)"
    )
    inference.add_argument("--results-dir", default=str(RESULTS), help="where <suite>-inference.jsonl goes")
    inference.add_argument("--adapters-dir", default=None, help="where the kept adapters are (default outputs/)")
    inference.set_defaults(
        model=None, tasks=None, steps=None, batch_size=None, seeds=None, precision=None, scorer=None
    )

    report = commands.add_parser("report", help="write <suite>.md and <suite>.png from the suite's JSONL")
    report.add_argument("--suite", required=True)
    report.add_argument("--scorer", default=None, help="only test records of this scorer (default: the suite's)")
    report.add_argument("--results-dir", default=str(RESULTS))

    verdicts = commands.add_parser("verdicts", help="write verdicts.md: each claim's verdict from every suite's JSONL")
    verdicts.add_argument("--results-dir", default=str(RESULTS))
    check = commands.add_parser("crosscheck", help="our scorer vs lm-evaluation-harness on the same rows")
    check.add_argument("--model", default="smollm2")
    check.add_argument("--tasks", type=_csv, default=["boolq", "piqa"])
    check.add_argument("--rows", type=_positive, default=100, help="test rows per task")
    check.add_argument("--arm", default="lora", help="adapter (random, non-zero LoRA weights; 'none' = base)")
    check.add_argument("--output", default=str(RESULTS / "crosscheck.json"))
    return parser


def _suite(args):
    from .sweep import SUITES

    suite = SUITES[args.suite]
    settings = suite.settings
    task_steps = suite.task_steps
    if args.steps is not None:
        settings, task_steps = replace(settings, steps=args.steps), ()
    if args.batch_size is not None:
        settings = replace(settings, batch_size=args.batch_size)
    if args.precision is not None:
        settings = replace(settings, precision=args.precision)
    require_fast_bf16(settings.precision, args.allow_slow_bf16)  # before any work: models, data, runs
    return replace(
        suite,
        model=args.model or suite.model,
        tasks=tuple(args.tasks) if args.tasks else suite.tasks,
        seeds=args.seeds or suite.seeds,
        settings=settings,
        task_steps=task_steps,
        test_scorer=args.scorer or suite.test_scorer,
    )


def _print_budgets(spec, tasks, only) -> None:
    from .budget import format_budget_table, task_arms

    for task in dict.fromkeys(tasks):
        arms, rows = task_arms(spec, task, tuple(only) if only else None)
        print(f"budget pairings on {task}:\n{format_budget_table(rows, arms)}", flush=True)


def _budgets(args) -> int:
    from .models import resolve_model

    _print_budgets(resolve_model(args.model), [args.task], None)
    return 0


def _run(args) -> int:
    from .models import resolve_model
    from .sweep import ADAPTERS, run_suite

    suite = _suite(args)
    spec = resolve_model(suite.model)
    only = tuple(args.arms) if args.arms else None
    _print_budgets(spec, suite.tasks, only)
    adapters = Path(args.adapters_dir) if args.adapters_dir else ADAPTERS
    for record in run_suite(
        suite,
        spec,
        Path(args.results_dir),
        adapters,
        args.shard,
        only,
        progress=not args.no_progress,
        isolate=not args.in_process,
    ):
        print(
            f"{record['task']} {record['arm']} lr={record['lr']:g} seed={record['seed']} {record['split']}: "
            f"accuracy {record['accuracy']:.4f} ({record['wall_s']:.0f} s)",
            flush=True,
        )
    return 0


def _measure(args) -> int:
    from .budget import task_arms
    from .data import load_splits
    from .models import resolve_model
    from .sweep import RESULTS, SUITES
    from .timing import measure

    spec = resolve_model(args.model)
    suites = [SUITES[args.suite]] if args.suite else [s for s in SUITES.values() if s.model == args.model]
    if not suites:
        raise SystemExit(f"quality.py measure: no suite uses {args.model!r}; name one with --suite for its settings.")
    suite = suites[0]
    settings = replace(suite.settings, steps=args.steps, precision=args.precision or suite.settings.precision)
    require_fast_bf16(settings.precision, args.allow_slow_bf16)
    _print_budgets(spec, [args.task], args.arms)
    arms = task_arms(spec, args.task, tuple(args.arms) if args.arms else None)[0]
    output = args.output or RESULTS / f"step_times_{spec.name}.json"
    measure(spec, args.task, load_splits(args.task), arms, settings, output=output)
    print(f"wrote {output}")
    return 0


def _plan(args) -> int:
    from .models import resolve_model
    from .plan import load_timing, render_plan, suite_cost
    from .sweep import RESULTS, SUITES

    checks = RESULTS / "crosscheck.json"
    crosschecks = json.loads(checks.read_text()) if checks.is_file() else []
    entries = []
    for name in args.suites:
        suite = SUITES[name]
        spec = resolve_model(suite.model)
        timing = load_timing(RESULTS / f"step_times_{spec.name}.json")
        entries.append((suite, spec, timing, suite_cost(suite, spec, timing, crosschecks)))
    Path(args.output).write_text(render_plan(entries, crosschecks))
    print(f"wrote {args.output}")
    return 0


def _base(args) -> int:
    from .base_scores import run_base
    from .models import resolve_model

    suite = _suite(args)
    for record in run_base(suite, resolve_model(suite.model), Path(args.results_dir)):
        print(
            f"base {record['task']}: {record['accuracy']:.4f} ({record['scorer']}, {record['precision']})", flush=True
        )
    return 0


def _inference_flops(args) -> int:
    from .arms import arms_for
    from .inference_cost import FIELD, backfill_inference_flops
    from .models import resolve_model
    from .sweep import ADAPTERS

    suite = _suite(args)
    spec = resolve_model(suite.model)
    arms = args.arms
    if arms is None:
        claimed = [arm for arm in arms_for(spec) if any(claim.fewer_flops for claim in arm.claims)]
        arms = [name for arm in claimed for name in (arm.name, arm.claim_reference) if name]
    adapters = Path(args.adapters_dir) if args.adapters_dir else ADAPTERS
    for side in backfill_inference_flops(suite, spec, Path(args.results_dir), adapters, tuple(dict.fromkeys(arms))):
        print(f"{side['task']} {side['arm']} seed={side['seed']} {side['split']}: {side[FIELD]:.4g} FLOPs/token")
    return 0


def suite_run_keys(suite, records: list[dict], results_dir: Path) -> set[str]:
    """``sweep.current_run_keys`` of ``suite`` (an indicative suite's rates come from its source suite's ledger)."""
    from .ledger import read_records
    from .models import resolve_model
    from .sweep import current_run_keys, ledger_path

    lr_from = read_records(ledger_path(suite.lr_from, results_dir)) if suite.indicative else None
    return current_run_keys(suite, resolve_model(suite.model), records, lr_from)


def _report(args) -> int:
    from .ledger import read_records
    from .report import write_report
    from .sweep import SUITES, ledger_path

    scorer = args.scorer or (SUITES[args.suite].test_scorer if args.suite in SUITES else None)
    records = read_records(ledger_path(args.suite, Path(args.results_dir)))
    run_keys = lr_from = None
    if args.suite in SUITES:
        run_keys = suite_run_keys(SUITES[args.suite], records, Path(args.results_dir))
        lr_from = SUITES[args.suite].lr_from
    path = write_report(records, args.suite, args.results_dir, scorer, run_keys, lr_from)
    print(f"wrote {path}")
    return 0


def _verdicts(args) -> int:
    from .sweep import SUITES
    from .verdicts import write_verdicts

    results_dir = Path(args.results_dir)
    path = write_verdicts(results_dir, SUITES, lambda suite, records: suite_run_keys(suite, records, results_dir))
    print(f"wrote {path}")
    return 0


def _crosscheck(args) -> int:
    from peft import get_peft_model

    from .arms import arm_by_name, arms_for, build_config
    from .crosscheck import crosscheck, render_crosscheck
    from .data import load_splits
    from .models import load_model, load_tokenizer, resolve_model

    spec = resolve_model(args.model)
    tokenizer = load_tokenizer(spec)
    model = load_model(spec)
    if args.arm != "none":
        config = build_config(arm_by_name(arms_for(spec), args.arm), spec)
        config.init_lora_weights = False  # random B: the adapter changes the outputs, so it is really scored
        model = get_peft_model(model, config)
    model.eval()
    results = []
    for task in args.tasks:
        result = crosscheck(model, tokenizer, task, load_splits(task).test[: args.rows])
        print(json.dumps(result), flush=True)
        results.append({**result, "model": spec.name, "arm": args.arm})
    output = Path(args.output)
    earlier = json.loads(output.read_text()) if output.is_file() else []
    keep = [
        r
        for r in earlier
        if (r["model"], r["arm"], r["task"]) not in {(x["model"], x["arm"], x["task"]) for x in results}
    ]
    results = keep + results
    output.write_text(json.dumps(results, indent=1) + "\n")
    output.with_suffix(".md").write_text(render_crosscheck(results, spec.note))
    print(f"wrote {output} and {output.with_suffix('.md')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    handlers = {
        "budgets": _budgets,
        "measure": _measure,
        "plan": _plan,
        "run": _run,
        "base": _base,
        "inference-flops": _inference_flops,
        "report": _report,
        "crosscheck": _crosscheck,
        "verdicts": _verdicts,
    }
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
