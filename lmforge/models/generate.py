"""Decoding for causal LMs with the KV cache: greedy, sampling (temperature, top-k, top-p, seeded), or
beam search (models/beam_search.py); no-repeat-n-gram blocking and several end (stop) tokens in all.
No-repeat-n-gram blocking covers the prompt and the output together (no_repeat_ngram_scope="all", the
default, as `transformers` does) or the output alone ("output", the LoRA paper's decoding code).

Prompts of different lengths decode together in the packed layout, without padding: the prefill runs
them as one packed stream (models/packing.py) into a cache with a length per sequence
(models/kv_cache.py), then each step feeds one token per live sequence at its own position, which
attends to its own cached keys only. A sequence that produces an end token leaves the batch, so the
steps after it compute only the sequences still running. Prompts come as a list of token-id lists of
any lengths, or as a [B, T] batch, left-padded with its attention_mask when lengths differ (the
padding is dropped before decoding).

An encoder-decoder reads each prompt as its source: the sources are encoded once (one padded batch),
and the decoder starts every row from the decoder start token, so its rows advance together; the
cross-attention keys and values of the encoded sources are made once (models/memory.py) and follow
the rows the cache keeps. Its no-repeat-n-gram history is the decoder's own tokens (the start token
and the output), as `transformers` has it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence, Union

import torch

from lmforge.models.beam_search import beam_search, block_repeated_ngrams, check_ngram_scope
from lmforge.models.kv_cache import KVCache
from lmforge.models.memory import Memory
from lmforge.models.model import Model
from lmforge.models.packing import Packed

Prompts = Union[torch.Tensor, Sequence[Sequence[int]]]   # [B, T] ids, or B token-id lists


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
    c = model.config
    if c.head != "causal-lm":
        raise ValueError(f"generate needs a causal-lm head, this model has {c.head!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    limit = c.max_position_embeddings
    if c.is_encoder_decoder:   # the source and the output have positions of their own
        if c.decoder_start_token_id is None:
            raise ValueError("this encoder-decoder has no decoder_start_token_id (nor bos_token_id) to start from")
        if T > limit or 1 + max_new_tokens > limit:
            raise ValueError(f"a source of {T} tokens or 1 + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"model's {limit} positions")
    elif T + max_new_tokens > limit:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds the model's {limit} positions")


def context(model: Model, prompt: list[int]) -> list[int]:
    """The tokens before a row's output in its decoder: its prompt (a decoder), or the decoder start
    token (an encoder-decoder, whose prompt is the source). No-repeat-n-gram blocking's "all" scope."""
    return [model.config.decoder_start_token_id] if model.config.is_encoder_decoder else prompt


@dataclass
class DecodeState:
    """What decoding continues from: the decoder's KV cache and, for an encoder-decoder, its encoded
    sources; row b of each is the same sequence."""
    cache: KVCache
    memory: Memory | None = None

    def keep(self, rows: torch.Tensor) -> None:
        """Keep these rows [R] in this order (finished sequences leave; beams follow their parents)."""
        self.cache.keep(rows)
        if self.memory is not None:
            self.memory.keep(rows)


def prompt_lists(input_ids: Prompts, attention_mask: torch.Tensor | None = None) -> list[list[int]]:
    """Each prompt's tokens: a list of prompts as given, or the rows of a [B, T] batch without their
    (left) padding."""
    if torch.is_tensor(input_ids):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length] or a list of prompts, got shape {list(input_ids.shape)}")
        if attention_mask is None:
            prompts = input_ids.tolist()
        elif not bool(attention_mask[:, -1].all()):
            raise ValueError("batched prompts must be left-padded (attention_mask[:, -1] must be all 1)")
        else:
            prompts = [[t for t, m in zip(r, mk) if m] for r, mk in zip(input_ids.tolist(), attention_mask.tolist())]
    else:
        if attention_mask is not None:
            raise ValueError("a list of prompts needs no attention_mask (it goes with a padded [B, T] tensor)")
        prompts = [[int(t) for t in (p.tolist() if torch.is_tensor(p) else p)] for p in input_ids]
    if not prompts:
        raise ValueError("no prompts to decode")
    empty = next((i for i, p in enumerate(prompts) if not p), None)
    if empty is not None:
        raise ValueError(f"prompt {empty} has no tokens")
    return prompts


def prefill(model: Model, prompts: list[list[int]], max_new_tokens: int) -> tuple[DecodeState, torch.Tensor]:
    """Run the prompts as one packed stream into a new cache (row b: prompt b, with room for
    max_new_tokens more); return the state and each prompt's next-token logits [B, V].
    An encoder-decoder: encode the prompts (its sources), then run the decoder start token."""
    device = model.device
    if model.config.is_encoder_decoder:
        B, S = len(prompts), max(map(len, prompts))
        source = torch.full((B, S), model.config.pad_token_id or 0, dtype=torch.long, device=device)
        mask = torch.zeros(B, S, dtype=torch.long, device=device)
        for b, p in enumerate(prompts):   # right-padded: the encoder is bidirectional and masks padding
            source[b, :len(p)], mask[b, :len(p)] = torch.tensor(p, device=device), 1
        state = DecodeState(model.new_cache(B, 1 + max_new_tokens), model.encode(source, mask))
        start = torch.full((B,), model.config.decoder_start_token_id, dtype=torch.long, device=device)
        return state, decode_step(model, state, start)
    packed = Packed.from_lengths([len(p) for p in prompts], device)
    state = DecodeState(model.new_cache(len(prompts), packed.max_len + max_new_tokens, reserve_prefix=True))
    stream = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)   # [N]
    # the LM head scores each prompt's last token only
    return state, model(stream, packed=packed, cache=state.cache, positions=packed.last).logits


def decode_step(model: Model, state: DecodeState, tokens: torch.Tensor) -> torch.Tensor:
    """Token b of tokens [R] after cache row b's past, each at its own position -> logits [R, V]."""
    return model(tokens, packed=Packed.singles(tokens.numel(), tokens.device), cache=state.cache,
                 memory=state.memory).logits


@dataclass
class RowSettings:
    """How one row decodes (each row of a RowDecoder may have its own)."""
    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    no_repeat_ngram_size: int = 0
    no_repeat_ngram_scope: str = "all"          # "all": prompt + output; "output": the output alone
    generator: torch.Generator | None = None    # sampling: this row's own random stream


class RowDecoder:
    """Greedy or sampled decoding of several prompts together, each row with its own settings (a
    server's requests): `step()` picks every live row's next token; a row leaves the batch when it
    produces an end token, reaches its max_new_tokens, or its caller `stop`s it (a stop string, a
    client that went away). The forward pass for the tokens picked runs at the start of the next
    step, for the rows still live only. A row decodes exactly as it would alone: its logits do not
    depend on the other rows (packed layout, a cache row each) and its sampling draws from its own
    generator."""

    @torch.no_grad()
    def __init__(self, model: Model, prompts: list[list[int]], settings: list[RowSettings],
                 end_ids: list[int]):
        if len(settings) != len(prompts):
            raise ValueError(f"{len(settings)} settings for {len(prompts)} prompts")
        for s in settings:
            check_ngram_scope(s.no_repeat_ngram_scope)
        _check(model, max(map(len, prompts)), max(s.max_new_tokens for s in settings))
        self.model, self.settings = model, settings
        self.ends = set(int(e) for e in end_ids)
        # each row's tokens whose n-grams may not be repeated: its context and output so far, or its output
        self.history = [list(context(model, p)) if s.no_repeat_ngram_scope == "all" else []
                        for p, s in zip(prompts, settings)]
        self.produced = [0] * len(prompts)
        self.state, self.logits = prefill(model, prompts, max(s.max_new_tokens for s in settings))
        self.live = list(range(len(prompts)))     # the row each cache row decodes
        self._next: list[int] | None = None       # tokens to feed before the next pick

    @property
    def done(self) -> bool:
        return not self.live

    def stop(self, row: int) -> None:
        """Take `row` out of the batch (before the next forward pass)."""
        if row in self.live:
            keep = [i for i, r in enumerate(self.live) if r != row]
            self._drop(keep)

    def _drop(self, keep: list[int]) -> None:
        if len(keep) == len(self.live):
            return
        self.state.keep(torch.tensor(keep, dtype=torch.long, device=self.model.device))
        self.live = [self.live[i] for i in keep]
        if self._next is not None:   # picked: the next forward runs for the kept rows
            self._next = [self._next[i] for i in keep]
        else:                        # not yet: the prefill's logits of the kept rows
            self.logits = self.logits[keep]

    @torch.no_grad()
    def step(self) -> list[tuple[int, int, bool]]:
        """(row, token, finished) for every live row: its next token, and whether the row has ended
        (an end token, which the caller may drop, or its last allowed token)."""
        if self.done:
            return []
        if self._next is not None:
            tokens = torch.tensor(self._next, dtype=torch.long, device=self.model.device)
            self.logits = decode_step(self.model, self.state, tokens)
        logits = self.logits.float()                                       # [R, V], R live rows
        # greedy rows: one pick for all, one sync. max's indices are argmax's (the first of equal
        # maxima; NaN wins in both) at a third of its time over a vocabulary on a CPU
        picked = logits.max(-1).indices.tolist()
        for i, row in enumerate(self.live):
            s = self.settings[row]
            if not (s.do_sample or s.no_repeat_ngram_size):
                continue
            scores = logits[i:i + 1]
            block_repeated_ngrams(scores, [self.history[row]], s.no_repeat_ngram_size)
            if s.do_sample:
                probs = next_token_scores(scores, s.temperature, s.top_k, s.top_p).softmax(-1)
                picked[i] = int(torch.multinomial(probs, 1, generator=s.generator))
            else:
                picked[i] = int(scores.argmax(-1))
        out, keep = [], []
        for i, (row, token) in enumerate(zip(self.live, picked)):
            self.produced[row] += 1
            self.history[row].append(token)
            finished = token in self.ends or self.produced[row] >= self.settings[row].max_new_tokens
            out.append((row, token, finished))
            if not finished:
                keep.append(i)
        self._next = picked
        self._drop(keep)
        return out


@torch.no_grad()
def decode_steps(
    model: Model,
    input_ids: Prompts,                          # [B, T], left-padded when lengths differ; or B lists
    attention_mask: torch.Tensor | None = None,  # [B, T]
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    no_repeat_ngram_size: int = 0,
    eos_token_id: int | list[int] | None = None,
    generator: torch.Generator | None = None,
    no_repeat_ngram_scope: str = "all",          # "all": prompt + output; "output": the output alone
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Greedy or sampled decoding, one step at a time: yields (tokens [B], finished [B]) per step,
    `finished` true from the step a row produced an end token (after it, the row repeats that token;
    it is no longer computed). Stops when every row has finished or after max_new_tokens steps.
    (Every row the same settings, one generator: RowDecoder with each row's settings alike.)"""
    check_ngram_scope(no_repeat_ngram_scope)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompts = prompt_lists(input_ids, attention_mask)
    B, device = len(prompts), model.device
    ends = _end_ids(model, eos_token_id)
    # one generator shared by the rows, drawn in row order each step: as a [B, V] multinomial draws
    settings = [RowSettings(max_new_tokens, do_sample, temperature, top_k, top_p, no_repeat_ngram_size,
                            no_repeat_ngram_scope, generator) for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        dec = RowDecoder(model, prompts, settings, ends)
        tokens = torch.zeros(B, dtype=torch.long, device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            for row, token, _last in dec.step():
                tokens[row] = token
                finished[row] = token in ends
            yield tokens.clone(), finished.clone()
            if dec.done:
                return
    finally:
        model.train(was_training)


@torch.no_grad()
def generate(
    model: Model,
    input_ids: Prompts,                          # [B, T], left-padded when lengths differ; or B lists
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
    no_repeat_ngram_scope: str = "all",
):
    """A [B, T] batch -> [B, T + n] with n <= max_new_tokens new tokens, rows that ended early padded
    with pad_token_id after their end token. A list of prompts -> a list: each prompt followed by its
    new tokens (up to and including its end token; no padding).
    num_beams > 1: beam search (models/beam_search.py; no sampling), else greedy or sampling.
    no_repeat_ngram_scope: the n-grams no_repeat_ngram_size forbids repeating are those of the prompt
    and the output ("all", transformers' no_repeat_ngram_size) or of the output alone ("output", the
    LoRA paper's gpt2_beam.py: the output may repeat a span of its prompt, e.g. a restaurant's name)."""
    ends = _end_ids(model, eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (ends[0] if ends else 0)
    if num_beams > 1:
        if do_sample:
            raise ValueError("beam search does not sample: use num_beams=1 with do_sample")
        _check(model, max(map(len, prompt_lists(input_ids, attention_mask))), max_new_tokens)
        return beam_search(model, input_ids, attention_mask, num_beams=num_beams, max_new_tokens=max_new_tokens,
                           length_penalty=length_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                           no_repeat_ngram_scope=no_repeat_ngram_scope, eos_token_id=ends or None,
                           pad_token_id=pad)
    new_tokens, done = [], None
    for token, finished in decode_steps(model, input_ids, attention_mask, max_new_tokens, do_sample, temperature,
                                        top_k, top_p, no_repeat_ngram_size, ends, generator,
                                        no_repeat_ngram_scope=no_repeat_ngram_scope):
        # a row that had finished before this step gets padding; the end token itself is kept
        new_tokens.append(token if done is None else torch.where(done, torch.full_like(token, pad), token))
        done = finished
    new = torch.stack(new_tokens, dim=1)                                   # [B, n]
    if torch.is_tensor(input_ids):
        return torch.cat([input_ids, new.to(input_ids.device)], dim=1)
    out = []   # each prompt and its new tokens up to the first end token (the step it finished)
    for prompt, row in zip(prompt_lists(input_ids), new.tolist()):
        end = next((i for i, t in enumerate(row) if t in ends), None)
        out.append(prompt + (row if end is None else row[:end + 1]))
    return out
