"""`lmforge tokenizer train`: each kind, trained on wikitext-2, loads in lmforge and in transformers'
AutoTokenizer and both encode the same ids (single texts and pairs); WordPiece's vocab.txt gives the
same ids too; bad arguments are one-line errors; a failed training never replaces a good directory."""

import json

import pytest
import transformers as T

from lmforge.cli import main
from lmforge.cli import tokenizer as tokenizer_cli
from lmforge.data.tokenizer import Tokenizer, load_tokenizer

TEXTS = ["The European lobster's claws, 60 cm ( 24 in ).", "  Mr. Knightley said: naïve café!",
         "unbelievably <unk> tokens\tand\nnewlines", "emoji 🤗 and 漢字", ""]


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    wiki = data_dir / "wikitext-2" / "valid.txt"
    out = {}
    for kind in tokenizer_cli.KINDS:
        args = ["tokenizer", "train", "--kind", kind, "--vocab-size", "1500", "--corpus", str(wiki),
                "--out", str(root / kind)] + (["--lowercase"] if kind == "wordpiece" else [])
        assert main(args) == 0
        out[kind] = root / kind
    return out


@pytest.mark.parametrize("kind, files, mask", [
    ("wordpiece", {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"}, "[MASK]"),
    ("bpe", {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}, "[MASK]"),
    ("byte-bpe", {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}, "<mask>"),
])
def test_trained_tokenizer_loads_in_lmforge_and_transformers_alike(trained, data_dir, kind, files, mask):
    d = trained[kind]
    assert {p.name for p in d.iterdir()} == files
    ours, ref = load_tokenizer(d), T.AutoTokenizer.from_pretrained(str(d))
    assert ours.vocab_size == len(ref)
    assert 1000 < ours.vocab_size <= 1500
    assert ours.mask_token_id == ref.mask_token_id == ref.convert_tokens_to_ids(mask)
    assert ours.pad_token_id == ref.pad_token_id and ours.cls_token_id == ref.cls_token_id
    assert ours.sep_token_id == ref.sep_token_id
    lines = [s for s in (data_dir / "wikitext-2" / "test.txt").read_text(encoding="utf-8").split("\n")
             if s.strip()][:200]
    for text in TEXTS + lines:
        assert ours.encode(text) == ref(text)["input_ids"], text
    for a, b in zip(lines[:50], lines[50:100]):
        assert ours.encode(a, b) == ref(a, b)["input_ids"]
        assert ours([a], [b], padding="none")["token_type_ids"][0] == ref(a, b, return_token_type_ids=True)["token_type_ids"]
    if kind != "byte-bpe":   # BERT-style tokenizers hand segment ids to the model by default
        assert "token_type_ids" in ref(lines[0], lines[1]) and 1 in ref(lines[0], lines[1])["token_type_ids"]
    unk = ours.unk_token_id   # (wikitext's own "<unk>" is byte-BPE's special token: left out)
    plain = [s.replace("<unk>", "") for s in lines]
    assert sum(i == unk for s in plain for i in ours.encode(s)) < 0.01 * sum(len(ours.encode(s)) for s in plain)
    if kind == "wordpiece":
        from_vocab = Tokenizer.from_files(d / "vocab.txt", lowercase=True)
        assert all(from_vocab.encode(s) == ours.encode(s) for s in lines)


def test_bad_arguments_are_one_line_errors(tmp_path, data_dir, capsys):
    wiki = str(data_dir / "wikitext-2" / "valid.txt")
    out = str(tmp_path / "tok")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.md").write_text("keep me")
    for args, message in [
        (["--kind", "sentencepiece", "--vocab-size", "100", "--corpus", wiki, "--out", out], "--kind invalid choice"),
        (["--kind", "bpe", "--vocab-size", "0", "--corpus", wiki, "--out", out], "--vocab-size must be >= 1, got 0"),
        (["--kind", "byte-bpe", "--vocab-size", "200", "--corpus", wiki, "--out", out],
         "--vocab-size must be >= 262 for byte-bpe, got 200"),
        (["--kind", "bpe", "--vocab-size", "500", "--corpus", str(tmp_path / "nope.txt"), "--out", out],
         "nope.txt: no such file or directory"),
        (["--kind", "bpe", "--vocab-size", "500", "--corpus", wiki, "--out", str(tmp_path / "notes")],
         "holds other files (mine.md)"),
    ]:
        code = main(["tokenizer", "train"] + args)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("lmforge tokenizer"), err
        assert "error:" in err[0] and message in err[0], (message, err)
    assert (tmp_path / "notes" / "mine.md").read_text() == "keep me" and not (tmp_path / "tok").exists()


@pytest.mark.parametrize("kill_at", ["reading the corpus", "writing the files"])
def test_failed_training_keeps_the_good_directory(trained, tmp_path, data_dir, monkeypatch, kill_at):
    import shutil

    good = tmp_path / "tok"
    shutil.copytree(trained["bpe"], good)
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    if kill_at == "reading the corpus":
        from lmforge.data import corpus

        def broken_docs(files):
            yield files[0], "some text"
            raise KeyboardInterrupt

        monkeypatch.setattr(corpus, "read_corpus", broken_docs)
    else:   # killed after tokenizer.json is written, before the configs
        def broken_dumps(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(tokenizer_cli.json, "dumps", broken_dumps)
    with pytest.raises(KeyboardInterrupt):
        tokenizer_cli.train("bpe", 300, [data_dir / "wikitext-2" / "valid.txt"], good)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert not list(tmp_path.glob(".*.tmp"))
    assert json.loads((good / "tokenizer_config.json").read_text())["lmforge_kind"] == "bpe"
