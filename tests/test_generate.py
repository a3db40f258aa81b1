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


class OutputOnlyNoRepeat:
    """A transformers logits processor blocking repeated n-grams of the output alone (the tokens after
    the prompt's T), written independently of lmforge's: the reference for no_repeat_ngram_scope="output"."""

    def __init__(self, n: int, T: int):
        self.n, self.T = n, T

    def __call__(self, input_ids, scores):
        n = self.n
        for r, out in enumerate(input_ids[:, self.T:].tolist()):
            if len(out) < n - 1:
                continue
            seen = {tuple(out[i:i + n]) for i in range(len(out) - n + 1)}
            prefix = tuple(out[len(out) - n + 1:])
            for gram in seen:
                if gram[:-1] == prefix:
                    scores[r, gram[-1]] = float("-inf")
        return scores


def ngrams(seq, n):
    return [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]


def repeated_after(seq, n, T):
    """The n-grams of seq that end after position T (in the output) and occurred before."""
    grams = ngrams(seq, n)
    return [g for i, g in enumerate(grams) if i + n > T and g in grams[:i]]


def looping_prompt(ref, seed, length, n):
    """A prompt that ends inside a loop of the model's free greedy continuation: the prompt followed
    by that continuation's first tokens, so the continuation wants to repeat n-grams of the prompt."""
    start = torch.randint(1, V - 1, (1, length), generator=torch.Generator().manual_seed(seed))
    free = ref.generate(start, attention_mask=torch.ones_like(start), max_new_tokens=30, do_sample=False,
                        pad_token_id=0, eos_token_id=None)
    return free[:, :length + 12]


@torch.no_grad()
@pytest.mark.parametrize("n, beams", [(2, 1), (3, 1), (2, 4), (3, 3)])
def test_output_scope_blocks_ngrams_of_the_output_only(models, n, beams):
    """no_repeat_ngram_scope="output" equals transformers with blocking of the output's n-grams alone,
    greedy and beam; it generates an n-gram of the prompt (which "all" blocks) and never repeats one
    of its own."""
    from transformers import LogitsProcessorList

    ref, ours = models
    prompt = looping_prompt(ref, seed=n + beams, length=4, n=n)
    T, new = prompt.shape[1], 16
    want = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False,
                        num_beams=beams, eos_token_id=None, pad_token_id=0, early_stopping=False,
                        logits_processor=LogitsProcessorList([OutputOnlyNoRepeat(n, T)]))
    kw = dict(max_new_tokens=new, no_repeat_ngram_size=n, num_beams=beams, eos_token_id=[])
    got = generate(ours, prompt, no_repeat_ngram_scope="output", **kw)
    assert got.tolist() == want.tolist()
    out, prompt_list = got[0, T:].tolist(), prompt[0].tolist()
    assert not repeated_after(out, n, 0), "an n-gram repeated within the output"
    assert set(ngrams(out, n)) & set(ngrams(prompt_list, n)), "no n-gram of the prompt generated: the case tests nothing"
    strict = generate(ours, prompt, no_repeat_ngram_scope="all", **kw)[0].tolist()
    assert not repeated_after(strict, n, T)   # "all": no n-gram of prompt + output is generated again
    assert strict[T:] != out


@torch.no_grad()
def test_ngram_scope_is_checked(models):
    _, ours = models
    prompt = [[3, 4, 5]]
    for beams in (1, 3):
        with pytest.raises(ValueError, match="no_repeat_ngram_scope must be one of 'all', 'output', got 'prompt'"):
            generate(ours, prompt, num_beams=beams, no_repeat_ngram_size=2, no_repeat_ngram_scope="prompt")


# each row its own settings: (max_new_tokens, do_sample, temperature, top_k, top_p, ngram, scope, seed)
ROWS = [
    (6, False, 1.0, 0, 1.0, 0, "all", None),
    (9, True, 0.8, 10, 1.0, 0, "all", 3),
    (4, False, 1.0, 0, 1.0, 2, "output", None),
    (7, True, 1.3, 0, 0.9, 2, "all", 5),
]


@torch.no_grad()
def test_rows_with_their_own_settings_decode_as_each_alone(models):
    """RowDecoder (a server's requests decoded together): every row's tokens equal that row decoded
    alone, whatever the other rows' settings, lengths and stops; greedy rows equal generate()."""
    from lmforge.models.generate import RowDecoder, RowSettings
    _, ours = models
    prompts = [torch.randint(1, V - 1, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 2, 7, 3)]

    def settings(row):
        n, sample, temp, k, p, ngram, scope, seed = ROWS[row]
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        return RowSettings(n, sample, temp, k, p, ngram, scope, g)

    def run(rows, stop_at=None):
        dec = RowDecoder(ours, [prompts[r] for r in rows], [settings(r) for r in rows], [])
        out = {r: [] for r in rows}
        if stop_at and stop_at[1] == 0:   # stopped before its first token
            dec.stop(rows.index(stop_at[0]))
        while not dec.done:
            for i, token, _ in dec.step():
                out[rows[i]].append(token)
                if stop_at and rows[i] == stop_at[0] and len(out[rows[i]]) == stop_at[1]:
                    dec.stop(i)
        return out

    together = run([0, 1, 2, 3])
    for r in range(4):
        assert together[r] == run([r])[r], r
        assert len(together[r]) == ROWS[r][0]
    for r in (0, 2):   # greedy rows: what generate() gives (no end token here)
        n, *_, ngram, scope, _seed = ROWS[r]
        want = generate(ours, [prompts[r]], max_new_tokens=n, no_repeat_ngram_size=ngram,
                        no_repeat_ngram_scope=scope, eos_token_id=[])[0][len(prompts[r]):]
        assert together[r] == want
    stopped = run([0, 1, 2, 3], stop_at=(1, 2))   # row 1 stopped by its caller after 2 tokens
    assert stopped[1] == together[1][:2] and all(stopped[r] == together[r] for r in (0, 2, 3))
    stopped = run([0, 1, 2, 3], stop_at=(2, 0))   # row 2 stopped before the first step
    assert stopped[2] == [] and all(stopped[r] == together[r] for r in (0, 1, 3))
    assert prompts[0] == torch.randint(1, V - 1, (5,), generator=torch.Generator().manual_seed(5)).tolist()
