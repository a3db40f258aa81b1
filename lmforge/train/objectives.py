"""Training objectives: loss_fn(model, batch) -> scalar, for the Trainer."""

from __future__ import annotations

import torch.nn.functional as F

from lmforge.data.batches import model_inputs


def sequence_classification_loss(model, batch):
    """Cross-entropy over classes, or mean squared error when the head is a regressor (STS-B).
    The batch is padded or packed (data.batches.collate / collate_packed)."""
    logits = model(**model_inputs(batch)).logits
    if model.config.is_regression:
        return F.mse_loss(logits.squeeze(-1), batch["labels"].float())
    return F.cross_entropy(logits, batch["labels"])
