"""Decoding in the packed layout with a KV cache of a length per sequence (models/kv_cache.py,
models/generate.py): prompts of different lengths decode together, without padding, exactly as each
alone; each step's logits equal a full forward of the sequence so far; finished sequences leave the
batch; greedy and beam search equal transformers' generate on the same prompts (left-padded there).
Tiny random models: GPT-2 (learned positions) and Llama with grouped-query attention (rotary)."""

import functools
from collections import Counter

import pytest
import torch

from lmforge.models import from_pretrained, generate, routing
from lmforge.models.beam_search import beam_search
from lmforge.models.generate import decode_step, decode_steps, prefill
from tests.test_hf_parity import V as GPT2_V, random_hf_model
from tests.test_llama import V as LLAMA_V, reference

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

LENGTHS = (1, 7, 3, 12, 5, 9)   # every prompt a different length; one of a single token


@pytest.fixture(scope="module", params=["gpt2", "llama-gqa"])
def models(request, tmp_path_factory):
    """(transformers model, lmforge model loaded from its checkpoint, vocabulary size, directory)."""
    if request.param == "gpt2":
        ref, V = random_hf_model("gpt2", "GPT2LMHeadModel", None, seed=3), GPT2_V
    else:
        ref, V = reference("gqa", seed=1), LLAMA_V
    d = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(d)
    return ref, from_pretrained(d).eval(), V, d


def prompts_of(V, seed, lengths=LENGTHS) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V - 1, (n,), generator=g).tolist() for n in lengths]


def frequent_end(ours, prompts, new) -> int:
    """A token greedy decoding produces often but not everywhere: as the end token, rows finish at
    different steps."""
    outs = [generate(ours, [p], max_new_tokens=new, eos_token_id=[])[0][len(p):] for p in prompts]
    counts = Counter(t for o in outs for t in set(o))
    return next(t for t, c in counts.most_common() if c < len(prompts))


def left_padded(prompts):
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


# (no-repeat n-gram size, its scope, beams): greedy and beam search, with and without n-gram blocking
CASES = [(0, "all", 1), (3, "all", 1), (0, "all", 4), (2, "all", 3), (2, "output", 1), (2, "output", 3)]


@torch.no_grad()
@pytest.mark.parametrize("ngram, scope, beams", CASES)
def test_batched_prompts_of_different_lengths_decode_as_each_alone(models, ngram, scope, beams):
    _, ours, V, _ = models
    prompts = prompts_of(V, seed=ngram + beams)
    new = 14
    end = frequent_end(ours, prompts, new)
    kw = dict(max_new_tokens=new, eos_token_id=[end], no_repeat_ngram_size=ngram, no_repeat_ngram_scope=scope,
              num_beams=beams)
    together = generate(ours, prompts, **kw)
    alone = [generate(ours, [p], **kw)[0] for p in prompts]
    assert together == alone
    lengths = {len(o) - len(p) for o, p in zip(together, prompts)}
    assert len(lengths) > 1, "every row ended at the same step: the case tests nothing"


@torch.no_grad()
def test_each_steps_logits_equal_a_full_forward_of_the_sequence(models):
    """Prefill packed, decode forced tokens one per live row, drop two rows half-way: every logit of
    every row equals transformers' full forward of that sequence (no cache, no padding) within 1e-5."""
    ref, ours, V, _ = models
    prompts = prompts_of(V, seed=11)
    B, steps = len(prompts), 6
    forced = torch.randint(1, V - 1, (B, steps), generator=torch.Generator().manual_seed(2)).tolist()
    state, logits = prefill(ours, prompts, steps)
    got = [[logits[b]] for b in range(B)]
    live = list(range(B))
    for t in range(steps - 1):
        if t == 2:   # rows 1 and 4 finish: the others continue without them
            live = [b for b in live if b not in (1, 4)]
            state.keep(torch.tensor([0, 2, 3, 5]))
        logits = decode_step(ours, state, torch.tensor([forced[b][t] for b in live]))
        assert logits.shape[0] == len(live)
        for i, b in enumerate(live):
            got[b].append(logits[i])
    for b, p in enumerate(prompts):
        n = len(got[b])
        full = torch.tensor([p + forced[b][:n - 1]])
        want = ref(full).logits[0, len(p) - 1:]
        torch.testing.assert_close(torch.stack(got[b]), want, rtol=0, atol=1e-5)


@torch.no_grad()
def test_under_bf16_autocast_the_cache_is_bf16_and_changes_no_logit(models, monkeypatch):
    """Under bf16 autocast the cache keeps keys and values in bf16, the dtype the GEMMs make them in
    (an fp32 cache was cast back to bf16 by attention at every step, a copy of the whole past per
    layer): every step's logits are those of an fp32 cache, bit for bit."""
    _, ours, V, _ = models
    prompts = prompts_of(V, seed=5)
    forced = torch.randint(1, V - 1, (len(prompts), 3), generator=torch.Generator().manual_seed(6))

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            state, logits = prefill(ours, prompts, 4)
            out = [logits] + [decode_step(ours, state, forced[:, t]) for t in range(3)]
        return state.cache.k.dtype, torch.stack(out)

    dtype, got = run()
    monkeypatch.setattr(ours, "new_cache", functools.partial(type(ours).new_cache, ours, dtype=torch.float32))
    fp32_dtype, want = run()
    assert (dtype, fp32_dtype) == (torch.bfloat16, torch.float32)
    assert torch.equal(got, want)


@torch.no_grad()
def test_finished_rows_leave_the_batch(models):
    """The tokens each forward embeds: the packed prompts once, then one per row still running."""
    _, ours, V, _ = models
    prompts = prompts_of(V, seed=5)
    new = 12
    end = frequent_end(ours, prompts, new)
    alone = [generate(ours, [p], max_new_tokens=new, eos_token_id=[end])[0][len(p):] for p in prompts]
    ns = [len(a) for a in alone]   # new tokens of each row, its end token included
    sizes = []
    hook = ours.transformer.embeddings.word_embeddings.register_forward_hook(
        lambda m, args, out: sizes.append(args[0].numel()))
    try:
        steps = list(decode_steps(ours, prompts, max_new_tokens=new, eos_token_id=[end]))
    finally:
        hook.remove()
    # the forward after step s computes the rows that produced no end token by then (n_b > s + 1)
    running = [sum(n > s + 1 for n in ns) for s in range(new - 1)]
    assert sizes == [sum(LENGTHS)] + [c for c in running if c]
    assert sizes[-1] < len(prompts)
    # the stream still says every row's state: a finished row repeats its end token
    tokens, finished = steps[-1]
    assert finished.tolist() == [a[-1] == end for a in alone]
    assert all(int(tokens[b]) == end for b, a in enumerate(alone) if a[-1] == end)


@torch.no_grad()
@pytest.mark.parametrize("beams", [1, 3])
def test_mixed_lengths_equal_transformers_generate(models, beams):
    """transformers decodes the same prompts left-padded; lmforge packed, from a list and from the
    same left-padded batch."""
    ref, ours, V, _ = models
    prompts = prompts_of(V, seed=7 + beams)
    new = 10
    end = frequent_end(ours, prompts, new)
    ids, mask = left_padded(prompts)
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, num_beams=beams,
                        eos_token_id=end, pad_token_id=0, **({"early_stopping": False} if beams > 1 else {}))
    T = ids.shape[1]

    def answer(row):   # the new tokens up to and including the end token (padding after it differs)
        row = row[T:] if len(row) > T else row
        return row[:row.index(end) + 1] if end in row else row
    kw = dict(max_new_tokens=new, eos_token_id=end, pad_token_id=0)
    padded = generate(ours, ids, mask, num_beams=beams, **kw)
    assert [answer(r) for r in padded.tolist()] == [answer(r) for r in want.tolist()]
    listed = generate(ours, prompts, num_beams=beams, **kw)
    assert [r[len(p):] for r, p in zip(listed, prompts)] == [answer(r) for r in want.tolist()]


@torch.no_grad()
def test_prefix_layer_decodes_with_the_packed_cache(models):
    """Prefix-layer tuning (keys and values every query attends to) through the cached steps: the
    greedy tokens of recomputing the whole sequence at every step, without a cache."""
    from lmforge.adapters.prefix import PrefixConfig, add_prefix

    _, _, V, d = models
    model = from_pretrained(d).eval()
    add_prefix(model, "p", PrefixConfig(kind="layer", length=3))
    with torch.no_grad():   # away from the initial activations, so that the prefix moves the logits
        for name, param in model.named_parameters():
            if "prefix" in name:
                param.normal_(0, 1.0)
    prompts = prompts_of(V, seed=9, lengths=(2, 6, 4))
    with routing.using("p"):
        state, _ = prefill(model, prompts, 8)
        assert state.cache.reserved == 3   # the prefix sits in its own slots: decode steps concatenate nothing
        got = generate(model, prompts, max_new_tokens=8, eos_token_id=[])
        beams = generate(model, prompts, max_new_tokens=8, eos_token_id=[], num_beams=3)
        for p, out in zip(prompts, got):
            seq = list(p)
            for _ in range(8):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            assert out == seq
        for p, out in zip(prompts, beams):   # beam search (rows fanning out, reordered) as each prompt alone
            assert out == generate(model, [p], max_new_tokens=8, eos_token_id=[], num_beams=3)[0]
    assert got != generate(model, prompts, max_new_tokens=8, eos_token_id=[])   # the prefix matters


@torch.no_grad()
def test_bad_prompts_and_cache_misuse_are_one_line_errors(models):
    _, ours, V, _ = models
    with pytest.raises(ValueError, match="prompt 1 has no tokens"):
        generate(ours, [[1, 2], []])
    with pytest.raises(ValueError, match="no prompts"):
        generate(ours, [])
    with pytest.raises(ValueError, match="needs no attention_mask"):
        generate(ours, [[1, 2]], torch.ones(1, 2))
    with pytest.raises(ValueError, match="left-padded"):
        generate(ours, torch.tensor([[1, 2, 0]]), torch.tensor([[1, 1, 0]]))
    cache = prefill(ours, [[1, 2], [3]], 4)[0].cache
    from lmforge.models.packing import Packed
    with pytest.raises(ValueError, match="one token per sequence"):
        ours(torch.tensor([1, 2, 3]), packed=Packed.from_lengths([2, 1]), cache=cache)
    with pytest.raises(ValueError, match="different lengths"):
        ours(torch.tensor([[1], [2]]), cache=cache)


@torch.no_grad()
def test_beam_search_prefills_each_prompt_once_and_done_prompts_leave(models):
    """Beam search: each prompt's tokens are embedded once (its beams copy its cache row), then K rows
    per prompt still searching; a prompt whose search is done stops being computed."""
    _, ours, V, _ = models
    prompts, K, new = prompts_of(V, seed=6), 3, 12   # a seed where prompts end at different steps
    end = frequent_end(ours, prompts, new)
    sizes = []
    hook = ours.transformer.embeddings.word_embeddings.register_forward_hook(
        lambda m, args, out: sizes.append(args[0].numel()))
    try:
        beam_search(ours, prompts, num_beams=K, max_new_tokens=new, eos_token_id=end)
    finally:
        hook.remove()
    assert sizes[0] == sum(LENGTHS) and sizes[1] == K * len(prompts)
    assert all(s % K == 0 for s in sizes[1:]) and sizes == sizes[:1] + sorted(sizes[1:], reverse=True)
    assert sizes[-1] < K * len(prompts)
