"""One run of the sweep: train (or reuse a saved adapter of the same training run), score one split, append a record.

A training run is identified by ``run_key`` (model, task data, arm config, learning rate, seed, settings). Its dev
run saves the adapter; when the same training run is later needed on the test split (the learning rate chosen on
dev, seed 0), that adapter is loaded and scored instead of training again. Records of both carry the training's
cost and provenance.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft import PeftModel

from .arms import Arm, build_config
from .data import TaskSplits, choice_examples, pair_examples
from .exclusive import one_at_a_time
from .inference_cost import FIELD as INFERENCE_FLOPS
from .inference_cost import INFERENCE_ROWS, inference_flops_per_token
from .ledger import append_record, record_key, run_key, to_jsonable
from .models import CAUSAL, ModelSpec, load_model, load_tokenizer, run_device
from .provenance import device_kind, git_state, hardware, model_device, versions
from .train_causal import RunSettings, TrainedModel, compute_precision, train_causal
from .train_encoder import predict, train_encoder

__all__ = ["RunRequest", "execute", "OURS", "LM_EVAL", "SCORERS"]

OURS = "peft_depth"
LM_EVAL = "lm_eval"
SCORERS = (OURS, LM_EVAL)
#: What a record says about the training run (copied when a saved adapter of that run is scored again).
TRAINING_FIELDS = (
    "trainable_params",
    "train_flops",
    "train_wall_s",
    "train_examples_used",
    "train_examples_dropped",
    "final_train_loss",
    "start_distance",
)
PROVENANCE_FIELDS = ("hardware", "versions", "git_commit", "git_src_dirty")
#: Config fields that describe where a config came from, not what it trains: left out of run keys.
_METADATA_FIELDS = (
    "peft_version",
    "revision",
    "base_model_name_or_path",
    "auto_mapping",
    "inference_mode",
    "base_model_facts",
    "peft_depth_version",
)

#: Config fields added after the ledger's first runs, with the value those runs had before the field existed: left out
#: of the run key at that value, so the runs already done keep their keys (and nothing is trained twice).
_FIELDS_ADDED_LATER = {"expert_dropout": "shared", "shared_alpha": False, "self_choice_second_pass": False}


def _key_config(config: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for k, v in config.items()
        if k not in _METADATA_FIELDS and not (k in _FIELDS_ADDED_LATER and v == _FIELDS_ADDED_LATER[k])
    }


@dataclass(frozen=True)
class RunRequest:
    """One (training run, split to score) of a sweep."""

    suite: str
    model: ModelSpec
    task: str
    splits: TaskSplits
    arm: Arm
    lr: float
    seed: int
    settings: RunSettings
    split: str
    scorer: str = OURS
    eval_batch_size: int = 16
    #: The LoRA arm this arm's budget is matched with (recorded for the report; not part of the run key).
    partner: str | None = None

    def config(self):
        return build_config(self.arm, self.model, self.task, self.settings.steps)

    @property
    def run_key(self) -> str:
        config = _key_config(self.config().to_dict())
        return run_key(
            {
                "model": self.model.name,
                "task": self.task,
                "data": self.splits.fingerprint,
                "arm": self.arm.name,
                "config": config,
                "lr": self.lr,
                "seed": self.seed,
                "settings": self.settings.key_fields(),
            }
        )

    @property
    def record_key(self) -> str:
        return record_key(self.run_key, self.split, self.scorer)


def _train(request: RunRequest) -> TrainedModel:
    if request.model.family == CAUSAL:
        examples = choice_examples(request.task, request.splits.train)
        return train_causal(request.model, request.config(), examples, request.lr, request.seed, request.settings)
    pairs = pair_examples(request.task, request.splits.train)
    return train_encoder(request.model, request.config(), pairs, request.lr, request.seed, request.settings)


def scoring_batch_size(request: RunRequest) -> int:
    """Rows per lm-eval batch: 1 for a method that routes by a vote over the batch (MoLEx ``batch_vote``).

    Why: lm-eval batches rows longest first with their padding, so a batch vote would make each row's prediction
    depend on which rows (and how much padding) shared its batch. One row per batch, each row votes over its own
    tokens only: its score is the one a request served alone gets, whatever else is scored.
    """
    if request.config().to_dict().get("routing") == "batch_vote":
        return 1
    return request.eval_batch_size


def _score(request: RunRequest, model, tokenizer) -> dict[str, Any]:
    """Accuracy on the requested split (F1 too for MRPC), and per-row correctness where the scorer gives it."""
    rows = getattr(request.splits, request.split)
    if not rows:
        raise ValueError(f"Task {request.task!r} has no {request.split} rows.")
    if request.model.family != CAUSAL:
        from peft_depth.metrics import load_metric

        pairs = pair_examples(request.task, rows)
        predictions = predict(model, tokenizer, pairs, request.settings.max_length, request.eval_batch_size)
        references = [label for _, _, label in pairs]
        scores = {
            "accuracy": load_metric("accuracy").compute(predictions=predictions, references=references)["accuracy"]
        }
        if request.task == "mrpc":
            scores["f1"] = load_metric("f1").compute(predictions=predictions, references=references)["f1"]
        scores["correct"] = "".join("1" if p == r else "0" for p, r in zip(predictions, references))
        scores["eval_batch_size"] = request.eval_batch_size
        return scores
    if request.scorer == LM_EVAL:
        from .lm_eval_scorer import lm_eval_score

        batch_size = scoring_batch_size(request)
        with one_at_a_time("lm-eval-scoring"):  # its peak is the largest of a run (see exclusive.py)
            result = lm_eval_score(model, tokenizer, request.task, rows, batch_size)
        correct = "".join("1" if c else "0" for c in result.correct)
        return {"accuracy": result.accuracy, "correct": correct, "eval_batch_size": batch_size}
    from peft_depth.tasks import multiple_choice_accuracy

    examples = choice_examples(request.task, rows)
    accuracy = multiple_choice_accuracy(model, tokenizer, examples, batch_size=request.eval_batch_size)
    return {"accuracy": accuracy, "eval_batch_size": request.eval_batch_size}


def _save_adapter(model, folder: Path) -> None:
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    shutil.rmtree(folder, ignore_errors=True)  # a run retrained after its ledger line was lost replaces its adapter
    partial.rename(folder)  # a kill mid-save never leaves a folder that looks complete


def _training_fields(trained: TrainedModel) -> dict[str, Any]:
    values = (
        trained.trainable_params,
        trained.train_flops,
        trained.train_wall_s,
        trained.train_examples_used,
        trained.train_examples_dropped,
        trained.final_loss,
        trained.start_distance,
    )
    return dict(zip(TRAINING_FIELDS, values))


def execute(
    request: RunRequest,
    ledger: str | Path,
    adapters_dir: str | Path | None,
    trained_by: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run ``request`` and append its record to ``ledger``; returns the record.

    ``trained_by`` maps run keys to an earlier record of the same training run (from the ledger): with its adapter
    saved under ``adapters_dir``, the adapter is scored instead of training again.
    """
    key = request.run_key
    folder = Path(adapters_dir) / key if adapters_dir is not None else None
    earlier = (trained_by or {}).get(key)
    start = time.perf_counter()
    if earlier is not None and folder is not None and (folder / "adapter_config.json").is_file():
        # scored where a fresh run would train (the GPU if there is one), not wherever from_pretrained left it
        model = PeftModel.from_pretrained(load_model(request.model), str(folder)).to(run_device()).eval()
        tokenizer = load_tokenizer(request.model)
        training = {name: earlier.get(name) for name in TRAINING_FIELDS}  # older records lack newer fields
        provenance = {name: earlier[name] for name in PROVENANCE_FIELDS}
        reused = True
    else:
        trained = _train(request)
        model, tokenizer = trained.model, trained.tokenizer
        training = _training_fields(trained)
        provenance = {"hardware": hardware(model_device(model)), "versions": versions(), **git_state()}
        reused = False
        if folder is not None and request.split == "dev":
            _save_adapter(model, folder)
    with compute_precision(request.settings):  # scored in the arithmetic it trained in
        scores = _score(request, model, tokenizer)
    inference_flops = inference_flops_per_token(request, model, tokenizer)  # after scoring: it cannot change a score
    record = {
        "run_key": key,
        "split": request.split,
        "scorer": request.scorer,
        "suite": request.suite,
        "model": request.model.name,
        "task": request.task,
        "arm": request.arm.name,
        "arm_label": request.arm.label,
        "method": request.arm.method,
        "budget_partner": request.partner or request.arm.name,
        "claim_reference": request.arm.claim_reference,
        "claim": request.arm.claim,
        "config": to_jsonable(request.config().to_dict()),
        "seed": request.seed,
        "lr": request.lr,
        "steps": request.settings.steps,
        "batch_size": request.settings.batch_size,
        "max_length": request.settings.max_length,
        "precision": request.settings.precision,
        "split_sizes": request.splits.sizes,
        "split_fingerprint": request.splits.fingerprint,
        "adapter_reused": reused,
        # where the scores were computed: a reused adapter's training provenance is copied from its training run
        "score_device": device_kind(model_device(model)),
        "wall_s": time.perf_counter() - start,
        **training,
        **provenance,
        **scores,
        INFERENCE_FLOPS: inference_flops,
        "inference_rows": INFERENCE_ROWS,
    }
    append_record(ledger, record)
    return record
