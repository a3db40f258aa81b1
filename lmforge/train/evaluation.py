"""Evaluations several processes split: each process evaluates its share of the evaluation set
(`part`), the parts are gathered, and `combine` turns them into the metrics one process computes
over the whole set. Trainer._evaluate does this under DDP; a sharded (FSDP) model evaluates on every
rank instead, since each of its forward passes needs all of them.

  TalliesEvaluation       an objective's summed tallies and mean loss per batch over a list of batches
                          (pre-training, data-to-text dev loss): rank r takes batches r, r + W, ...
  PredictionEvaluation    per-example predictions scored together (GLUE metrics such as Matthews
                          correlation or F1 are not sums): rank r predicts examples r, r + W, ...
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Iterable

import torch


class ShardedEvaluation(ABC):
    @abstractmethod
    def part(self, model: torch.nn.Module, rank: int, world_size: int):
        """This rank's share of the evaluation (picklable: it is gathered)."""

    @abstractmethod
    def combine(self, parts: list) -> dict:
        """The metrics from every rank's part, in rank order."""

    def __call__(self, model: torch.nn.Module) -> dict:
        return self.combine([self.part(model, 0, 1)])


class TalliesEvaluation(ShardedEvaluation):
    """An objective over a list of batches: "loss" (the mean loss per batch) and the objective's
    metrics of the summed tallies (so accuracies weigh every prediction alike). `batches` is a list, or a function giving the batches afresh."""

    def __init__(self, objective, batches: list | Callable[[], Iterable[dict]], device):
        self.objective, self.batches, self.device = objective, batches, device

    def part(self, model, rank, world_size):
        batches = self.batches() if callable(self.batches) else self.batches
        losses, totals = [], {}
        for i, batch in enumerate(batches):
            if i % world_size != rank:
                continue
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            loss, tallies = self.objective(model, batch)
            losses.append(float(loss))
            for k, v in tallies.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        return losses, totals

    def combine(self, parts):
        losses = [x for p in parts for x in p[0]]
        totals: dict[str, float] = {}
        for _, t in parts:
            for k, v in t.items():
                totals[k] = totals.get(k, 0.0) + v
        if not losses:
            return {"loss": float("nan")}
        return {"loss": sum(losses) / len(losses), **self.objective.summarize(totals)}


class PredictionEvaluation(ShardedEvaluation):
    """predict(model, indices) -> a tensor of predictions [len(indices), ...] for those examples of
    the n; score(predictions [n, ...] in example order) -> metrics."""

    def __init__(self, n: int, predict: Callable[[torch.nn.Module, list[int]], torch.Tensor],
                 score: Callable[[torch.Tensor], dict]):
        self.n, self.predict, self.score = n, predict, score

    def part(self, model, rank, world_size):
        mine = list(range(rank, self.n, world_size))
        return mine, self.predict(model, mine).cpu()

    def combine(self, parts):
        filled = [(i, p) for i, p in parts if i]
        if not filled:
            return self.score(torch.empty(0))
        out = torch.empty(self.n, *filled[0][1].shape[1:], dtype=filled[0][1].dtype)
        for idx, preds in filled:
            out[idx] = preds
        return self.score(out)
