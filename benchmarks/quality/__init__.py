"""The quality harness behind ``benchmarks/quality.py``: fair, resumable accuracy comparisons of the depth methods
against plain peft LoRA at matched trainable-parameter budgets.

Modules, one job each:

- ``models``: which base model (SmolLM2, MiniLM or a local folder), how to load it, its family (causal / encoder).
- ``arms``: the compared configurations ("arms") and their learning-rate grids and paper claims.
- ``budget``: trainable-parameter counts and the rank that matches one budget to another.
- ``data``: the train / dev / test splits of every task, deterministic and disjoint.
- ``ledger``: the JSONL of finished runs, stable run keys, resuming.
- ``provenance``: hardware, library versions and git commit of a run.
- ``flops``: FLOPs counted on a real forward (+ backward): the training estimate of a run, and inference passes.
- ``inference_cost``: a trained adapter's inference FLOPs per token (what DLO's cost claim is judged on), and the
  backfill of older runs from their kept adapters.
- ``train_causal`` / ``train_encoder``: one training run and its scores.
- ``lm_eval_scorer``: EleutherAI lm-evaluation-harness scoring of a model in-process.
- ``exclusive``: a machine-wide lock, so two shards never score with lm-eval (a run's memory peak) at once.
- ``sweep``: which runs a sweep needs, learning-rate selection on dev, the loop with a progress bar.
- ``stats`` / ``report``: mean ± std, paired t intervals, detectable effects, the markdown table and plot.
- ``timing`` / ``plan``: one measured training step per arm, and the sweep's CPU-hour estimate.
"""
