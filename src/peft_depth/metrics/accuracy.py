"""Accuracy as an ``evaluate`` metric module: the fraction of predictions equal to their reference.

Loaded by path (``evaluate.load(".../accuracy.py")``) so it runs offline; same inputs and output as the Hub's
``accuracy`` module (``normalize=False`` gives the count, ``sample_weight`` weights each example).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy: (number of predictions equal to their reference) / (number of predictions)."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
    normalize (bool): True (default) for the fraction correct, False for the number correct.
    sample_weight (list of float): per-example weights (default: all 1).
Returns:
    accuracy (float): the fraction (or weighted count) of correct predictions.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        correct = np.asarray(predictions) == np.asarray(references)
        weights = np.ones(len(correct)) if sample_weight is None else np.asarray(sample_weight, dtype=float)
        total = float(np.sum(weights * correct))
        if normalize and float(np.sum(weights)) == 0:
            # sklearn refuses these too: an accuracy of nothing is undefined
            what = "no predictions" if len(correct) == 0 else "sample weights that sum to zero"
            raise ValueError(f"accuracy is undefined for {what}.")
        return {"accuracy": total / float(np.sum(weights)) if normalize else total}
