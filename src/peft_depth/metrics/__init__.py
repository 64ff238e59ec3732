"""``evaluate`` metric modules shipped with peft-depth, loaded by path so they work offline.

``evaluate.load("accuracy")`` fetches the module script from the Hugging Face Hub, so it fails offline (the scripts
are not in the ``evaluate`` wheel). The same metrics live here as files and load by path::

    from peft_depth.metrics import load_metric
    load_metric("f1").compute(predictions=[0, 1, 1], references=[0, 1, 0])   # {'f1': 0.666...}

``accuracy`` needs nothing beyond ``evaluate``; ``f1`` uses scikit-learn (``pip install "peft-depth[eval]"``).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["METRICS", "metric_path", "load_metric"]

_HERE = Path(__file__).resolve().parent
#: Metric name -> its module file inside this package.
METRICS = {"accuracy": _HERE / "accuracy.py", "f1": _HERE / "f1.py"}


def metric_path(name: str) -> str:
    """Absolute path of a shipped metric module, for ``evaluate.load(path)``."""
    if name not in METRICS:
        raise ValueError(f"No shipped metric {name!r}; shipped: {', '.join(sorted(METRICS))}.")
    return str(METRICS[name])


def load_metric(name: str, **kwargs):
    """``evaluate.load`` of a shipped metric by its path (no Hub access)."""
    import evaluate

    return evaluate.load(metric_path(name), **kwargs)
