"""Corpus reading (lmforge.data.corpus) on the real corpora: files and directories in a fixed order,
Gutenberg licence text stripped from all 196 books, wikitext articles, decoding fallbacks, one-line
errors naming file and line, and Punkt sentences that know the corpus's abbreviations."""

import gzip
import json

import pytest

from lmforge.data import corpus
from lmforge.errors import DataError


def test_directory_listing_is_sorted_recursive_and_filtered(tmp_path):
    for name in ["b/2.txt", "b/1.jsonl.gz", "a.txt.gz", "c/skip.csv", "c/d/3.jsonl", "PROVENANCE.txt",
                 "b/README.txt", "c/LICENSE.txt", "c/.hidden.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    got = [p.relative_to(tmp_path).as_posix() for p in corpus.list_files([tmp_path, tmp_path / "a.txt.gz"])]
    assert got == ["a.txt.gz", "b/1.jsonl.gz", "b/2.txt", "c/d/3.jsonl"]   # a.txt.gz given twice: read once
    assert corpus.list_files([tmp_path / "b" / "README.txt"]) == [tmp_path / "b" / "README.txt"]   # named: read


@pytest.mark.parametrize("name, message", [
    ("missing.txt", r"missing.txt: no such file or directory"),
    ("table.csv", r"table.csv: not a corpus file \(expected .txt, .txt.gz, .jsonl, .jsonl.gz\)"),
    ("empty_dir", r"empty_dir: no corpus files"),
])
def test_bad_paths_are_one_line_errors(tmp_path, name, message):
    (tmp_path / "table.csv").write_text("a,b\n")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match=message):
        corpus.list_files([tmp_path / name])


@pytest.mark.parametrize("raw, text", [
    ("naïve “café”\r\nnext".encode("utf-8"), "naïve “café”\nnext"),
    (b"\xef\xbb\xbfbom\rline", "bom\nline"),                       # BOM dropped, CR -> LF
    (b"\x93smart quotes\x94 caf\xe9", "“smart quotes” café"),       # not UTF-8: cp1252
    (b"\x81 caf\xe9", "\x81 café"),                                 # 0x81 undefined in cp1252: Latin-1
])
def test_decoding_falls_back(raw, text):
    assert corpus.decode(raw) == text


def test_jsonl_documents_and_errors_name_file_and_line(tmp_path):
    good = tmp_path / "docs.jsonl.gz"
    with gzip.open(good, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "First doc."}) + "\n\n" + json.dumps({"text": "Second.", "id": 2}) + "\n")
    assert list(corpus.read_documents(good)) == ["First doc.", "Second."]
    for line, message in [('{"text": "ok"}\n{"text": "ok"\n', r"bad.jsonl:2: invalid JSON"),
                          ('{"text": "ok"}\n\n{"body": "x"}\n', r"bad.jsonl:3: .*got no 'text' field"),
                          ('{"text": 3}\n', r"bad.jsonl:1: .*got 'text' is int"),
                          ('["text"]\n', r"bad.jsonl:1: .*got list")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(line)
        with pytest.raises(DataError, match=message):
            list(corpus.read_documents(bad))
    broken = tmp_path / "broken.txt.gz"
    broken.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"broken.txt.gz: cannot be read"):
        list(corpus.read_documents(broken))


def test_gutenberg_licence_stripped_from_every_book(data_dir):
    books = corpus.list_files([data_dir / "gutenberg"])       # its PROVENANCE.txt is not a book
    assert books == sorted((data_dir / "gutenberg").rglob("*.txt.gz")) and len(books) == 195
    for book in books:
        docs = list(corpus.read_documents(book))
        assert len(docs) == 1, book                           # a book is one document
        head, tail = docs[0][:3000].upper(), docs[0][-3000:].upper()
        assert "START OF THIS PROJECT GUTENBERG" not in head and "SMALL PRINT" not in head, book
        assert "END OF THIS PROJECT GUTENBERG" not in tail and "END OF THE PROJECT GUTENBERG" not in tail, book
        assert "GUTENBERG-TM" not in docs[0].upper(), book     # the licence's own vocabulary
    emma = next(corpus.read_documents(data_dir / "gutenberg" / "austen-jane" / "emma.txt.gz"))
    assert emma.lstrip().startswith("Produced by") and "Emma Woodhouse, handsome, clever, and rich" in emma


def test_wikitext_is_one_document_per_article_and_plain_text_one_per_file(data_dir):
    path = data_dir / "wikitext-2" / "valid.txt"
    docs = list(corpus.read_documents(path))
    titles = [line for line in path.read_text(encoding="utf-8").split("\n")
              if line.startswith(" = ") and not line.startswith(" = = ")]
    assert len(docs) == len(titles) == 60
    assert all(d.startswith(t) for d, t in zip(docs, titles))
    assert docs[0].startswith(" = Homarus gammarus = ")
    assert len(list(corpus.read_documents(data_dir / "tinyshakespeare" / "input.txt"))) == 1


def test_punkt_sentences_know_the_corpus_abbreviations(data_dir):
    emma = next(corpus.read_documents(data_dir / "gutenberg" / "austen-jane" / "emma.txt.gz"))
    splitter = corpus.train_splitter([emma], sample_chars=300_000)
    got = splitter.split("Mr. Knightley came in.  Mrs. Weston\nsmiled! Is it? Yes.\n\nA heading\n\nNext line")
    assert got == ["Mr. Knightley came in.", "Mrs. Weston smiled!", "Is it?", "Yes.", "A heading", "Next line"]
    part = emma[:200_000]
    sentences = splitter.split(part)
    lines = part.count("\n")
    assert lines / 3 < len(sentences) < lines / 1.5       # sentences, not lines nor paragraphs
    assert not any("\n" in s or "  " in s for s in sentences)
    untrained = corpus.train_splitter([])
    assert untrained.split("Mr. Knightley came in.")[0] == "Mr."   # what training buys
