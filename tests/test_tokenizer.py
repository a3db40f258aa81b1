"""Tokenizer ids match transformers' tokenizers on real text; batches pad and mask correctly."""

import pytest
import torch
import transformers as T

from lmforge.data.tokenizer import Tokenizer, load_tokenizer
from lmforge.errors import DataError
from tests.conftest import read_sst2_dev

TRICKY = ["héllo  wörld", "emoji 🤗🚀 and CJK 漢字", "tabs\tand\nnewlines  ", "  leading spaces", "",
          "don't stop-believing!!! 3.14", "Ünïcödé ÇAPS"]


@pytest.fixture(scope="module")
def sst2(data_dir):
    return [s for s, _ in read_sst2_dev(data_dir)]


@pytest.fixture(scope="module")
def mrpc_pairs(data_dir):
    rows = (data_dir / "glue" / "MRPC" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return [(r.split("\t")[3], r.split("\t")[4]) for r in rows[:200]]


def wordpiece_cases(data_dir, minilm_dir):
    vocab = data_dir / "tokenizers" / "bert-base-uncased" / "vocab.txt"
    return [
        ("minilm tokenizer.json", Tokenizer.from_dir(minilm_dir), T.AutoTokenizer.from_pretrained(minilm_dir)),
        ("bert vocab.txt", Tokenizer.from_files(vocab), T.BertTokenizer(str(vocab), do_lower_case=True)),
    ]


def test_wordpiece_matches_transformers(data_dir, minilm_dir, sst2, mrpc_pairs):
    for name, ours, ref in wordpiece_cases(data_dir, minilm_dir):
        assert ours.kind == "wordpiece" and ours.lowercase is True, name
        for s in sst2 + TRICKY:
            assert ours.encode(s) == ref(s)["input_ids"], (name, s)
        a, b = zip(*mrpc_pairs)
        got = ours(list(a), list(b), max_length=16)
        want = ref(list(a), list(b), max_length=16, truncation="longest_first", padding=True, return_tensors="pt")
        for k in ("input_ids", "token_type_ids", "attention_mask"):
            assert torch.equal(got[k], want[k]), (name, k)


def test_gpt2_bpe_matches_transformers(data_dir, sst2):
    d = data_dir / "tokenizers" / "gpt2-bpe"
    ours = Tokenizer.from_dir(d)
    ref = T.GPT2Tokenizer(str(d / "encoder.json"), str(d / "vocab.bpe"))
    assert ours.kind == "bpe" and ours.vocab_size == 50257 and ours.pad_token_id == 50256
    for s in sst2 + TRICKY:
        assert ours.encode(s) == ref(s)["input_ids"], s
        assert ours.decode(ours.encode(s)) == s


def test_roberta_template_matches_transformers(tmp_path):
    """RoBERTa's <s> A </s></s> B </s> on a small byte-level BPE vocabulary built here."""
    import json
    from tokenizers import ByteLevelBPETokenizer
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["the cat sat on the mat", "a dog and a cat", "hello world"] * 20, vocab_size=300,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    ours = Tokenizer.from_dir(tmp_path)
    ref = T.RobertaTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    assert ours.model_type == "roberta" and ours.pad_token_id == 1
    for a, b in [("the cat sat", "on the mat"), ("hello world", "a dog"), ("x", "y")]:
        assert ours.encode(a) == ref(a)["input_ids"]
        assert ours.encode(a, b) == ref(a, b)["input_ids"]


def test_batch_padding_sides_and_lengths(minilm_dir):
    tok = Tokenizer.from_dir(minilm_dir)
    texts = ["short", "a somewhat longer sentence here"]
    right = tok(texts)
    left = tok(texts, padding_side="left")
    fixed = tok(texts, max_length=12, padding="max_length")
    n = [len(tok.encode(t)) for t in texts]
    assert right["input_ids"].shape == (2, max(n)) and fixed["input_ids"].shape == (2, 12)
    assert right["attention_mask"].sum(1).tolist() == n == left["attention_mask"].sum(1).tolist()
    assert right["input_ids"][0, n[0]:].eq(tok.pad_token_id).all()
    assert left["input_ids"][0, : max(n) - n[0]].eq(tok.pad_token_id).all()
    assert left["attention_mask"][:, -1].eq(1).all()
    # settings do not leak from one call into the next
    assert tok(texts)["input_ids"].shape == (2, max(n))
    ragged = tok(texts, padding="none")
    assert [len(x) for x in ragged["input_ids"]] == n


def test_save_and_reload_roundtrip(tmp_path, minilm_dir):
    tok = Tokenizer.from_dir(minilm_dir)
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.encode("Round Trip, please!", "second") == tok.encode("Round Trip, please!", "second")


def test_missing_tokenizer_files_are_named(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path)):
        Tokenizer.from_dir(tmp_path)


def test_concurrent_calls_with_different_settings_do_not_leak(minilm_dir):
    """Two threads tokenizing at once with different max_length (and padding) each get exactly what a
    call alone gives: a call never changes settings another thread's call sees."""
    import threading

    tok = Tokenizer.from_dir(minilm_dir)
    texts = [" ".join(f"word{i} number {j}" for j in range(40 + i)) for i in range(24)]  # 120+ tokens
    settings = [dict(max_length=8), dict(max_length=64, padding="max_length"), dict(padding="none"),
                dict(max_length=24, padding="none")]
    want = [{k: (v.tolist() if torch.is_tensor(v) else v) for k, v in tok(texts, **s).items()} for s in settings]
    assert len({len(w["input_ids"][0]) for w in want}) == len(settings)   # four different shapes
    barrier = threading.Barrier(len(settings))
    mismatches: list = []

    def work(i):
        barrier.wait()
        for _ in range(150):
            got = tok(texts, **settings[i])
            got = {k: (v.tolist() if torch.is_tensor(v) else v) for k, v in got.items()}
            if got != want[i]:
                mismatches.append((i, [len(x) for x in got["input_ids"][:2]]))
                return

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(settings))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not mismatches, mismatches
    assert tok(texts, padding="none") == tok(texts, padding="none") and tok(texts)["input_ids"].shape[1] > 100
