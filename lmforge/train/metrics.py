"""The official GLUE metrics, computed by scikit-learn and SciPy (not re-implemented here)."""

from __future__ import annotations

import warnings

import numpy as np

from lmforge.errors import ConfigError


def _mcc(pred, gold) -> float:
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(gold, pred))  # sklearn returns 0.0 for constant predictions


def _accuracy(pred, gold) -> float:
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(gold, pred))


def _f1(pred, gold) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(gold, pred, pos_label=1, average="binary", zero_division=0.0))


def _correlation(fn):
    def metric(pred, gold) -> float:
        pred, gold = np.asarray(pred, dtype=np.float64), np.asarray(gold, dtype=np.float64)
        # A constant input has no defined correlation (SciPy warns and returns NaN); a model that
        # predicts a constant has learned nothing, so it scores 0 instead of poisoning medians.
        if pred.size < 2 or np.ptp(pred) == 0 or np.ptp(gold) == 0:
            return 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(fn(pred, gold)[0])
    return metric


def _pearson(pred, gold):
    from scipy.stats import pearsonr

    return _correlation(pearsonr)(pred, gold)


def _spearman(pred, gold):
    from scipy.stats import spearmanr

    return _correlation(lambda a, b: tuple(spearmanr(a, b)))(pred, gold)


METRICS = {"mcc": _mcc, "accuracy": _accuracy, "f1": _f1, "pearson": _pearson, "spearman": _spearman}


def compute_metrics(names: list[str], predictions, labels) -> dict[str, float]:
    """{name: value} for each metric name; predictions are class indices or regression scores."""
    pred, gold = np.asarray(predictions), np.asarray(labels)
    if pred.shape[0] != gold.shape[0]:
        raise ValueError(f"{pred.shape[0]} predictions for {gold.shape[0]} labels")
    out = {}
    for name in names:
        if name not in METRICS:
            raise ConfigError(f"metric {name!r} is not one of {', '.join(METRICS)}")
        out[name] = METRICS[name](pred, gold)
    return out
