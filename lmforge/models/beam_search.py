"""Beam search with a length penalty and no-repeat-n-gram blocking (the LoRA paper's NLG decoding:
beam 10, length penalty 0.8-0.9, no-repeat-n-gram 4), over the model's KV cache.

No-repeat-n-gram blocking looks at the prompt and the output together (no_repeat_ngram_scope="all",
as `transformers`' no_repeat_ngram_size does), or at the output alone ("output", as the LoRA paper's
examples/NLG/src/gpt2_beam.py does: an n-gram of the prompt may then be generated once more).

Per prompt, `num_beams` hypotheses run as rows of one batch. At each step every running beam's
log-probabilities are added to its score; of the beams x vocabulary continuations the best
2 x num_beams are kept, so that num_beams of them still run after some have ended:

- a continuation that ends (the end-of-text token, or the last allowed step) and ranks among the
  best num_beams becomes a finished hypothesis, scored by its summed log-probability divided by
  (generated length, end token included) ** length_penalty; the best num_beams finished ones are kept;
- the best num_beams that did not end keep running; the cache rows follow the beams they extend.

Prompts of different lengths need no padding: each cache row has its own length (models/kv_cache.py).

A prompt is done when it holds num_beams finished hypotheses and its best running beam, scored at
its current length, cannot beat the worst of them (the usual heuristic: with a positive length
penalty a longer beam could in principle still overtake). The answer is the best finished
hypothesis. These are the semantics of `transformers`' beam search with `early_stopping=False`
(its default); tests/test_beam_search.py compares the two token for token.
"""

from __future__ import annotations

import torch

NEG = -1.0e9   # "never chosen" without the inf - inf = nan of a real -inf
NGRAM_SCOPES = ("all", "output")   # what no-repeat-n-gram blocking looks at: prompt + output, or output only


def banned_by_ngrams(sequence: list[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already present in `sequence` (no_repeat_ngram_size)."""
    if n <= 0 or len(sequence) < n - 1:
        return []
    prefix = tuple(sequence[len(sequence) - (n - 1):]) if n > 1 else ()
    return [sequence[i + n - 1] for i in range(len(sequence) - n + 1)
            if tuple(sequence[i:i + n - 1]) == prefix]


def check_ngram_scope(scope: str) -> None:
    if scope not in NGRAM_SCOPES:
        raise ValueError(f"no_repeat_ngram_scope must be one of {', '.join(map(repr, NGRAM_SCOPES))}, got {scope!r}")


def ngram_history(prompt: list[int], output: list[int], scope: str) -> list[int]:
    """The tokens whose n-grams may not be repeated: prompt and output ("all"), or the output alone ("output")."""
    return prompt + output if scope == "all" else output


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
def beam_search(model, input_ids, attention_mask: torch.Tensor | None = None, *,
                num_beams: int = 4, max_new_tokens: int = 20, length_penalty: float = 1.0,
                no_repeat_ngram_size: int = 0, no_repeat_ngram_scope: str = "all",
                eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None):
    """input_ids [B, T] (left-padded, with attention_mask, when lengths differ) -> [B, T + n]: each
    prompt followed by its best hypothesis, padded with the pad id after its end. A list of prompts
    (token-id lists of any lengths) -> a list: each prompt followed by its best hypothesis.

    The prompts are prefilled once each, packed (models/generate.py), and their cache rows copied to
    their beams; a prompt that is done leaves the batch, so the steps after it compute the others only."""
    from lmforge.models.generate import context, decode_step, prefill, prompt_lists   # generate.py imports this module

    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    check_ngram_scope(no_repeat_ngram_scope)
    prompts = prompt_lists(input_ids, attention_mask)
    B, K, device = len(prompts), num_beams, model.device
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    eos = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]   # several end tokens
    end_ids = torch.tensor(eos, dtype=torch.long, device=device)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    was_training = model.training
    model.eval()
    state, logits = prefill(model, prompts, max_new_tokens)         # [B, V]
    fan_out = torch.arange(B, device=device).repeat_interleave(K)  # [B K]: beams of a prompt adjacent
    state.keep(fan_out)
    logits = logits[fan_out]                                       # [B K, V]
    scores = torch.full((B, K), NEG, device=device)
    scores[:, 0] = 0.0                                             # at first all beams are the same
    generated: list[list[int]] = [[] for _ in range(B * K)]       # per cache row: its beam's tokens
    finished = [_Finished(K) for _ in range(B)]
    live = list(range(B))          # the prompts still searching, in cache order (K rows each)
    for step in range(max_new_tokens):
        n = len(live)
        logp = torch.log_softmax(logits.float(), dim=-1)           # [n K, V]
        if no_repeat_ngram_size > 0:
            histories = [ngram_history(context(model, prompts[live[i // K]]), g, no_repeat_ngram_scope)
                         for i, g in enumerate(generated)]
            block_repeated_ngrams(logp, histories, no_repeat_ngram_size)
        V = logp.shape[-1]
        total = (scores[:, :, None] + logp.view(n, K, V)).view(n, K * V)
        top, index = total.topk(2 * K, dim=-1)                     # [n, 2K], best first
        beam, token = index // V, index % V
        last = step + 1 == max_new_tokens
        ends = torch.ones_like(token, dtype=torch.bool) if last else torch.isin(token, end_ids)
        gen_len = step + 1
        top_l, beam_l, token_l, ends_l = top.tolist(), beam.tolist(), token.tolist(), ends.tolist()
        for i, b in enumerate(live):
            for j in range(K):                                      # only the best K may finish
                if ends_l[i][j]:
                    finished[b].add(top_l[i][j] / gen_len ** length_penalty,
                                    generated[i * K + beam_l[i][j]] + [token_l[i][j]])
        # the best K continuations that did not end keep running
        keep = torch.where(ends, torch.full_like(top, NEG), top).topk(K, dim=-1).indices   # [n, K]
        src = beam.gather(1, keep)                                 # [n, K] beam each one extends
        new_tokens = token.gather(1, keep)
        scores = top.gather(1, keep).masked_fill(ends.gather(1, keep), NEG)
        rows_from = src + torch.arange(n, device=device)[:, None] * K   # [n, K] cache row each extends
        # a prompt is done when no running beam, scored at this length, can beat its worst finished one
        best_running = (scores[:, 0] / gen_len ** length_penalty).tolist()
        still = [i for i, b in enumerate(live) if not (finished[b].full() and best_running[i] <= finished[b].worst())]
        if last or not still:
            break
        if len(still) < n:   # done prompts leave the batch: their K rows are not computed again
            sel = torch.tensor(still, device=device)
            scores, new_tokens, rows_from = scores[sel], new_tokens[sel], rows_from[sel]
            live = [live[i] for i in still]
        rows_from, new_tokens = rows_from.view(-1), new_tokens.view(-1)   # [len(live) K]
        generated = [generated[r] + [t] for r, t in zip(rows_from.tolist(), new_tokens.tolist())]
        state.keep(rows_from)
        logits = decode_step(model, state, new_tokens)
    model.train(was_training)
    best = [finished[b].items[0][1] for b in range(B)]
    if not torch.is_tensor(input_ids):
        return [p + x for p, x in zip(prompts, best)]
    width = max(len(x) for x in best)
    out = torch.full((B, width), pad, dtype=input_ids.dtype, device=input_ids.device)
    for b, x in enumerate(best):
        out[b, :len(x)] = torch.tensor(x, dtype=input_ids.dtype)
    return torch.cat([input_ids, out], dim=1)
