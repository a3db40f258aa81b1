"""The classic cheap baseline: frozen encoder features + scikit-learn logistic regression
(ridge regression for regression tasks).

The fitted linear model is stored as plain tensors (probe.safetensors + probe.json) next to the
encoder, never as a pickle, and applied by infer.classify.Classifier.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from lmforge.infer.features import example_features
from lmforge.models.checkpoint import write_pretrained
from lmforge.train.metrics import compute_metrics
from lmforge.utils.atomic import atomic_dir


def fit_features(model, tokenizer, data, cfg, max_len: int, out_dir: Path) -> tuple[dict, int]:
    """Fit the probe, save it with the encoder in out_dir; returns (dev metrics, probe parameters)."""
    from sklearn.linear_model import LogisticRegression, Ridge

    spec = {"pooling": cfg.adapt.feature_pooling, "pairs": cfg.adapt.feature_pairs}
    x_train, x_dev = (example_features(model, tokenizer, examples, max_len, **spec,
                                       batch_size=cfg.eval_batch_size) for examples in (data.train, data.dev))
    mean, scale = x_train.mean(0), x_train.std(0) + 1e-6  # standardise: lbfgs converges faster
    z_train, z_dev = (x_train - mean) / scale, (x_dev - mean) / scale
    y_train = np.array([e.label for e in data.train])
    if data.regression:
        reg = Ridge(alpha=1.0, random_state=cfg.train.seed).fit(z_train, y_train)
        weight, bias = reg.coef_[None, :], np.atleast_1d(reg.intercept_)
        preds = z_dev @ weight[0] + bias[0]
    else:
        clf = LogisticRegression(max_iter=2000, C=1.0, random_state=cfg.train.seed).fit(z_train, y_train)
        weight, bias = clf.coef_, clf.intercept_
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
        probe = {**spec, "labels": data.labels, "regression": data.regression}
        (tmp / "probe.json").write_text(json.dumps(probe, indent=1))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics, weight.size + bias.size
