"""Decoding for causal LMs with the KV cache: greedy, sampling (temperature, top-k, top-p, seeded), or
beam search (models/beam_search.py); no-repeat-n-gram blocking and several end (stop) tokens in all."""

from __future__ import annotations

from typing import Iterator

import torch

from lmforge.models.beam_search import beam_search, block_repeated_ngrams
from lmforge.models.model import Model


def next_token_scores(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0) -> torch.Tensor:
    """Logits [B, V] with everything outside the top-k / nucleus set to -inf."""
    logits = logits / max(temperature, 1e-5)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p (the best one always stays)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _end_ids(model: Model, eos_token_id) -> list[int]:
    """The end tokens: eos_token_id (an id or a list of ids: stop tokens), else the config's eos."""
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    return [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _check(model: Model, T: int, max_new_tokens: int) -> None:
    if model.config.head != "causal-lm":
        raise ValueError(f"generate needs a causal-lm head, this model has {model.config.head!r}")
    limit = model.config.max_position_embeddings
    if T + max_new_tokens > limit:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds the model's {limit} positions")


@torch.no_grad()
def decode_steps(
    model: Model,
    input_ids: torch.Tensor,                     # [B, T], left-padded when lengths differ
    attention_mask: torch.Tensor | None = None,  # [B, T]
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    no_repeat_ngram_size: int = 0,
    eos_token_id: int | list[int] | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Greedy or sampled decoding, one step at a time: yields (tokens [B], finished [B]) per step,
    `finished` true from the step a row produced an end token (its later tokens are meaningless).
    Stops when every row has finished or after max_new_tokens steps."""
    B, T = input_ids.shape
    _check(model, T, max_new_tokens)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif not bool(attention_mask[:, -1].all()):
        raise ValueError("batched prompts must be left-padded (attention_mask[:, -1] must be all 1)")
    ends = torch.tensor(_end_ids(model, eos_token_id), dtype=input_ids.dtype, device=input_ids.device)
    history = [[t for t, m in zip(r, mk) if m] for r, mk in zip(input_ids.tolist(), attention_mask.tolist())]
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(B, T + max_new_tokens)
        logits = model(input_ids, attention_mask=attention_mask, cache=cache).logits[:, -1]
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            logits = logits.float()
            block_repeated_ngrams(logits, history, no_repeat_ngram_size)
            if do_sample:
                probs = next_token_scores(logits, temperature, top_k, top_p).softmax(-1)
                token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            else:
                token = logits.argmax(-1)
            finished = finished | torch.isin(token, ends)
            yield token, finished
            if bool(finished.all()) or step + 1 == max_new_tokens:
                return
            for r, t in enumerate(token.tolist()):
                history[r].append(t)
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
            logits = model(token[:, None], attention_mask=attention_mask, cache=cache).logits[:, -1]
    finally:
        model.train(was_training)


@torch.no_grad()
def generate(
    model: Model,
    input_ids: torch.Tensor,                     # [B, T], left-padded when lengths differ
    attention_mask: torch.Tensor | None = None,  # [B, T]
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
) -> torch.Tensor:
    """Return [B, T + n] with n <= max_new_tokens new tokens; rows that ended early are padded.
    num_beams > 1: beam search (models/beam_search.py; no sampling), else greedy or sampling."""
    ends = _end_ids(model, eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (ends[0] if ends else 0)
    if num_beams > 1:
        if do_sample:
            raise ValueError("beam search does not sample: use num_beams=1 with do_sample")
        _check(model, input_ids.shape[1], max_new_tokens)
        return beam_search(model, input_ids, attention_mask, num_beams=num_beams, max_new_tokens=max_new_tokens,
                           length_penalty=length_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                           eos_token_id=ends or None, pad_token_id=pad)
    new_tokens, done = [], None
    for token, finished in decode_steps(model, input_ids, attention_mask, max_new_tokens, do_sample, temperature,
                                        top_k, top_p, no_repeat_ngram_size, ends, generator):
        # a row that had finished before this step gets padding; the end token itself is kept
        new_tokens.append(token if done is None else torch.where(done, torch.full_like(token, pad), token))
        done = finished
    return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)
