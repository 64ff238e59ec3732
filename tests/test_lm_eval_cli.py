"""Scoring a depth adapter with lm-evaluation-harness's own command line, as users run it:

    python -m lm_eval --model hf --model_args pretrained=BASE_DIR,peft=ADAPTER_DIR --tasks TASK --include_path DIR ...

in a process that never imports peft_depth (the methods register through the autoload hook on ``import peft``), on a
local multiple-choice task (a YAML over a JSON-lines file, the style of benchmarks/quality/lm_eval_tasks/). Each row's
log-likelihoods must equal lm-eval's in-process ``HFLM(pretrained=peft_model)`` and a direct forward of the
``PeftModel``, and differ from the base's (so the adapter was applied, not silently dropped).

One subprocess per method costs ~12 s on one core (importing lm-eval, transformers and peft, and lm-eval indexing its
own task folder): MoLA and DLO run by default, MoLEx and MoD with ``-m slow``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from hub_cases import METHODS, adapted
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the [eval] extra (scripts/setup_env.sh installs it)")

REPO = Path(__file__).resolve().parents[1]
TASK = "peft_depth_tiny_choice"
#: in the default run: per-linear experts (MoLA) and a model of another depth (DLO); all four with -m slow
DEFAULT_METHODS = ("mola", "dlo")
# prompts and choices over the tiny vocabulary ("w0" ... "w127", whitespace-split: one word, one token)
ROWS = [
    {"prompt": "w5 w9 w11", "choices": [" w20", " w21", " w22"], "label": 0},
    {"prompt": "w40 w41 w42 w43", "choices": [" w44", " w60 w61", " w7"], "label": 1},
    {"prompt": "w100", "choices": [" w101", " w3 w4", " w90", " w91"], "label": 2},
    {"prompt": "w12 w13 w14 w15 w16", "choices": [" w17", " w18"], "label": 1},
    {"prompt": "w70 w71", "choices": [" w72 w73 w74", " w75", " w76"], "label": 0},
]
TASK_YAML = """\
task: TASK_NAME
dataset_path: json
dataset_kwargs:
  data_files:
    test: DATA_FILE
test_split: test
output_type: multiple_choice
doc_to_text: "{{prompt}}"
doc_to_choice: "{{choices}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _tokenizer() -> PreTrainedTokenizerFast:
    # exactly the base's 128 ids (lm-eval resizes the embeddings when len(tokenizer) differs from the config)
    backend = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(128)}, unk_token="w3"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="w0", bos_token="w1", eos_token="w2", unk_token="w3"
    )


def _write_task(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data_file = folder / "rows.jsonl"
    data_file.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    (folder / f"{TASK}.yaml").write_text(TASK_YAML.replace("TASK_NAME", TASK).replace("DATA_FILE", str(data_file)))
    return folder


def _lm_eval_command(base_dir: Path, adapter_dir: Path, task_dir: Path, out_dir: Path) -> list[str]:
    args = [
        "--model", "hf",
        "--model_args", f"pretrained={base_dir},peft={adapter_dir}",
        "--tasks", TASK,
        "--include_path", str(task_dir),
        "--device", "cpu",
        "--batch_size", "1",
        "--output_path", str(out_dir),
        "--log_samples",
    ]  # fmt: skip
    purelib = Path(sysconfig.get_paths()["purelib"])
    if (purelib / "peft_depth_autoload.pth").is_file():  # installed as a wheel or by scripts/setup_env.sh
        return [sys.executable, "-m", "lm_eval", *args]
    # an editable install made by hand has no hook in site-packages: put it in a site directory of its own, as
    # tests/test_autoload.py does, and run the same module
    site_dir = out_dir.parent / "hook-site"
    site_dir.mkdir(exist_ok=True)
    for name in ("peft_depth_autoload.pth", "_peft_depth_autoload.py"):
        (site_dir / name).write_text((REPO / "src" / name).read_text())
    prelude = (
        f"import runpy, site, sys; site.addsitedir({str(site_dir)!r}); site.addsitedir({str(purelib)!r}); "
        f"sys.argv = ['lm_eval', *{args!r}]; runpy.run_module('lm_eval', run_name='__main__', alter_sys=True)"
    )
    return [sys.executable, "-S", "-c", prelude]


def _loglikelihoods(samples: list[dict]) -> list[list[float]]:
    """Per row (by doc_id), each choice's summed log-likelihood, from lm-eval's logged samples."""
    rows = sorted(samples, key=lambda sample: int(sample["doc_id"]))
    return [[float(resp[0][0]) for resp in sample["resps"]] for sample in rows]


def _in_process(model, tokenizer, task_dir: Path) -> list[list[float]]:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, device="cpu")
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),  # the CLI indexes them all
        log_samples=True,
        bootstrap_iters=0,
        verbosity="ERROR",
    )
    return _loglikelihoods(results["samples"][TASK])


def _direct(model, tokenizer) -> list[list[float]]:
    """Summed log-probabilities of each choice's tokens after the prompt, from one forward of the model."""
    scores = []
    for row in ROWS:
        context = tokenizer(row["prompt"])["input_ids"]
        row_scores = []
        for choice in row["choices"]:
            continuation = tokenizer(row["prompt"] + choice)["input_ids"][len(context) :]
            ids = torch.tensor([context + continuation])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
            positions = range(len(context) - 1, ids.shape[1] - 1)
            row_scores.append(sum(float(logprobs[p, ids[0, p + 1]]) for p in positions))
        scores.append(row_scores)
    return scores


def _max_difference(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(row) for row in a] == [len(row) for row in b]
    return max(abs(x - y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b))


def _argmax(scores: list[list[float]]) -> list[int]:
    return [max(range(len(row)), key=row.__getitem__) for row in scores]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "method", [m if m in DEFAULT_METHODS else pytest.param(m, marks=pytest.mark.slow) for m in METHODS]
)
def test_lm_eval_cli_scores_a_depth_adapter_as_the_peft_model_does(tmp_path, method, one_thread):
    model, base = adapted(method)
    tokenizer = _tokenizer()
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    model.save_pretrained(adapter_dir)
    task_dir = _write_task(tmp_path / "tasks")
    out_dir = tmp_path / "results"

    # one thread: on a shared 2-core machine two threads of tiny matmuls wait on each other (~0.5 s a forward)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PEFT_DEPTH_NO_AUTOLOAD", None)
    run = subprocess.run(
        _lm_eval_command(base_dir, adapter_dir, task_dir, out_dir),
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-5000:])
    (samples_file,) = out_dir.glob(f"**/samples_{TASK}_*.jsonl")
    (results_file,) = out_dir.glob("**/results_*.json")
    cli_samples = [json.loads(line) for line in samples_file.read_text().splitlines() if line.strip()]
    assert len(cli_samples) == len(ROWS)
    cli = _loglikelihoods(cli_samples)
    assert all(math.isfinite(x) for row in cli for x in row)
    cli_accuracy = json.loads(results_file.read_text())["results"][TASK]["acc,none"]

    in_process = _in_process(model, tokenizer, task_dir)
    direct = _direct(model, tokenizer)
    without_adapter = _direct(base, tokenizer)
    # the CLI's model, loaded from the folders, scores as the in-memory PeftModel does: 0.0 apart in-process, ~5e-7
    # from a direct forward (lm-eval's batching); the base alone is 4e-3 (MoD) to 0.7 (DLO) away from it
    assert _max_difference(cli, in_process) < 1e-5, (cli, in_process)
    assert _max_difference(cli, direct) < 1e-5, (cli, direct)
    predictions = _argmax(cli)
    assert predictions == _argmax(in_process) == _argmax(direct)
    assert cli_accuracy == pytest.approx(sum(p == row["label"] for p, row in zip(predictions, ROWS)) / len(ROWS))
    assert _max_difference(cli, without_adapter) > 1e-3, "the CLI scored the base model: the adapter was not applied"
