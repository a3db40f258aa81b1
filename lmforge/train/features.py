"""The classic cheap baseline: frozen encoder features + scikit-learn logistic regression
(ridge regression for regression tasks), its regularisation chosen by cross-validation on train.

The fitted linear model is stored as plain tensors (probe.safetensors + probe.json) next to the
encoder, never as a pickle, and applied by infer.classify.Classifier.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from lmforge.infer.features import example_features
from lmforge.models.checkpoint import write_pretrained
from lmforge.train.metrics import compute_metrics
from lmforge.utils.atomic import atomic_dir


LOGISTIC_CS = (0.01, 0.1, 1.0, 10.0)   # inverse regularisation strengths to choose from
RIDGE_ALPHAS = (0.1, 1.0, 10.0, 100.0, 1000.0)
CV_FOLDS = 3


def fit_features(model, tokenizer, data, cfg, max_len: int, out_dir: Path) -> tuple[dict, int]:
    """Fit the probe, save it with the encoder in out_dir; returns (dev metrics, probe parameters)."""
    from sklearn.linear_model import LogisticRegressionCV, RidgeCV

    spec = {"pooling": cfg.adapt.feature_pooling, "pairs": cfg.adapt.feature_pairs}
    x_train, x_dev = (example_features(model, tokenizer, examples, max_len, **spec,
                                       batch_size=cfg.eval_batch_size) for examples in (data.train, data.dev))
    mean, scale = x_train.mean(0), x_train.std(0) + 1e-6  # standardise: lbfgs converges faster
    z_train, z_dev = (x_train - mean) / scale, (x_dev - mean) / scale
    y_train = np.array([e.label for e in data.train])
    # The regularisation strength is chosen by cross-validation on the training set (never on dev):
    # 1536 pair features on MRPC's 3.7k pairs want much more of it than 384 on SST-2's 67k phrases.
    if data.regression:
        reg = RidgeCV(alphas=RIDGE_ALPHAS).fit(z_train, y_train)
        weight, bias = reg.coef_[None, :], np.atleast_1d(reg.intercept_)
        preds = z_dev @ weight[0] + bias[0]
        chosen = {"alpha": float(reg.alpha_)}
    else:
        with warnings.catch_warnings():  # sklearn 1.9's notice that its fitted attributes will change
            warnings.simplefilter("ignore", FutureWarning)
            clf = LogisticRegressionCV(Cs=LOGISTIC_CS, cv=CV_FOLDS, max_iter=2000, l1_ratios=(0.0,),
                                       scoring="neg_log_loss", random_state=cfg.train.seed).fit(z_train, y_train)
        weight, bias = clf.coef_, clf.intercept_
        chosen = {"C": float(np.atleast_1d(clf.C_)[0])}
        if len(clf.classes_) == 2:  # sklearn keeps one row for two classes: make it two logits
            weight, bias = np.concatenate([-weight / 2, weight / 2]), np.array([-bias[0] / 2, bias[0] / 2])
        preds = (z_dev @ weight.T + bias).argmax(1)
    metrics = compute_metrics(data.metrics, preds, [e.label for e in data.dev])
    encoder = model.__class__(model.config.replace(head=None))
    encoder.transformer.load_state_dict(model.transformer.state_dict(), strict=False)
    with atomic_dir(out_dir) as tmp:
        write_pretrained(encoder, tmp, tokenizer)
        save_file({"weight": torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)),
                   "bias": torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32)),
                   "mean": torch.from_numpy(mean.astype(np.float32)),
                   "scale": torch.from_numpy(scale.astype(np.float32))}, str(tmp / "probe.safetensors"))
        probe = {**spec, **chosen, "labels": data.labels, "regression": data.regression}
        (tmp / "probe.json").write_text(json.dumps(probe, indent=1))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics, weight.size + bias.size
