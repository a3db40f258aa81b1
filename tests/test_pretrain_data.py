"""Pre-training data on real text (wikitext-2 valid + test, ~540k tokens): packing lengths and document
crossing, NSP's 50% with negatives from other documents, the batch contract, the rank split, exact
resume, and the token-shard cache (reused, invalidated by a changed file or tokenizer, never half
written, the same whatever the number of workers)."""

import os
import shutil
import time

import numpy as np
import pytest
import torch

from lmforge.data import shards
from lmforge.data.pretrain import PretrainData, PretrainDataConfig
from lmforge.data.tokenizer import load_tokenizer
from lmforge.errors import ConfigError, DataError

T = 64


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("minilm")


@pytest.fixture(scope="module")
def wiki(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    return (str(data_dir / "wikitext-2" / "valid.txt"), str(data_dir / "wikitext-2" / "test.txt")), root / "cache"


@pytest.fixture(scope="module")
def small(data_dir, tmp_path_factory):
    """The first ~12 articles of wikitext-2 valid (~60k tokens): for what needs no statistics."""
    root = tmp_path_factory.mktemp("small")
    text = (data_dir / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")
    cut = text.index("\n = ", 250_000)
    (root / "small.txt").write_text(text[:cut + 1], encoding="utf-8")
    return (str(root / "small.txt"),), root / "cache"


def _data(wiki, tok, rank=0, world_size=1, **kw):
    files, cache = wiki
    cfg = dict(corpus=files, max_seq_len=T, batch_size=16, cache_dir=str(cache), workers=2)
    return PretrainData(PretrainDataConfig(**{**cfg, **kw}), tok, rank, world_size)


@pytest.mark.parametrize("objectives, packing, crosses", [
    (("mlm",), "full-sentences", True),
    (("mlm",), "doc-sentences", False),
    (("mlm", "nsp"), "segment-pair", None),
    (("mlm",), "blocks", True),
    (("clm",), "clm", True),
])
def test_packing_lengths_and_document_crossing(wiki, tok, objectives, packing, crosses):
    data = _data(wiki, tok, objectives=objectives, packing=packing)
    assert data.shards.n_tokens > 500_000 and data.shards.n_docs == 60 + 62
    lengths, multi_doc, covered = [], 0, 0
    for i in range(data.n_examples):
        s = data.sequence(i)
        lengths.append(len(s["input_ids"]))
        docs = set(s["doc"][s["doc"] >= 0].tolist())
        multi_doc += len(docs) > 1
        covered += int((s["doc"] >= 0).sum())
        if packing != "clm":
            assert s["input_ids"][0] == tok.cls_token_id and s["input_ids"][-1] == tok.sep_token_id
    assert max(lengths) <= T
    if packing in ("clm", "blocks"):
        assert set(lengths) == {T}                                  # full blocks only
        assert covered > 0.99 * data.shards.n_tokens                # every token used once
    if packing in ("full-sentences", "doc-sentences"):
        assert covered == data.shards.n_tokens                      # every token exactly once
        assert np.mean(lengths) > 0.6 * T
    if crosses is True:
        assert multi_doc > 50                                       # wikitext has 122 articles
    elif crosses is False:
        assert multi_doc == 0


def test_full_sentences_separates_documents(wiki, tok):
    data = _data(wiki, tok, packing="full-sentences")
    seen = 0
    for i in range(data.n_examples):
        s = data.sequence(i)
        d = s["doc"]
        for k in np.flatnonzero((d[:-1] >= 0) & (d[1:] >= 0) & (d[:-1] != d[1:])):
            raise AssertionError(f"sequence {i}: documents meet at {k} without a separator")
        change = [k for k in range(1, len(d) - 1) if d[k] < 0 and d[k - 1] >= 0 and d[k + 1] >= 0]
        for k in change:
            assert s["input_ids"][k] == tok.sep_token_id and d[k - 1] != d[k + 1]
            seen += 1
    assert seen > 50


def test_nsp_half_true_half_other_document(wiki, tok):
    data = _data(wiki, tok, objectives=("mlm", "nsp"))
    assert data.packing == "segment-pair"
    ex = data.examples
    assert len(ex) > 5000
    assert abs(ex.nsp.mean() - 0.5) < 0.02
    for i in range(len(ex)):
        p = slice(ex.ptr[i], ex.ptr[i + 1])
        start, end, seg, doc = ex.start[p], ex.end[p], ex.segment[p], ex.doc[p]
        a, b = np.flatnonzero((doc >= 0) & (seg == 0)), np.flatnonzero((doc >= 0) & (seg == 1))
        assert len(a) == 1 and len(b) == 1
        a, b = int(a[0]), int(b[0])
        if ex.nsp[i] == 1:
            assert doc[a] != doc[b]                                  # negatives from ANOTHER document
        else:
            assert doc[a] == doc[b] and end[a] == start[b]           # B follows A directly
    s = data.sequence(0)
    sep = np.flatnonzero(s["input_ids"] == tok.sep_token_id)
    assert len(sep) == 2 and (s["token_type_ids"][:sep[0] + 1] == 0).all() and (s["token_type_ids"][sep[0] + 1:] == 1).all()


def test_batch_contract(wiki, tok):
    for objectives, keys in [(("mlm", "nsp"), {"input_ids", "attention_mask", "token_type_ids", "labels",
                                               "next_sentence_label"}),
                             (("mlm",), {"input_ids", "attention_mask", "token_type_ids", "labels"}),
                             (("clm",), {"input_ids", "attention_mask", "token_type_ids"})]:
        data = _data(wiki, tok, objectives=objectives)
        batch = next(iter(data.batches(0)))
        assert set(batch) == keys, objectives
        B, L = batch["input_ids"].shape
        assert B == 16 and L <= T
        assert all(v.dtype == torch.long for v in batch.values())
        assert all(v.shape == (B, L) for k, v in batch.items() if k != "next_sentence_label")
        if "next_sentence_label" in batch:
            assert batch["next_sentence_label"].shape == (B,)
        mask = batch["attention_mask"]
        assert (mask[:, 0] == 1).all() and (mask[:, :-1] >= mask[:, 1:]).all()     # right padding
    assert len(data) == data.n_examples // 16 + (data.n_examples % 16 > 0)


@pytest.mark.parametrize("world_size", [1, 3])
def test_rank_split_disjoint_and_covering(wiki, tok, world_size):
    ranks = [_data(wiki, tok, rank=r, world_size=world_size) for r in range(world_size)]
    n = ranks[0].n_examples
    for epoch in (0, 1):
        orders = [d.order(epoch) for d in ranks]
        union = np.concatenate(orders)
        assert len(set(union.tolist())) == len(union) == n - n % world_size         # disjoint
        assert len({len(o) for o in orders}) == 1                                    # same step count
        assert len(set(range(n)) - set(union.tolist())) == n % world_size           # covering
    assert not np.array_equal(ranks[0].order(0), ranks[0].order(1))                 # a new order each epoch
    got = [d.order(0) for d in ranks]
    again = [_data(wiki, tok, rank=r, world_size=world_size).order(0) for r in range(world_size)]
    assert all(np.array_equal(a, b) for a, b in zip(got, again))                     # from the seed
    seen = set()
    for d in ranks:                                                                  # batches follow the order
        for batch_no, batch in enumerate(d.batches(0)):
            ids = d.order(0)[batch_no * 16:(batch_no + 1) * 16]
            first = torch.from_numpy(d.masked(int(ids[0]), 0)["input_ids"])
            assert torch.equal(batch["input_ids"][0, :len(first)], first)
            seen.update(ids.tolist())
            if batch_no == 2:
                break
    assert len(seen) == 3 * 16 * world_size


def _run(data, epochs):
    for epoch in epochs:
        yield from data.batches(epoch)


@pytest.mark.parametrize("objectives, stop_after", [(("mlm", "nsp"), 5), (("mlm",), None), (("clm",), 7)])
def test_resume_continues_exactly(small, tok, objectives, stop_after):
    wiki = small
    ref = _data(wiki, tok, objectives=objectives, batch_size=64)
    per_epoch = len(ref)
    stop = per_epoch - 2 if stop_after is None else stop_after      # None: across the epoch boundary
    expected = [b for _, b in zip(range(stop + 6), _run(ref, (0, 1)))]
    first = _data(wiki, tok, objectives=objectives, batch_size=64)
    it = _run(first, (0, 1))
    for _ in range(stop):
        next(it)
    state = first.state_dict()
    resumed = _data(wiki, tok, objectives=objectives, batch_size=64)
    resumed.load_state_dict(state)
    epoch = state["epoch"]
    got = [b for _, b in zip(range(6), _run(resumed, range(epoch, 2)))]
    for a, b in zip(expected[stop:], got):
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert len(got) == 6
    with pytest.raises(ConfigError, match="seed=0.*seed=1"):
        _data(wiki, tok, objectives=objectives, batch_size=64, seed=1).load_state_dict(state)


def test_shard_cache_reused_invalidated_and_atomic(tmp_path, small, data_dir, tok, monkeypatch):
    text = tmp_path / "corpus.txt"
    shutil.copy(small[0][0], text)
    cache = tmp_path / "cache"
    first = shards.build_shards([text], tok, cache, workers=2)
    assert not first.reused and first.n_tokens > 50_000
    again = shards.build_shards([text], tok, cache, workers=1)
    assert again.reused and again.key == first.key
    # another tokenizer: another entry
    bpe = load_tokenizer(data_dir / "tokenizers" / "gpt2-bpe")
    other_tok = shards.build_shards([text], bpe, cache)
    assert not other_tok.reused and other_tok.key != first.key
    # a changed file: another entry, with the new text in it
    with open(text, "a", encoding="utf-8") as f:
        f.write("\n = Zebra article = \n\n Zebras are striped .\n")
    changed = shards.build_shards([text], tok, cache)
    assert not changed.reused and changed.key != first.key and changed.n_docs == first.n_docs + 1
    last = changed.sent_end[-1]
    assert tok.decode(changed.tokens(changed.sent_start[-1], last)) == "zebras are striped."
    # a build killed halfway leaves nothing that is trusted
    with open(text, "a", encoding="utf-8") as f:
        f.write(" More .\n")
    monkeypatch.setattr(shards, "UNIT_CHARS", 50_000)
    calls = []

    def dies(documents):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(documents)

    real = shards._encode_unit
    monkeypatch.setattr(shards, "_encode_unit", dies)
    with pytest.raises(KeyboardInterrupt):
        shards.build_shards([text], tok, cache, workers=1)
    key, _ = shards.cache_key([text], tok)
    assert not (cache / key).exists() and not list(cache.glob(".*.tmp"))
    # a build killed harder (SIGKILL: no cleanup) leaves its temp dir; the next build removes it once dead
    dead, live = cache / f".{key}.deadbeef.tmp", cache / f".{key}.livebeef.tmp"
    for d in (dead, live):
        (d / "00000.ids.npy").parent.mkdir()
        (d / "00000.ids.npy").write_bytes(b"partial")
    os.utime(dead, (time.time() - 2 * shards.DEAD_BUILD_SECONDS,) * 2)
    monkeypatch.setattr(shards, "_encode_unit", real)
    rebuilt = shards.build_shards([text], tok, cache, workers=1)
    assert not rebuilt.reused and len(rebuilt.meta["shards"]) > 3
    assert not dead.exists() and live.exists()


def test_shards_do_not_depend_on_worker_count(tmp_path, small, tok, monkeypatch):
    monkeypatch.setattr(shards, "UNIT_CHARS", 50_000)
    files = list(small[0])
    one = shards.build_shards(files, tok, tmp_path / "one", workers=1)
    two = shards.build_shards(files, tok, tmp_path / "two", workers=2)
    assert len(one.meta["shards"]) == len(two.meta["shards"]) >= 4
    for a, b in ((one.ids, two.ids), (one.word_start, two.word_start)):
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert np.array_equal(one.sent_start, two.sent_start) and np.array_equal(one.sent_doc, two.sent_doc)
    assert isinstance(one.ids[0], np.memmap)                        # memory-mapped, not loaded


def test_bad_settings_are_one_line_errors(wiki, tok, tmp_path):
    for kw, message in [(dict(objectives=("nsp",), packing="full-sentences"), "nsp needs --packing segment-pair"),
                        (dict(objectives=("clm", "mlm")), "clm trains a decoder alone"),
                        (dict(objectives=("mlm",), packing="clm"), "--packing clm goes with --objective clm"),
                        (dict(objectives=("xlm",)), "--objective must be"),
                        (dict(masking="sometimes"), "--masking must be one of static, dynamic"),
                        (dict(max_seq_len=2), "--max-seq-len must be >= 4"),
                        (dict(mlm_probability=1.5), "--mlm-probability must be <= 1")]:
        with pytest.raises(ConfigError, match=message):
            _data(wiki, tok, **kw)
    one_doc = tmp_path / "one.txt"
    one_doc.write_text("A single document. It has sentences. Three of them.\n")
    with pytest.raises(DataError, match="next-sentence prediction needs at least 2 documents"):
        _data(((str(one_doc),), tmp_path / "c"), tok, objectives=("mlm", "nsp"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl: no text to tokenize"):
        _data(((str(empty),), tmp_path / "c"), tok)
