"""Beam search with a length penalty and no-repeat-n-gram blocking (the LoRA paper's NLG decoding:
beam 10, length penalty 0.8-0.9, no-repeat-n-gram 4), over the model's KV cache.

Per prompt, `num_beams` hypotheses run as rows of one batch. At each step every running beam's
log-probabilities are added to its score; of the beams x vocabulary continuations the best
2 x num_beams are kept, so that num_beams of them still run after some have ended:

- a continuation that ends (the end-of-text token, or the last allowed step) and ranks among the
  best num_beams becomes a finished hypothesis, scored by its summed log-probability divided by
  (generated length, end token included) ** length_penalty; the best num_beams finished ones are kept;
- the best num_beams that did not end keep running; the cache rows follow the beams they extend.

A prompt is done when it holds num_beams finished hypotheses and its best running beam, scored at
its current length, cannot beat the worst of them (the usual heuristic: with a positive length
penalty a longer beam could in principle still overtake). The answer is the best finished
hypothesis. These are the semantics of `transformers`' beam search with `early_stopping=False`
(its default); tests/test_beam_search.py compares the two token for token.
"""

from __future__ import annotations

import torch

NEG = -1.0e9   # "never chosen" without the inf - inf = nan of a real -inf


def banned_by_ngrams(sequence: list[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already present in `sequence` (no_repeat_ngram_size)."""
    if n <= 0 or len(sequence) < n - 1:
        return []
    prefix = tuple(sequence[len(sequence) - (n - 1):]) if n > 1 else ()
    return [sequence[i + n - 1] for i in range(len(sequence) - n + 1)
            if tuple(sequence[i:i + n - 1]) == prefix]


def block_repeated_ngrams(scores: torch.Tensor, histories: list[list[int]], n: int) -> None:
    """Set to -inf, in place, each row's scores [R, V] of the tokens that would repeat an n-gram of
    its history (the row's tokens so far)."""
    if n <= 0:
        return
    for r, seq in enumerate(histories):
        banned = banned_by_ngrams(seq, n)
        if banned:
            scores[r, banned] = float("-inf")


class _Finished:
    """The best `k` finished hypotheses of one prompt: (score, tokens), best first."""

    def __init__(self, k: int):
        self.k, self.items = k, []

    def full(self) -> bool:
        return len(self.items) >= self.k

    def worst(self) -> float:
        return self.items[-1][0] if self.full() else NEG

    def add(self, score: float, tokens: list[int]) -> None:
        self.items.append((score, tokens))
        self.items.sort(key=lambda x: -x[0])   # stable: an earlier hypothesis wins a tie
        del self.items[self.k:]


@torch.no_grad()
def beam_search(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                num_beams: int = 4, max_new_tokens: int = 20, length_penalty: float = 1.0,
                no_repeat_ngram_size: int = 0, eos_token_id: int | list[int] | None = None,
                pad_token_id: int | None = None) -> torch.Tensor:
    """[B, T + n]: each prompt (left-padded when lengths differ) followed by its best hypothesis,
    padded with the pad id after its end."""
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    B, T = input_ids.shape
    K = num_beams
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    eos = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]   # several end tokens
    end_ids = torch.tensor(eos, dtype=input_ids.dtype, device=input_ids.device)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    was_training = model.training
    model.eval()
    rows = input_ids.repeat_interleave(K, dim=0)                  # [B*K, T]: beams of a prompt adjacent
    mask = attention_mask.repeat_interleave(K, dim=0)
    prompts = [[t for t, m in zip(r, mk) if m] for r, mk in zip(rows.tolist(), mask.tolist())]
    cache = model.new_cache(B * K, T + max_new_tokens)
    logits = model(rows, attention_mask=mask, cache=cache).logits[:, -1]   # [B*K, V]
    scores = torch.full((B, K), NEG, device=rows.device)
    scores[:, 0] = 0.0                                             # at first all beams are the same
    generated: list[list[int]] = [[] for _ in range(B * K)]
    finished = [_Finished(K) for _ in range(B)]
    open_ = [True] * B                                             # may still gain a hypothesis
    for step in range(max_new_tokens):
        logp = torch.log_softmax(logits.float(), dim=-1)           # [B*K, V]
        if no_repeat_ngram_size > 0:
            block_repeated_ngrams(logp, [p + g for p, g in zip(prompts, generated)], no_repeat_ngram_size)
        V = logp.shape[-1]
        total = (scores[:, :, None] + logp.view(B, K, V)).view(B, K * V)
        top, index = total.topk(2 * K, dim=-1)                     # [B, 2K], best first
        beam, token = index // V, index % V
        last = step + 1 == max_new_tokens
        ends = torch.ones_like(token, dtype=torch.bool) if last else torch.isin(token, end_ids)
        gen_len = step + 1
        top_l, beam_l, token_l, ends_l = top.tolist(), beam.tolist(), token.tolist(), ends.tolist()
        for b in range(B):
            if not open_[b]:
                continue
            for j in range(K):                                      # only the best K may finish
                if ends_l[b][j]:
                    finished[b].add(top_l[b][j] / gen_len ** length_penalty,
                                    generated[b * K + beam_l[b][j]] + [token_l[b][j]])
        # the best K continuations that did not end keep running
        keep = torch.where(ends, torch.full_like(top, NEG), top).topk(K, dim=-1).indices   # [B, K]
        src = beam.gather(1, keep)                                 # [B, K] beam each one extends
        new_tokens = token.gather(1, keep)
        scores = top.gather(1, keep).masked_fill(ends.gather(1, keep), NEG)
        rows_from = (src + torch.arange(B, device=src.device)[:, None] * K).view(-1)   # [B*K]
        generated = [generated[i] + [t] for i, t in zip(rows_from.tolist(), new_tokens.view(-1).tolist())]
        prompts = [prompts[i] for i in rows_from.tolist()]
        for b in range(B):                                          # can a running beam still win?
            best_running = float(scores[b, 0]) / gen_len ** length_penalty
            if open_[b] and finished[b].full() and best_running <= finished[b].worst():
                open_[b] = False
        if last or not any(open_):
            break
        cache.reorder(rows_from)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits = model(new_tokens.view(-1, 1), attention_mask=mask, cache=cache).logits[:, -1]
    model.train(was_training)
    best = [finished[b].items[0][1] for b in range(B)]
    width = max(len(x) for x in best)
    out = torch.full((B, width), pad, dtype=input_ids.dtype, device=input_ids.device)
    for b, x in enumerate(best):
        out[b, :len(x)] = torch.tensor(x, dtype=input_ids.dtype)
    return torch.cat([input_ids, out], dim=1)
