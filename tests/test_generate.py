"""models.generate: greedy and sampling with no-repeat-n-gram blocking and several end tokens,
against `transformers`' generate on the same random GPT-2; beam search through generate()."""

import pytest
import torch

from lmforge.models import generate
from lmforge.models.beam_search import beam_search
from lmforge.models.generate import decode_steps
from tests.test_beam_search import models  # noqa: F401  (the fixture)
from tests.test_hf_parity import V


@torch.no_grad()
@pytest.mark.parametrize("ngram, ends, shape", [
    (2, [V - 1], (1, 5)),
    (3, [V - 1], (2, 6)),
    (0, "frequent2", (2, 4)),     # two stop tokens
    (1, "frequent2", (1, 3)),
])
def test_greedy_with_ngrams_and_stop_tokens_matches_transformers(models, ngram, ends, shape):
    ref, ours = models
    prompt = torch.randint(1, V - 1, shape, generator=torch.Generator().manual_seed(ngram + shape[1]))
    if ends == "frequent2":
        free = ref.generate(prompt[:1], attention_mask=torch.ones_like(prompt[:1]), max_new_tokens=20,
                            do_sample=False, pad_token_id=0, eos_token_id=None)[0, shape[1]:].tolist()
        ends = [free[3], free[6]]
    want = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=25, do_sample=False,
                        no_repeat_ngram_size=ngram, eos_token_id=ends, pad_token_id=0)
    got = generate(ours, prompt, max_new_tokens=25, no_repeat_ngram_size=ngram, eos_token_id=ends, pad_token_id=0)
    assert got.tolist() == want.tolist()   # padding after each row's end token included


@torch.no_grad()
def test_sampling_is_seeded_and_respects_top_k(models):
    _, ours = models
    prompt = torch.randint(1, V - 1, (2, 4), generator=torch.Generator().manual_seed(0))

    def run(seed, **kw):
        return generate(ours, prompt, max_new_tokens=15, do_sample=True, eos_token_id=[],
                        generator=torch.Generator().manual_seed(seed), **kw)
    assert run(1).tolist() == run(1).tolist()
    assert run(1).tolist() != run(2).tolist()
    # top_k=1 sampling is greedy
    assert run(3, top_k=1).tolist() == generate(ours, prompt, max_new_tokens=15, eos_token_id=[]).tolist()


@torch.no_grad()
def test_decode_steps_stream_what_generate_returns(models):
    _, ours = models
    prompt = torch.randint(1, V - 1, (1, 5), generator=torch.Generator().manual_seed(4))
    streamed = [int(t[0]) for t, _ in decode_steps(ours, prompt, max_new_tokens=12, eos_token_id=[])]
    assert streamed == generate(ours, prompt, max_new_tokens=12, eos_token_id=[])[0, 5:].tolist()


@torch.no_grad()
def test_generate_with_beams_is_beam_search(models):
    _, ours = models
    prompt = torch.randint(1, V - 1, (2, 4), generator=torch.Generator().manual_seed(5))
    kw = dict(max_new_tokens=10, length_penalty=0.8, no_repeat_ngram_size=3, eos_token_id=V - 1)
    assert generate(ours, prompt, num_beams=4, **kw).tolist() == beam_search(ours, prompt, num_beams=4, **kw).tolist()
    with pytest.raises(ValueError, match="does not sample"):
        generate(ours, prompt, num_beams=4, do_sample=True)
