"""BERT's masked-LM corruption of one sequence.

Of the maskable tokens (text, never a special token or padding), `round(p * n)` are chosen (at
least one); whole-word masking chooses whole words (a word is a token with its word-start flag and
the continuation pieces after it) in random order, skipping a word that would overshoot the count,
as BERT's reference implementation does. Each chosen token independently becomes the mask token
with probability 0.8, a random *ordinary* token (never a special one) with 0.1, or stays unchanged
with 0.1. Labels hold the original id at chosen positions and -100 everywhere else.

The ids come from a `MaskSpec` built from the tokenizer object (`MaskSpec.from_tokenizer`), never
from constants. Randomness comes from the Generator passed in, so a caller decides whether masks are
fixed (static: a generator seeded by the sequence) or new each visit (dynamic: seeded by the visit).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from lmforge.errors import ConfigError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class MaskSpec:
    mask_id: int
    special_ids: frozenset
    random_ids: np.ndarray         # int64: the ids a "random token" is drawn from
    probability: float = 0.15
    whole_word: bool = False

    @classmethod
    def from_tokenizer(cls, tokenizer, probability: float = 0.15, whole_word: bool = False) -> "MaskSpec":
        mask_id = tokenizer.mask_token_id
        if mask_id is None:
            raise ConfigError("the tokenizer has no mask token ([MASK] or <mask>): it cannot train a masked LM")
        specials = special_ids(tokenizer)
        vocab = np.arange(tokenizer.vocab_size, dtype=np.int64)
        random_ids = vocab[~np.isin(vocab, np.fromiter(specials, dtype=np.int64))]
        return cls(mask_id, frozenset(specials), random_ids, probability, whole_word)

    @cached_property
    def special_array(self) -> np.ndarray:
        return np.asarray(sorted(self.special_ids), dtype=np.int64)


def special_ids(tokenizer) -> set[int]:
    """Every special token id of an lmforge Tokenizer: the named ones and the added specials."""
    return set(tokenizer.special_ids)


def choose(maskable: np.ndarray, word_start: np.ndarray, spec: MaskSpec,
           rng: np.random.Generator) -> np.ndarray:
    """bool [T]: the positions to predict. maskable, word_start: bool [T]."""
    positions = np.flatnonzero(maskable)
    chosen = np.zeros(len(maskable), dtype=bool)
    if len(positions) == 0:
        return chosen
    target = max(1, int(round(spec.probability * len(positions))))
    if not spec.whole_word:
        chosen[rng.choice(positions, size=target, replace=False)] = True
        return chosen
    # words: a maskable run begins at a word-start flag or after a non-maskable position (a piece
    # whose word began in the previous sequence is a unit of its own)
    starts = maskable & (word_start | ~np.concatenate([[False], maskable[:-1]]))
    word_of = np.cumsum(starts) - 1                       # [T] word index of each position
    words = np.split(positions, np.flatnonzero(np.diff(word_of[positions])) + 1)
    count = 0
    for w in rng.permutation(len(words)):
        if count >= target:
            break
        if count + len(words[w]) > target:
            continue
        chosen[words[w]] = True
        count += len(words[w])
    return chosen


def mask_sequence(input_ids: np.ndarray, maskable: np.ndarray, word_start: np.ndarray, spec: MaskSpec,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(corrupted ids, labels) for one unpadded sequence; input_ids int64 [T], flags bool [T]."""
    maskable = maskable & ~np.isin(input_ids, spec.special_array)
    chosen = choose(maskable, word_start, spec, rng)
    labels = np.full(len(input_ids), IGNORE_INDEX, dtype=np.int64)
    labels[chosen] = input_ids[chosen]
    out = input_ids.copy()
    idx = np.flatnonzero(chosen)
    roll = rng.random(len(idx))
    to_mask, to_random = idx[roll < 0.8], idx[(roll >= 0.8) & (roll < 0.9)]
    out[to_mask] = spec.mask_id
    out[to_random] = rng.choice(spec.random_ids, size=len(to_random))
    return out, labels
