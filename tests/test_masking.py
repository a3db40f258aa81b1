"""BERT's masked-LM rule, measured over all ~260k real tokens of wikitext-2 valid: 15% of the maskable
tokens chosen, 80/10/10 [MASK]/random/unchanged, never a special token or padding, random tokens from
the ordinary vocabulary, whole words masked whole, dynamic masks new each epoch and static ones not.
The mask id comes from the tokenizer: a WordPiece one ([MASK] = 103) and a trained byte-level BPE
(<mask> = 4) are both run."""

import numpy as np
import pytest
import torch

from lmforge.cli.tokenizer import train as train_tokenizer
from lmforge.data.masking import IGNORE_INDEX, MaskSpec, special_ids
from lmforge.data.pretrain import PretrainData, PretrainDataConfig
from lmforge.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def setup(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("masking")
    wiki = data_dir / "wikitext-2" / "valid.txt"
    train_tokenizer("byte-bpe", 2000, [wiki], root / "bbpe")
    tokenizers = {"wordpiece": load_tokenizer("minilm"), "byte-bpe": load_tokenizer(root / "bbpe")}
    base = dict(corpus=(str(wiki),), objectives=("mlm",), packing="full-sentences", max_seq_len=128,
                batch_size=64, cache_dir=str(root / "cache"), workers=2)
    return tokenizers, base


def _data(setup, kind, **kw):
    tokenizers, base = setup
    return PretrainData(PretrainDataConfig(**{**base, **kw}), tokenizers[kind]), tokenizers[kind]


def _all(data, epoch):
    return [data.masked(i, epoch) for i in range(data.n_examples)]


@pytest.mark.parametrize("kind", ["wordpiece", "byte-bpe"])
@pytest.mark.parametrize("whole_word", [False, True])
def test_fraction_split_and_specials(setup, kind, whole_word):
    data, tok = _data(setup, kind, whole_word=whole_word)
    spec = data.mask_spec
    assert spec.mask_id == tok.mask_token_id and tok.mask_token_id == {"wordpiece": 103, "byte-bpe": 4}[kind]
    specials = np.asarray(sorted(special_ids(tok)))
    seqs = _all(data, 0)
    maskable = sum(int((s["maskable"] & ~np.isin(s["original_ids"], specials)).sum()) for s in seqs)
    assert maskable > 100_000                                           # real tokens measured
    chosen = np.concatenate([s["labels"] != IGNORE_INDEX for s in seqs])
    orig = np.concatenate([s["original_ids"] for s in seqs])
    new = np.concatenate([s["input_ids"] for s in seqs])
    is_special = np.isin(orig, specials)
    assert not (chosen & is_special).any()                              # [CLS]/[SEP]/<unk>... never chosen
    assert (new[~chosen] == orig[~chosen]).all()                        # nothing else changed
    assert (np.concatenate([s["labels"] for s in seqs])[chosen] == orig[chosen]).all()
    assert abs(chosen.sum() / maskable - 0.15) < 0.005
    c_new, c_orig = new[chosen], orig[chosen]
    to_mask, kept = c_new == spec.mask_id, c_new == c_orig
    to_random = ~to_mask & ~kept
    for share, want in ((to_mask, 0.8), (kept, 0.1), (to_random, 0.1)):
        assert abs(share.mean() - want) < 0.015, (share.mean(), want)
    assert not np.isin(c_new[to_random], specials).any()                # random tokens are ordinary ones
    assert c_new[to_random].max() < tok.vocab_size
    assert len(np.unique(c_new[to_random])) > 500                       # drawn from the whole vocabulary


def test_padding_never_chosen_in_batches(setup):
    data, tok = _data(setup, "wordpiece", packing="doc-sentences")
    padded = 0
    for b, batch in enumerate(data.batches(0)):
        pad = batch["attention_mask"] == 0
        padded += int(pad.sum())
        assert (batch["labels"][pad] == IGNORE_INDEX).all() and (batch["input_ids"][pad] == tok.pad_token_id).all()
        if b == 20:
            break
    assert padded > 1000                                                 # the check saw padding


def test_whole_word_masking_never_splits_a_word(setup):
    data, _ = _data(setup, "wordpiece", whole_word=True)
    multi_piece_words_masked = 0
    for s in _all(data, 0):
        chosen = s["labels"] != IGNORE_INDEX
        starts = np.flatnonzero(s["word_start"] | ~s["maskable"])
        for a, b in zip(starts, list(starts[1:]) + [len(chosen)]):
            if s["maskable"][a]:
                word = chosen[a:b]
                assert word.all() or not word.any(), (a, b, word)
                multi_piece_words_masked += (b - a > 1) and word.all()
    assert multi_piece_words_masked > 1000
    plain, _ = _data(setup, "wordpiece", whole_word=False)             # the test can tell the difference
    split = 0
    for s in _all(plain, 0)[:500]:
        chosen = s["labels"] != IGNORE_INDEX
        starts = np.flatnonzero(s["word_start"] | ~s["maskable"])
        split += sum(0 < chosen[a:b].sum() < b - a for a, b in zip(starts, list(starts[1:]) + [len(chosen)]))
    assert split > 50


@pytest.mark.parametrize("masking, duplicates, same_as_epoch0", [
    ("dynamic", 1, [False, False, False]),
    ("static", 1, [True, True, True]),
    ("static", 2, [False, True, False]),       # BERT's duplicated data: masks repeat every `duplicates` epochs
])
def test_dynamic_masks_change_static_ones_do_not(setup, masking, duplicates, same_as_epoch0):
    data, _ = _data(setup, "wordpiece", masking=masking, static_duplicates=duplicates)
    sample = range(0, data.n_examples, 7)
    first = [data.masked(i, 0) for i in sample]
    for epoch, same in zip((1, 2, 3), same_as_epoch0):
        again = [data.masked(i, epoch) for i in sample]
        equal = [np.array_equal(a["input_ids"], b["input_ids"]) and np.array_equal(a["labels"], b["labels"])
                 for a, b in zip(first, again)]
        assert (all(equal) if same else sum(equal) < 0.01 * len(equal)), (masking, epoch, sum(equal))
    # the batches carry the same masks as masked(): the epoch reaches the masking
    batch = next(iter(data.batches(1)))
    i = int(data.order(1)[0])
    row = torch.from_numpy(data.masked(i, 1)["input_ids"])
    assert torch.equal(batch["input_ids"][0, :len(row)], row)


def test_mask_spec_refuses_a_tokenizer_without_mask(data_dir):
    from lmforge.data.tokenizer import Tokenizer
    from lmforge.errors import ConfigError

    gpt2 = data_dir / "tokenizers" / "gpt2-bpe"
    tok = Tokenizer.from_files(gpt2 / "encoder.json", gpt2 / "vocab.bpe")
    with pytest.raises(ConfigError, match="no mask token"):
        MaskSpec.from_tokenizer(tok)
