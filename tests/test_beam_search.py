"""Beam search (models/beam_search.py) against `transformers`' generate(num_beams=...): the same
tokens for the same random GPT-2, over beams, length penalties, n-gram blocking and end tokens."""

from collections import Counter

import pytest
import torch

from lmforge.models import from_pretrained
from lmforge.models.beam_search import banned_by_ngrams, beam_search
from tests.test_hf_parity import V, random_hf_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    ref = random_hf_model("gpt2", "GPT2LMHeadModel", None, seed=3)
    d = tmp_path_factory.mktemp("gpt2")
    ref.save_pretrained(d)
    return ref, from_pretrained(d).eval()


def frequent_token(ref, prompt) -> int:
    """A token greedy decoding produces often: as the end token, beams end at different steps."""
    out = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                       pad_token_id=0, eos_token_id=None)
    return Counter(out[0, prompt.shape[1]:].tolist()).most_common(1)[0][0]


# (beams, length penalty, no-repeat n-gram, new tokens, prompts x length, end token: "rare" | "frequent")
CASES = [
    (1, 1.0, 0, 12, (1, 5), "rare"),
    (4, 1.0, 0, 12, (1, 5), "rare"),
    (4, 0.8, 0, 15, (1, 3), "frequent"),
    (10, 0.9, 4, 20, (1, 6), "frequent"),
    (5, 2.0, 2, 15, (2, 4), "frequent"),
    (3, 0.0, 3, 10, (3, 7), "frequent"),
    (6, -0.5, 0, 12, (2, 2), "frequent"),
    (4, 1.0, 2, 30, (2, 5), "frequent"),
    (8, 0.8, 3, 30, (1, 4), "frequent"),
    (3, 1.0, 0, 25, (2, 3), "frequent"),
    (2, 1.5, 1, 20, (1, 8), "rare"),
]


@torch.no_grad()
@pytest.mark.parametrize("beams, penalty, ngram, new, shape, end", CASES)
def test_beam_search_matches_transformers(models, beams, penalty, ngram, new, shape, end):
    ref, ours = models
    g = torch.Generator().manual_seed(beams * 7 + new)
    prompt = torch.randint(1, V - 1, shape, generator=g)
    eos = V - 1 if end == "rare" else frequent_token(ref, prompt[:1])
    want = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False,
                        num_beams=beams, length_penalty=penalty, no_repeat_ngram_size=ngram,
                        eos_token_id=eos, pad_token_id=0, early_stopping=False)
    got = beam_search(ours, prompt, num_beams=beams, max_new_tokens=new, length_penalty=penalty,
                      no_repeat_ngram_size=ngram, eos_token_id=eos, pad_token_id=0)

    def strip(row):   # the answer up to and including its end token; padding after it differs in width
        row = row[prompt.shape[1]:]
        return row[:row.index(eos) + 1] if eos in row else row
    assert [strip(r) for r in got.tolist()] == [strip(r) for r in want.tolist()]
    assert got[:, :prompt.shape[1]].tolist() == prompt.tolist()


@pytest.mark.parametrize("seq, n, banned", [
    ([1, 2, 3, 1, 2], 3, [3]),            # "1 2" was followed by 3
    ([1, 2, 1, 2, 1], 2, [2, 2]),         # "1" was followed by 2 (twice)
    ([5, 6, 7], 4, []),                   # no earlier 3-token prefix
    ([4, 4, 4], 1, [4, 4, 4]),            # unigrams: every token already used
    ([], 2, []),
])
def test_banned_by_ngrams(seq, n, banned):
    assert banned_by_ngrams(seq, n) == banned


@torch.no_grad()
def test_no_repeat_ngram_holds_in_the_output(models):
    _, ours = models
    prompt = torch.randint(1, V - 1, (1, 4), generator=torch.Generator().manual_seed(1))
    out = beam_search(ours, prompt, num_beams=3, max_new_tokens=40, no_repeat_ngram_size=2, eos_token_id=V - 1)[0]
    pairs = list(zip(out.tolist(), out.tolist()[1:]))
    assert len(pairs) == len(set(pairs))
