"""F1 score as an ``evaluate`` metric module (binary by default, as GLUE reports it for MRPC), via scikit-learn.

Loaded by path (``evaluate.load(".../f1.py")``) so it runs offline; same inputs and output as the Hub's ``f1``
module. F1 = 2 · precision · recall / (precision + recall) of the positive class ``pos_label``.
"""

import datasets
import evaluate
from sklearn.metrics import f1_score

_DESCRIPTION = "F1: the harmonic mean of precision and recall (binary by default; see `average`)."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
    labels (list of int): labels to include when average != 'binary'.
    pos_label (int): the positive class for average='binary' (default 1).
    average (str): 'binary' (default), 'micro', 'macro', 'weighted', 'samples' or None (per-class scores).
    sample_weight (list of float): per-example weights.
Returns:
    f1 (float, or a list of floats with average=None).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
        )

    def _compute(self, predictions, references, labels=None, pos_label=1, average="binary", sample_weight=None):
        score = f1_score(
            references, predictions, labels=labels, pos_label=pos_label, average=average, sample_weight=sample_weight
        )
        return {"f1": score.tolist() if hasattr(score, "tolist") and getattr(score, "ndim", 0) else float(score)}
