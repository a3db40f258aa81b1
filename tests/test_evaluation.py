"""train/evaluation.py: an evaluation split over W processes (each its share, the parts combined in
rank order) gives the metrics of one process over the whole set, for every W."""

import pytest
import torch

from lmforge.train.evaluation import PredictionEvaluation, TalliesEvaluation


class Mean:
    """A stand-in objective: the loss is the batch's mean, the tallies its sum and size."""

    def __call__(self, model, batch):
        x = batch["x"]
        return x.mean(), {"sum": x.sum(), "n": torch.tensor(x.numel())}

    def summarize(self, totals):
        return {"mean_of_all": totals["sum"] / totals["n"]}


BATCHES = [{"x": torch.arange(n, dtype=torch.float32) + 10 * n} for n in (3, 1, 4, 1, 5, 9, 2)]


@pytest.mark.parametrize("world_size", [2, 3, 7, 9])
@pytest.mark.parametrize("source", ["list", "function"])
def test_tallies_split_over_processes_equal_one_process(world_size, source):
    ev = TalliesEvaluation(Mean(), BATCHES if source == "list" else (lambda: iter(BATCHES)), "cpu")
    whole = ev(None)
    assert whole["loss"] == pytest.approx(sum(float(b["x"].mean()) for b in BATCHES) / len(BATCHES))
    parts = [ev.part(None, r, world_size) for r in range(world_size)]
    assert sum(len(p[0]) for p in parts) == len(BATCHES)          # every batch once
    assert ev.combine(parts) == pytest.approx(whole)


@pytest.mark.parametrize("world_size", [2, 3, 5, 12])
def test_predictions_split_over_processes_are_scored_together(world_size):
    seen = []

    def predict(model, indices):
        seen.extend(indices)
        return torch.tensor(indices) * 10

    ev = PredictionEvaluation(10, predict, lambda p: {"preds": p.tolist()})
    parts = [ev.part(None, r, world_size) for r in range(world_size)]
    assert sorted(seen) == list(range(10))                          # every example once
    assert ev.combine(parts) == ev(None) == {"preds": [10 * i for i in range(10)]}
