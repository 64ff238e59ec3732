"""The quality harness behind ``benchmarks/quality.py``: fair, resumable accuracy comparisons of the depth methods
against plain peft LoRA at matched trainable-parameter budgets.

Modules, one job each:

- ``models``: which base model (SmolLM2, MiniLM or a local folder), how to load it, its family (causal / encoder).
- ``arms``: the compared configurations ("arms") and their learning-rate grids and paper claims.
- ``budget``: trainable-parameter counts and the rank that matches one budget to another.
- ``data``: the train / dev / test splits of every task, deterministic and disjoint.
- ``ledger``: the JSONL of finished runs, stable run keys, resuming.
- ``provenance``: hardware, library versions and git commit of a run.
- ``flops``: the training-FLOPs estimate of a run.
- ``train_causal`` / ``train_encoder``: one training run and its scores.
- ``lm_eval_scorer``: EleutherAI lm-evaluation-harness scoring of a model in-process.
- ``sweep``: which runs a sweep needs, learning-rate selection on dev, the loop with a progress bar.
- ``stats`` / ``report``: mean ± std, paired bootstrap intervals, detectable effects, the markdown table and plot.
- ``timing`` / ``plan``: one measured training step per arm, and the sweep's CPU-hour estimate.
"""
