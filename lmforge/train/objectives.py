"""Training objectives: each turns (model, batch) into a loss and the tallies it is measured by.

An objective is a small object built with what it needs to know (whether the head is a regressor,
which token is ignored): it never reads `model.config`, so the model it is given may be wrapped
(DistributedDataParallel) and it still works. It only calls the model and reads its ModelOutput.

`objective(model, batch)` returns (loss, tallies): the scalar to back-propagate and a dict of
*sums* over the batch (tokens, correct predictions, summed loss), detached tensors. Sums add up
across a logging window without any averaging error; `objective.summarize(totals)` turns them into
the metrics written to metrics.jsonl (accuracy = correct / predicted, perplexity = exp(mean loss)).
The trainer adds tallies as tensors and converts them once per log line, not once per step.

Batches follow the pre-training contract (data/pretrain.py): right-padded `input_ids`,
`attention_mask`, `token_type_ids` [B, T]; `labels` [B, T] with -100 where nothing is predicted
(mlm); `next_sentence_label` [B] (nsp). A causal LM has no labels: it predicts input_ids shifted by
one. Classification batches are padded or packed (data/batches.py) with `labels` [B].
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from lmforge.data.batches import model_inputs
from lmforge.errors import ConfigError

IGNORE = -100   # the label of a position that is not predicted (PyTorch's and Hugging Face's)

Tallies = dict[str, torch.Tensor]


class Objective(ABC):
    """(model, batch) -> (loss, tallies); summarize(summed tallies) -> metrics."""

    name: str = ""

    @abstractmethod
    def __call__(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, Tallies]:
        ...

    def summarize(self, totals: dict[str, float]) -> dict[str, float]:
        return {}

    def weight(self, tallies: Tallies, examples: int) -> float:
        """What the loss is a mean over in this batch: several processes weigh their losses by it
        (trainer.py), so that their average is the mean over the global batch, as one process
        computes it. Examples by default; a per-token loss says its token count."""
        return float(examples)

    def terms(self, model: torch.nn.Module, batch: dict) -> tuple[dict[str, torch.Tensor], Tallies]:
        """The loss as named terms that add up to it, each a mean over a count of its own (weights).
        Several processes weigh each term by its own count: one weight for a sum of two means over
        different counts (BERT's masked tokens and its sentence pairs) cannot give the loss one
        process computes. One term, the loss, by default."""
        loss, tallies = self(model, batch)
        return {"loss": loss}, tallies

    def weights(self, tallies: Tallies, examples: int) -> dict[str, float]:
        """Each term's count in this batch (terms); by default the one term's weight()."""
        return {"loss": self.weight(tallies, examples)}


def _ratio(totals: dict, num: str, den: str) -> float:
    return totals[num] / totals[den] if totals.get(den) else float("nan")


@dataclass
class LossFunction(Objective):
    """A plain `fn(model, batch) -> loss`: no metrics besides the loss (what the Trainer took before)."""

    fn: Callable[[torch.nn.Module, dict], torch.Tensor]
    name: str = "loss"

    def __call__(self, model, batch):
        return self.fn(model, batch), {}


@dataclass
class SequenceClassification(Objective):
    """Cross-entropy over classes with training accuracy, or mean squared error for a regressor
    (STS-B). The batch is padded or packed (data.batches.collate / collate_packed)."""

    regression: bool = False
    name: str = "classification"

    def __call__(self, model, batch):
        logits = model(**model_inputs(batch)).logits
        labels = batch["labels"]
        if self.regression:
            return F.mse_loss(logits.squeeze(-1), labels.float()), {}
        loss = F.cross_entropy(logits, labels)
        correct = (logits.detach().argmax(-1) == labels).sum()
        return loss, {"correct": correct, "examples": torch.tensor(labels.shape[0])}

    def summarize(self, totals):
        return {} if self.regression else {"accuracy": _ratio(totals, "correct", "examples")}


_SOURCE = ("encoder_input_ids", "encoder_attention_mask")   # an encoder-decoder's source (data/nlg.py)


def _padded_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", *_SOURCE) if k in batch}


def _source(batch: dict) -> dict:
    return {k: batch[k] for k in _SOURCE if k in batch}


def _tokens(batch: dict) -> torch.Tensor:
    """Real (non-padding) tokens of a padded batch."""
    mask = batch.get("attention_mask")
    return torch.tensor(batch["input_ids"].numel()) if mask is None else mask.sum()


def masked_positions(labels: torch.Tensor) -> torch.Tensor:
    """Rows of the flattened [B*T] tokens that carry a label, [M]."""
    return (labels.reshape(-1) != IGNORE).nonzero().squeeze(-1)


def _mlm_terms(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, Tallies]:
    """logits [M, V] at the masked positions, targets [M]: mean cross-entropy and its tallies.
    A batch with no masked token gives a zero loss (still connected to the graph), not NaN."""
    total = F.cross_entropy(logits.float(), targets, reduction="sum")
    m = targets.numel()
    correct = (logits.detach().max(-1).indices == targets).sum()   # argmax's answer, faster over a vocabulary
    return total / max(m, 1), {"mlm_loss_sum": total.detach(), "mlm_correct": correct,
                               "mlm_predicted": torch.tensor(m)}


def _nsp_terms(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, Tallies]:
    loss = F.cross_entropy(logits.float(), labels)
    correct = (logits.detach().argmax(-1) == labels).sum()
    return loss, {"nsp_loss_sum": loss.detach() * labels.shape[0], "nsp_correct": correct,
                  "nsp_examples": torch.tensor(labels.shape[0])}


def _summarize_mlm(t: dict) -> dict:
    return {"mlm_loss": _ratio(t, "mlm_loss_sum", "mlm_predicted"),
            "mlm_accuracy": _ratio(t, "mlm_correct", "mlm_predicted")}


def _summarize_nsp(t: dict) -> dict:
    return {"nsp_loss": _ratio(t, "nsp_loss_sum", "nsp_examples"),
            "nsp_accuracy": _ratio(t, "nsp_correct", "nsp_examples")}


@dataclass
class MaskedLM(Objective):
    """BERT's masked-LM loss at the masked positions, with masked-token accuracy. The model is asked
    for logits at those positions only (`positions=`), so the vocabulary-sized projection runs on
    about 15% of the tokens instead of all of them."""

    name: str = "mlm"

    def __call__(self, model, batch):
        positions = masked_positions(batch["labels"])
        out = model(**_padded_inputs(batch), positions=positions)
        loss, tallies = _mlm_terms(out.logits, batch["labels"].reshape(-1).index_select(0, positions))
        return loss, {**tallies, "tokens": _tokens(batch)}

    def summarize(self, totals):
        return _summarize_mlm(totals)

    def weight(self, tallies, examples):
        return float(tallies["mlm_predicted"])


def _nsp_logits(out) -> torch.Tensor:
    # BertForPreTraining puts them beside the MLM logits; a head of its own (nsp) in logits
    return out.nsp_logits if out.nsp_logits is not None else out.logits


@dataclass
class NextSentence(Objective):
    """Next-sentence prediction: is segment B the continuation of A? Cross-entropy and accuracy."""

    name: str = "nsp"

    def __call__(self, model, batch):
        out = model(**_padded_inputs(batch))
        loss, tallies = _nsp_terms(_nsp_logits(out), batch["next_sentence_label"])
        return loss, {**tallies, "tokens": _tokens(batch)}

    def summarize(self, totals):
        return _summarize_nsp(totals)


@dataclass
class MaskedLMWithNSP(Objective):
    """BERT's pre-training: the MLM loss plus the NSP loss, from one forward pass."""

    name: str = "mlm,nsp"

    def __call__(self, model, batch):
        terms, tallies = self.terms(model, batch)
        return terms["mlm"] + terms["nsp"], tallies

    def terms(self, model, batch):
        positions = masked_positions(batch["labels"])
        out = model(**_padded_inputs(batch), positions=positions)
        mlm, t1 = _mlm_terms(out.logits, batch["labels"].reshape(-1).index_select(0, positions))
        nsp, t2 = _nsp_terms(_nsp_logits(out), batch["next_sentence_label"])
        return {"mlm": mlm, "nsp": nsp}, {**t1, **t2, "tokens": _tokens(batch)}

    def summarize(self, totals):
        return {**_summarize_mlm(totals), **_summarize_nsp(totals)}

    def weights(self, tallies, examples):
        # the MLM half is a mean over masked tokens, the NSP half over examples
        return {"mlm": float(tallies["mlm_predicted"]), "nsp": float(examples)}


@dataclass
class CausalLM(Objective):
    """Next-token prediction: the logits at position t predict input_ids[t + 1]. Only positions whose
    next token is real are scored, and only those go through the vocabulary projection."""

    name: str = "clm"

    def __call__(self, model, batch):
        ids = batch["input_ids"]                                     # [B, T]
        B, T = ids.shape
        mask = batch.get("attention_mask")
        nxt = torch.ones(B, T, dtype=torch.bool, device=ids.device) if mask is None else mask.bool()
        scored = torch.zeros_like(nxt)
        scored[:, :-1] = nxt[:, 1:]                                  # the next token exists
        positions = scored.reshape(-1).nonzero().squeeze(-1)         # [M] rows of the flat [B*T]
        out = model(**_padded_inputs(batch), positions=positions)
        targets = ids.reshape(-1).index_select(0, positions + 1)     # row b*T+t -> b*T+t+1
        total = F.cross_entropy(out.logits.float(), targets, reduction="sum")
        m = targets.numel()
        return total / max(m, 1), {"clm_loss_sum": total.detach(), "clm_predicted": torch.tensor(m),
                                   "tokens": _tokens(batch)}

    def summarize(self, totals):
        loss = _ratio(totals, "clm_loss_sum", "clm_predicted")
        return {"clm_loss": loss, "perplexity": math.exp(min(loss, 700.0)) if math.isfinite(loss) else loss}

    def weight(self, tallies, examples):
        return float(tallies["clm_predicted"])


@dataclass
class DataToText(Objective):
    """A decoder learning to continue a prompt with its reference (data/nlg.py: E2E, WebNLG, DART).

    The batch is right-padded `input_ids` / `attention_mask` with `target_mask` [B, T]: True at the
    target's tokens (" " + reference and the end token). The loss is the cross-entropy of predicting
    each target token from the tokens before it (label smoothing `label_smoothing`, as
    F.cross_entropy computes it), averaged over the target tokens; nothing of the prompt is scored.
    `lm_aux_weight` (lambda) adds GPT's auxiliary language-model objective (Radford et al. 2018,
    L3 = L2 + lambda L1): the plain cross-entropy of predicting each prompt token after its first from
    the tokens before it, averaged over those tokens, times lambda. Only scored positions go through
    the vocabulary projection.

    `packed`: the batch runs unpadded (models/packing.py: its real tokens as one stream), the same
    numbers as padded with no work on padding.

    An encoder-decoder's batch (data/nlg.collate_seq2seq) adds the source, encoder_input_ids and its
    mask; its decoder's input_ids are the start token then the target, so the same positions are
    scored. Its decoder has no prompt tokens for the auxiliary term.

    Tallies: the target tokens' summed negative log-likelihood without smoothing (what dev loss and
    perplexity report), their count and correct argmax predictions, and the prompt term's sum and count."""

    label_smoothing: float = 0.0
    lm_aux_weight: float = 0.0
    packed: bool = False
    name: str = "data-to-text"

    def __post_init__(self):
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if not (self.lm_aux_weight >= 0.0 and math.isfinite(self.lm_aux_weight)):
            raise ConfigError(f"--lm-aux-weight must be a finite number >= 0, got {self.lm_aux_weight}")

    def __call__(self, model, batch):
        terms, tallies = self.terms(model, batch)
        return sum(terms.values()), tallies

    def terms(self, model, batch):
        ids, target = batch["input_ids"], batch["target_mask"].bool()        # [B, T]
        real = batch["attention_mask"].bool()
        # the logits at position t predict token t + 1
        predicts_target = torch.zeros_like(target)
        predicts_target[:, :-1] = target[:, 1:]
        scored = predicts_target
        if self.lm_aux_weight:
            predicts_prompt = torch.zeros_like(target)
            predicts_prompt[:, :-1] = real[:, 1:] & ~target[:, 1:]
            scored = predicts_target | predicts_prompt
        positions = scored.reshape(-1).nonzero().squeeze(-1)                  # [M] rows of the flat [B*T]
        if self.packed:   # every scored position is a real token: its row in the stream of real tokens
            from lmforge.models.packing import pack_padded
            stream, layout = pack_padded(ids, batch["attention_mask"])
            rows = real.reshape(-1).long().cumsum(0) - 1
            logits = model(stream, packed=layout, positions=rows.index_select(0, positions),
                           **_source(batch)).logits.float()
        else:
            logits = model(**_padded_inputs(batch), positions=positions).logits.float()
        labels = ids.reshape(-1).index_select(0, positions + 1)
        is_target = predicts_target.reshape(-1).index_select(0, positions)
        t_logits, t_labels = logits[is_target], labels[is_target]
        m = t_labels.numel()
        loss_sum = F.cross_entropy(t_logits, t_labels, reduction="sum", label_smoothing=self.label_smoothing)
        nll_sum = (F.cross_entropy(t_logits.detach(), t_labels, reduction="sum") if self.label_smoothing
                   else loss_sum.detach())
        terms = {"target": loss_sum / max(m, 1)}
        tallies = {"target_nll_sum": nll_sum, "target_tokens": torch.tensor(m),
                   "target_correct": (t_logits.detach().max(-1).indices == t_labels).sum(), "tokens": _tokens(batch)}
        if self.lm_aux_weight:
            p_logits, p_labels = logits[~is_target], labels[~is_target]
            k = p_labels.numel()
            aux_sum = F.cross_entropy(p_logits, p_labels, reduction="sum")
            terms["prompt"] = self.lm_aux_weight * aux_sum / max(k, 1)
            tallies.update(prompt_nll_sum=aux_sum.detach(), prompt_tokens=torch.tensor(k))
        return terms, tallies

    def summarize(self, totals):
        nll = _ratio(totals, "target_nll_sum", "target_tokens")
        out = {"target_loss": nll, "perplexity": math.exp(min(nll, 700.0)) if math.isfinite(nll) else nll,
               "token_accuracy": _ratio(totals, "target_correct", "target_tokens")}
        if "prompt_tokens" in totals:
            out["prompt_loss"] = _ratio(totals, "prompt_nll_sum", "prompt_tokens")
        return out

    def weight(self, tallies, examples):
        return float(tallies["target_tokens"])

    def weights(self, tallies, examples):
        # the reference term is a mean over target tokens, the auxiliary one over prompt tokens
        w = {"target": float(tallies["target_tokens"])}
        if "prompt_tokens" in tallies:
            w["prompt"] = float(tallies["prompt_tokens"])
        return w


PRETRAINING_OBJECTIVES = {"mlm": MaskedLM, "nsp": NextSentence, "mlm,nsp": MaskedLMWithNSP, "clm": CausalLM}


def pretraining_objective(spec: str) -> Objective:
    """The objective named on the command line: mlm, nsp, mlm,nsp (in either order) or clm."""
    key = ",".join(sorted(s.strip() for s in spec.split(",") if s.strip()))
    if key not in PRETRAINING_OBJECTIVES:
        raise ConfigError(f"--objective {spec!r} is not one of {', '.join(PRETRAINING_OBJECTIVES)}")
    return PRETRAINING_OBJECTIVES[key]()


def as_objective(obj) -> Objective:
    """An Objective as is; a plain loss function wrapped (no metrics)."""
    return obj if isinstance(obj, Objective) else LossFunction(obj)


def sequence_classification_loss(model, batch):
    """The classification loss alone, reading the regression flag from the model's config (kept for
    callers with an unwrapped model; the trainer uses SequenceClassification)."""
    return SequenceClassification(regression=model.config.is_regression)(model, batch)[0]
