"""Metrics equal scikit-learn / SciPy and follow the GLUE conventions."""

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from lmforge.errors import ConfigError
from lmforge.train.metrics import compute_metrics

rng = np.random.default_rng(0)
GOLD = rng.integers(0, 2, 200)
PRED = np.where(rng.random(200) < 0.8, GOLD, 1 - GOLD)
COLA_GOLD = (rng.random(300) < 0.7).astype(int)  # CoLA is ~70% acceptable
COLA_PRED = np.where(rng.random(300) < 0.75, COLA_GOLD, 1 - COLA_GOLD)
STS_GOLD = rng.uniform(0, 5, 150)
STS_PRED = STS_GOLD + rng.normal(0, 1, 150)

CASES = [
    ("accuracy", PRED, GOLD, accuracy_score(GOLD, PRED)),
    ("f1", PRED, GOLD, f1_score(GOLD, PRED)),
    ("mcc", COLA_PRED, COLA_GOLD, matthews_corrcoef(COLA_GOLD, COLA_PRED)),
    ("pearson", STS_PRED, STS_GOLD, pearsonr(STS_PRED, STS_GOLD)[0]),
    ("spearman", STS_PRED, STS_GOLD, spearmanr(STS_PRED, STS_GOLD)[0]),
    # degenerate: a constant predictor scores 0, never NaN
    ("mcc", np.ones(300, int), COLA_GOLD, 0.0),
    ("pearson", np.full(150, 2.5), STS_GOLD, 0.0),
    ("spearman", np.full(150, 2.5), STS_GOLD, 0.0),
    ("f1", np.zeros(200, int), GOLD, 0.0),
]


@pytest.mark.parametrize("name,pred,gold,want", CASES)
def test_metric_matches_reference(name, pred, gold, want):
    got = compute_metrics([name], pred, gold)[name]
    assert isinstance(got, float) and not np.isnan(got)
    assert got == pytest.approx(float(want), abs=1e-12)


def test_mcc_differs_from_accuracy_on_imbalanced_cola():
    """Why CoLA uses MCC: always answering 'acceptable' gets ~70% accuracy and MCC 0."""
    m = compute_metrics(["accuracy", "mcc"], np.ones(300, int), COLA_GOLD)
    assert m["accuracy"] > 0.6 and m["mcc"] == 0.0


def test_errors():
    with pytest.raises(ConfigError, match="metric 'bleu'"):
        compute_metrics(["bleu"], [1], [1])
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        compute_metrics(["accuracy"], [1, 0, 1], [1, 0])
