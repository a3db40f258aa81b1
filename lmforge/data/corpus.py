"""Unlabelled text corpora for pre-training: files into documents, documents into sentences.

Inputs: `.txt`, `.txt.gz`, `.jsonl`, `.jsonl.gz` files, or directories of them (searched
recursively, files in sorted path order, so the corpus order never depends on the file system).
In a directory, hidden files and a dataset's notes (README, PROVENANCE, LICENSE/LICENCE, COPYING,
NOTICE, CHANGELOG, any case and suffix) are not corpus text and are skipped; a file named on its
own is always read.

Documents
- JSONL: one document per line, its `text` field (blank lines skipped; a line that is not a JSON
  object with a string `text` is a one-line error naming file and line).
- `.txt`: one document per file. Blank lines separate *paragraphs* (a book's, a play's speeches),
  not documents: Gutenberg books and tinyshakespeare use them that way, and a corpus of short
  documents should be JSONL. One exception, because its format says so: wikitext files, where a
  top-level heading line ` = Title = ` starts a new article; such a file is one document per article.
- Project Gutenberg header and footer (licence text) are stripped: the text between the
  `*** START OF ... PROJECT GUTENBERG ...` and `*** END OF ...` lines (older books: after the
  `*END*THE SMALL PRINT!` line, up to `End of (the) Project Gutenberg ...`).
- Decoding: UTF-8 (a byte-order mark dropped); a file that is not valid UTF-8 is decoded as
  Windows-1252, then Latin-1 (which never fails) — Gutenberg's older files declare ISO-8859-1, and
  cp1252 is its superset that also maps the curly quotes 0x91-0x94 such files often contain.
  Line ends: CRLF and CR become LF.

Sentences
NLTK's Punkt, trained unsupervised on a deterministic sample of the corpus being read
(`train_splitter`): no model download, and its abbreviation list fits the corpus (Mr., Mrs., Dr. in
Gutenberg; wikitext's spaced tokens). A sentence never crosses a paragraph (blank line), and
whitespace inside a sentence (hard line wraps) is collapsed to single spaces.
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from lmforge.errors import DataError

SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz")

# wikitext: " = Title = " is an article; " = = Section = = " (two or more '=') is not.
_WIKI_TITLE = re.compile(r"^ = [^=].*[^=] = $", re.M)
_PG_START = re.compile(r"^\*\*\* ?START OF (?:THIS|THE) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT!.*$",
                       re.M | re.I)
_PG_END = re.compile(r"^\*\*\* ?END OF (?:THIS|THE) PROJECT GUTENBERG.*$|^End of (?:the )?Project Gutenberg.*$",
                     re.M | re.I)
_PARAGRAPH = re.compile(r"\n[ \t]*\n")


_NOTES = {"readme", "provenance", "license", "licence", "copying", "notice", "changelog"}


def _has_suffix(p: Path) -> bool:
    return p.name.endswith(SUFFIXES)


def _is_corpus_text(p: Path) -> bool:
    """A file a directory walk reads: a corpus suffix, not hidden, not the dataset's notes."""
    return (_has_suffix(p) and not p.name.startswith(".")
            and p.name.split(".")[0].lower() not in _NOTES)


def list_files(paths: Iterable) -> list[Path]:
    """The corpus files named by `paths` (files or directories), in a deterministic order: each
    argument in the order given, a directory's files (recursively) sorted by path."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _is_corpus_text(f))
            if not found:
                raise DataError(f"{p}: no corpus files (expected {', '.join(SUFFIXES)})")
            out.extend(found)
        elif p.is_file():
            if not _has_suffix(p):
                raise DataError(f"{p}: not a corpus file (expected {', '.join(SUFFIXES)})")
            out.append(p)
        else:
            raise DataError(f"{p}: no such file or directory")
    seen, unique = set(), []
    for f in out:  # a file named twice (a directory and a file in it) is read once
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def decode(raw: bytes) -> str:
    """Text of a file's bytes: UTF-8, else cp1252, else Latin-1 (see the module docstring)."""
    for enc in ("utf-8-sig", "cp1252", "latin-1"):
        try:
            text = raw.decode(enc)
            break
        except UnicodeDecodeError:
            continue
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_bytes(path: Path) -> bytes:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot be read ({e})") from None


def strip_gutenberg(text: str) -> str:
    """The body of a Project Gutenberg book (unchanged when it has no PG markers)."""
    start = _PG_START.search(text)
    if start:
        text = text[start.end():]
    end = _PG_END.search(text)
    if end:
        text = text[:end.start()]
    return text


def _split_wikitext(text: str) -> list[str]:
    starts = [m.start() for m in _WIKI_TITLE.finditer(text)]
    if not starts:
        return [text]
    bounds = ([0] if starts[0] > 0 else []) + starts + [len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def read_documents(path) -> Iterator[str]:
    """The non-empty documents of one corpus file, in file order."""
    path = Path(path)
    text = decode(_read_bytes(path))
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                got = type(row).__name__ if not isinstance(row, dict) else (
                    "no 'text' field" if "text" not in row else f"'text' is {type(row['text']).__name__}")
                raise DataError(f"{path}:{n}: expected a JSON object with a string 'text' field, got {got}")
            if row["text"].strip():
                yield row["text"]
        return
    body = strip_gutenberg(text)
    for doc in _split_wikitext(body):
        if doc.strip():
            yield doc


def read_corpus(paths: Iterable) -> Iterator[tuple[Path, str]]:
    """(file, document) for every document of every corpus file, in corpus order."""
    for f in list_files(paths):
        for doc in read_documents(f):
            yield f, doc


# -- sentences ------------------------------------------------------------------------------------
@dataclass
class SentenceSplitter:
    """Punkt with parameters learnt from the corpus (picklable: worker processes get a copy)."""

    params: object  # nltk.tokenize.punkt.PunktParameters

    def __post_init__(self):
        from nltk.tokenize.punkt import PunktSentenceTokenizer

        self._punkt = PunktSentenceTokenizer(self.params)

    def __getstate__(self):
        return {"params": self.params}

    def __setstate__(self, state):
        self.params = state["params"]
        self.__post_init__()

    def split(self, document: str) -> list[str]:
        """Sentences of a document, whitespace collapsed; never crossing a blank line."""
        out = []
        for para in _PARAGRAPH.split(document):
            if not para.strip():
                continue
            for s in self._punkt.tokenize(para):
                s = " ".join(s.split())
                if s:
                    out.append(s)
        return out


SPLITTER_SAMPLE_CHARS = 2_000_000   # ~5 s of Punkt training; enough for its abbreviation statistics


def train_splitter(documents: Iterable[str], sample_chars: int = SPLITTER_SAMPLE_CHARS) -> SentenceSplitter:
    """Punkt trained on up to `sample_chars` characters of `documents`: each document contributes
    at most an equal share, so one long book does not decide the abbreviations alone."""
    from nltk.tokenize.punkt import PunktTrainer

    docs = list(documents)
    trainer = PunktTrainer()
    if docs:
        share = max(10_000, sample_chars // len(docs))
        used = 0
        for d in docs:
            if used >= sample_chars:
                break
            piece = d[:share]
            trainer.train(piece, finalize=False)
            used += len(piece)
    trainer.finalize_training()
    return SentenceSplitter(trainer.get_params())


def splitter_version() -> str:
    """What the sentence boundaries depend on besides the text (part of the shard cache key)."""
    import nltk

    return f"nltk-punkt-{nltk.__version__}-sample{SPLITTER_SAMPLE_CHARS}"
