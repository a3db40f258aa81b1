"""Decoding for causal LMs with the KV cache: greedy, or sampling with temperature, top-k and top-p."""

from __future__ import annotations

import torch

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
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return [B, T + n] with n <= max_new_tokens new tokens; finished rows are padded."""
    if model.config.head != "causal-lm":
        raise ValueError(f"generate needs a causal-lm head, this model has {model.config.head!r}")
    B, T = input_ids.shape
    limit = model.config.max_position_embeddings
    if T + max_new_tokens > limit:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds the model's {limit} positions")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif not bool(attention_mask[:, -1].all()):
        raise ValueError("batched prompts must be left-padded (attention_mask[:, -1] must be all 1)")
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    pad = pad_token_id if pad_token_id is not None else (eos if eos is not None else 0)
    was_training = model.training
    model.eval()
    cache = model.new_cache(B, T + max_new_tokens)
    logits = model(input_ids, attention_mask=attention_mask, cache=cache).logits[:, -1]
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    new_tokens = []
    for step in range(max_new_tokens):
        if do_sample:
            probs = next_token_scores(logits.float(), temperature, top_k, top_p).softmax(-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            token = logits.argmax(-1)
        token = torch.where(finished, torch.full_like(token, pad), token)
        new_tokens.append(token)
        if eos is not None:
            finished |= token == eos
            if bool(finished.all()):
                break
        if step + 1 == max_new_tokens:
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        logits = model(token[:, None], attention_mask=attention_mask, cache=cache).logits[:, -1]
    model.train(was_training)
    return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)
