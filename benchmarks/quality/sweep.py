"""Which runs a sweep needs, the learning rate each arm gets, and the resumable loop that runs them.

A suite is a model, its tasks, seeds and one training recipe. For every task, arm by arm:

1. **dev phase**: the arm trains once (seed ``grid_seed``) at every learning rate of its grid and is scored on the
   dev split (this repository's scorer); the adapter is kept.
2. **test phase**: the arm's learning rate is the grid value with the best dev accuracy (ties: the smaller); the
   arm trains at it with every seed and is scored on the test split with the suite's test scorer. Seed ``grid_seed``
   reuses the dev phase's adapter (the same training run), so it is scored, not trained again.

An *indicative* suite has no dev phase: an arm takes the learning rate with the best dev accuracy averaged over the
tasks of the suite named in ``lr_from``, and runs one seed.

Every finished (training run, split) is a line of the suite's JSONL; a restarted sweep skips the lines it finds, so
it resumes where it stopped (a run cut off mid-training is simply run again).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .arms import Arm
from .budget import task_arms
from .claims import claim_group, claim_holder, claims_folder
from .data import TaskSplits, load_splits
from .isolation import CodeSnapshot, execute_in_child
from .ledger import finished_keys, read_records
from .models import ModelSpec
from .provenance import git_state
from .runner import LM_EVAL, OURS, RunRequest, execute
from .train_causal import RunSettings

__all__ = [
    "current_run_keys",
    "Suite",
    "SUITES",
    "ledger_path",
    "choose_lr",
    "borrowed_lr",
    "source_dev_keys",
    "dev_requests",
    "test_requests",
    "run_suite",
    "RESULTS",
]

RESULTS = Path(__file__).resolve().parents[1] / "results" / "quality"
ADAPTERS = Path(__file__).resolve().parents[2] / "outputs" / "quality" / "adapters"


@dataclass(frozen=True)
class Suite:
    name: str
    model: str
    tasks: tuple[str, ...]
    seeds: tuple[int, ...]
    settings: RunSettings
    test_scorer: str = LM_EVAL
    lr_from: str | None = None
    grid_seed: int = 0
    eval_batch_size: int = 16
    #: (task, steps) pairs overriding ``settings.steps`` for that task (long-prompt tasks cost more per step).
    task_steps: tuple[tuple[str, int], ...] = ()

    @property
    def indicative(self) -> bool:
        return self.lr_from is not None

    def settings_for(self, task: str) -> RunSettings:
        return replace(self.settings, steps=dict(self.task_steps).get(task, self.settings.steps))


#: The sweeps of issue 14. Steps per task were chosen from the measured step times to fit the CPU budget (see
#: results/quality/plan.md): BoolQ's long passages make its steps ~3x PIQA's and its 2,000-row test set dominates;
#: MiniLM's GLUE train sets are a few hundred rows, so their steps stop at about 8-10 epochs.
SUITES: dict[str, Suite] = {
    suite.name: suite
    for suite in (
        Suite(
            "smollm2-main",
            "smollm2",
            ("boolq", "piqa"),
            (0, 1, 2),
            # bf16 mixed precision: 1.8x faster training steps and 2.9x faster scoring than fp32 on this CPU
            # (AVX-512 BF16), the same predictions on 64 BoolQ rows (plan.md).
            RunSettings(steps=100, batch_size=8, precision="bf16-mixed"),
            # Issue 14: the final numbers come from lm-evaluation-harness (dev-split LR choice uses ours, cheaper;
            # crosscheck.md: both agree row for row except batch-voting MoLEx).
            test_scorer=LM_EVAL,
            # BoolQ trains as long as PIQA: at 40 steps SmolLM2 only learned to answer "yes" (0.61 against the
            # majority class's 0.62, main_job_tasks.md), which no method comparison can be read from.
        ),
        Suite(
            "smollm2-indicative",
            "smollm2",
            ("arc_easy", "arc_challenge", "sciq", "sst2"),
            (0,),
            RunSettings(steps=60, batch_size=8, precision="bf16-mixed"),
            test_scorer=OURS,
            lr_from="smollm2-main",
        ),
        Suite(
            "minilm",
            "minilm",
            ("sst2", "mrpc", "rte", "boolq"),
            (0, 1, 2, 3, 4),
            RunSettings(steps=120, batch_size=16, max_length=256),
            test_scorer=OURS,
            task_steps=(("sst2", 250), ("rte", 80)),
        ),
    )
}


def ledger_path(suite: str, results: Path = RESULTS) -> Path:
    return results / f"{suite}.jsonl"


def choose_lr(arm: Arm, dev_accuracy: dict[float, float]) -> float:
    """The grid value with the best dev accuracy; ties go to the smaller learning rate. Every grid value needed."""
    missing = [lr for lr in arm.lr_grid if lr not in dev_accuracy]
    if missing:
        raise ValueError(f"Arm {arm.name!r} has no dev result at lr {missing}; run its dev phase first.")
    return max(sorted(arm.lr_grid), key=lambda lr: (dev_accuracy[lr], -lr))


def _dev_scores(
    records: list[dict[str, Any]], task: str | None = None, run_keys: set[str] | None = None
) -> dict[tuple[str, str], dict[float, float]]:
    """(task, arm) -> {lr: dev accuracy} from dev records (mean when a grid point was run more than once).

    ``run_keys``: only records of these training runs - the dev runs the suite asks for now, so a record of another
    recipe left in the ledger (e.g. another precision, or an older config default) never picks a learning rate.
    """
    found: dict[tuple[str, str], dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        if run_keys is not None and record["run_key"] not in run_keys:
            continue
        if record["split"] == "dev" and (task is None or record["task"] == task):
            found[(record["task"], record["arm"])][record["lr"]].append(record["accuracy"])
    return {key: {lr: statistics.fmean(v) for lr, v in by_lr.items()} for key, by_lr in found.items()}


def _request(suite: Suite, spec: ModelSpec, task: str, splits: TaskSplits, arm: Arm, **fields) -> RunRequest:
    return RunRequest(
        suite=suite.name,
        model=spec,
        task=task,
        splits=splits,
        arm=arm,
        settings=suite.settings_for(task),
        eval_batch_size=suite.eval_batch_size,
        **fields,
    )


def dev_requests(suite: Suite, spec: ModelSpec, task: str, splits: TaskSplits, arms: list[Arm]) -> list[RunRequest]:
    if suite.indicative:
        return []
    return [
        _request(suite, spec, task, splits, arm, lr=lr, seed=suite.grid_seed, split="dev", scorer=OURS)
        for arm in arms
        for lr in arm.lr_grid
    ]


def _lr_for(
    suite: Suite,
    spec: ModelSpec,
    task: str,
    splits: TaskSplits,
    arm: Arm,
    records: list[dict[str, Any]],
    lr_from: list[dict[str, Any]],
) -> float:
    if not suite.indicative:
        keys = {request.run_key for request in dev_requests(suite, spec, task, splits, [arm])}
        return choose_lr(arm, _dev_scores(records, task, keys).get((task, arm.name), {}))
    return borrowed_lr(suite, arm, lr_from, source_dev_keys(suite, spec, arm))


def source_dev_keys(suite: Suite, spec: ModelSpec, arm: Arm, splits_of=load_splits) -> set[str]:
    """Run keys of the dev runs of ``arm`` that the suite named in ``suite.lr_from`` asks for now, on every task."""
    source = SUITES[suite.lr_from]
    keys: set[str] = set()
    for task in source.tasks:
        source_arms = [a for a in task_arms(spec, task, (arm.name,))[0] if a.name == arm.name]
        keys |= {r.run_key for r in dev_requests(source, spec, task, splits_of(task), source_arms)}
    return keys


def borrowed_lr(suite: Suite, arm: Arm, lr_from: list[dict[str, Any]], source_keys: set[str]) -> float:
    """An indicative suite's learning rate for ``arm``: the grid value with the best dev accuracy averaged over every
    task of the suite named in ``suite.lr_from`` (``lr_from``: that suite's records; ``source_keys``: the run keys of
    its current dev runs, ``source_dev_keys``, so a smoke run or an older recipe in its ledger never counts)."""
    source = SUITES[suite.lr_from]
    same_recipe = [r for r in lr_from if r.get("precision", "fp32") == suite.settings.precision]
    scores = _dev_scores(same_recipe, run_keys=source_keys)
    # Every task of the source suite at every grid value: averaging over the tasks that happen to be done would give
    # a rate that changes once the source suite finishes, with nothing in the record to say so.
    missing = {
        source_task: [lr for lr in arm.lr_grid if lr not in scores.get((source_task, arm.name), {})]
        for source_task in source.tasks
    }
    missing = {source_task: lrs for source_task, lrs in missing.items() if lrs}
    if missing:
        raise ValueError(
            f"Suite {suite.name!r} takes arm {arm.name!r}'s learning rate from the dev phase of {source.name!r} on "
            f"all of its tasks {list(source.tasks)}, which has no {suite.settings.precision} dev result at "
            f"{'; '.join(f'{t} lr {lrs}' for t, lrs in missing.items())}; run `quality.py run --suite {source.name}` "
            "first."
        )
    averaged = {lr: statistics.fmean(scores[(t, arm.name)][lr] for t in source.tasks) for lr in arm.lr_grid}
    return choose_lr(arm, averaged)


def test_requests(
    suite: Suite,
    spec: ModelSpec,
    task: str,
    splits: TaskSplits,
    arms: list[Arm],
    records: list[dict[str, Any]],
    lr_from: list[dict[str, Any]] | None = None,
) -> list[RunRequest]:
    """Test runs of every arm at its chosen learning rate (needs the dev phase's records)."""
    return [
        _request(
            suite,
            spec,
            task,
            splits,
            arm,
            lr=_lr_for(suite, spec, task, splits, arm, records, lr_from or []),
            seed=seed,
            split="test",
            scorer=suite.test_scorer,
        )
        for arm in arms
        for seed in suite.seeds
    ]


def shard_of_arms(arms: list[Arm], count: int, runs_of: Callable[[Arm], int]) -> dict[str, int]:
    """Which shard runs each arm of one task: whole (task, arm) groups, so a shard chooses its arms' learning rates
    by itself, and about equal run counts per shard (largest group first, each to the least loaded shard), so no
    shard is left with one task's whole sweep while the other moves on. Depends only on the arms, never on the
    ledger, so processes started at different times agree."""
    loads = [0] * count
    shard_by_name: dict[str, int] = {}
    for arm in sorted(arms, key=lambda arm: (-runs_of(arm), arm.name)):
        target = min(range(count), key=lambda index: (loads[index], index))
        shard_by_name[arm.name] = target
        loads[target] += runs_of(arm)
    return shard_by_name


def current_run_keys(
    suite: Suite,
    spec: ModelSpec,
    records: list[dict[str, Any]],
    lr_from: list[dict[str, Any]] | None = None,
    splits_of=load_splits,
) -> set[str]:
    """Run keys of every training run ``suite`` asks for now (diagnostic arms included): its dev runs, and the test
    runs of every arm whose dev phase has chosen a learning rate. A report or a verdict pairs only these records, so
    a record of another recipe (a smoke run with other steps or another model, or an older config default left in
    the ledger while a resumed sweep redoes the arms one by one) is never paired with one of the current recipe."""
    from .arms import arms_for

    every_arm = tuple(arm.name for arm in arms_for(spec))
    keys: set[str] = set()
    for task in suite.tasks:
        arms, _ = task_arms(spec, task, every_arm)
        splits = splits_of(task)
        for arm in arms:
            keys |= {request.run_key for request in dev_requests(suite, spec, task, splits, [arm])}
            try:
                tests = test_requests(suite, spec, task, splits, [arm], records, lr_from)
            except ValueError:  # its dev phase is unfinished: it has no test run yet
                continue
            keys |= {request.run_key for request in tests}
    return keys


def run_suite(
    suite: Suite,
    spec: ModelSpec,
    results: Path = RESULTS,
    adapters: Path | None = ADAPTERS,
    shard: tuple[int, int] = (0, 1),
    only: tuple[str, ...] | None = None,
    splits_of=load_splits,
    progress: bool = True,
    isolate: bool = False,
) -> Iterator[dict[str, Any]]:
    """Run every pending run of the suite (task by task, arm by arm: its dev runs, then its test runs); yields each
    new record.

    Each task's arms and LoRA partners come from ``budget.task_arms`` (``only``: these arms and their partners).
    ``shard=(i, n)`` runs first the (task, arm) groups ``shard_of_arms`` gives shard i, then any group no live
    process has claimed (``claims``), so n processes can share a sweep (and its ledger) and none idles while work is
    left; the progress bar counts the other processes' runs as done. ``isolate``: each run in a
    fresh process running the code as it was at the start (``isolation``), so no run inherits another's memory.
    """
    from tqdm.auto import tqdm

    git_state()  # the code this process runs is the code as it is now, whatever is committed while it runs
    snapshot = CodeSnapshot() if isolate else None
    if suite.test_scorer == LM_EVAL:
        from . import lm_eval_scorer  # noqa: F401  imported now, so a later edit cannot change this sweep's scoring
    ledger = ledger_path(suite.name, results)
    lr_from = read_records(ledger_path(suite.lr_from, results)) if suite.indicative else None
    plans = {task: task_arms(spec, task, only) for task in suite.tasks}

    def runs_of(arm: Arm) -> int:
        return len(suite.seeds) + (0 if suite.indicative else len(arm.lr_grid))

    if suite.indicative:
        for arms, _ in plans.values():
            for arm in arms:
                # an unfinished source suite stops the sweep before any work
                borrowed_lr(suite, arm, lr_from, source_dev_keys(suite, spec, arm, splits_of))
    total = sum(runs_of(arm) for arms, _ in plans.values() for arm in arms)
    bar = tqdm(total=total, desc=suite.name, unit="run", disable=not progress)
    claims = claims_folder(ledger)
    for task in suite.tasks:
        arms, budgets = plans[task]
        partners = {row.arm: row.partner for row in budgets}
        shard_by_name = shard_of_arms(arms, shard[1], runs_of)
        # Its own groups first, then any group no live process has started (claims.py).
        order = sorted(arms, key=lambda arm: shard_by_name[arm.name] != shard[0])
        splits = None
        for arm in order:
            with claim_group(claims, task, arm.name) as claimed:
                if not claimed:
                    bar.update(runs_of(arm))  # another process runs it
                    holder = claim_holder(claims, task, arm.name)
                    tqdm.write(f"{task} / {arm.name}: left to the sweep process holding its claim (pid {holder})")
                    continue
                splits = splits or splits_of(task)
                for phase in ("dev", "test"):
                    records = read_records(ledger)  # other processes append too
                    done = finished_keys(records)
                    if phase == "dev":
                        requests = dev_requests(suite, spec, task, splits, [arm])
                    else:
                        requests = test_requests(suite, spec, task, splits, [arm], records, lr_from)
                    todo = [r for r in requests if r.record_key not in done]
                    bar.update(len(requests) - len(todo))
                    trained_by = {r["run_key"]: r for r in records if r["split"] == "dev"}
                    for request in todo:
                        request = replace(request, partner=partners.get(request.arm.name, request.arm.name))
                        bar.set_postfix_str(f"{task} {request.arm.name} lr={request.lr:g} seed={request.seed} {phase}")
                        if snapshot is not None:
                            record = execute_in_child(request, ledger, adapters, trained_by, snapshot)
                        else:
                            record = execute(request, ledger, adapters, trained_by)
                        bar.update(1)
                        yield record
    bar.close()
    if snapshot is not None:
        snapshot.close()
