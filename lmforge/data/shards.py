"""Token shards: a corpus tokenized once, in worker processes, into cached memory-mapped arrays.

Layout of one cache entry, `<cache_dir>/<key>/`:
    meta.json               what the key was computed from, counts, the shard list
    NNNNN.ids.npy           int32 [n_tokens]   token ids of the shard's sentences, back to back
    NNNNN.word_start.npy    uint8 [n_tokens]   1 where a token begins a word (the tokenizer's
                                               pre-tokenizer words, from Encoding.word_ids)
    NNNNN.sentences.npy     int64 [S + 1]      token offset where each sentence starts (+ the end)
    NNNNN.documents.npy     int64 [D + 1]      sentence index where each document starts (+ the end)
No special tokens are stored: packing (lmforge/data/pretrain.py) adds them.

The key is a hash of: the format version, the tokenizer (its full serialized definition, so any
change of vocabulary, merges, normalizer or pre-tokenizer), the sentence splitter's version, and
each input file's resolved path, size and modification time (ns). A changed tokenizer or file gives
a new key; an entry whose key matches is reused as it is. An entry is built in a temporary
directory and renamed into place whole (lmforge.utils.atomic.atomic_dir), so a killed build leaves
at most a `.KEY.*.tmp` directory that no run reads; the next build of that key removes such a
directory once it has not changed for DEAD_BUILD_SECONDS (a live build writes a shard every few
seconds, and another rank may be building the same key right now).

Parallelism: documents are grouped into work units of about UNIT_CHARS characters (1 MB) in corpus order;
each unit becomes one shard, encoded by one of `workers` processes. The units, and so the shards,
do not depend on the number of workers: 1 or 8 workers write identical caches.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from lmforge.data import corpus
from lmforge.errors import DataError
from lmforge.utils.atomic import atomic_dir

FORMAT_VERSION = 1
DEAD_BUILD_SECONDS = 3600
UNIT_CHARS = 1_000_000     # ~250k tokens a shard: enough units to keep every worker busy


def default_cache_dir() -> Path:
    root = os.environ.get("LMFORGE_CACHE_DIR") or Path.home() / ".cache" / "lmforge"
    return Path(root) / "shards"


def _definition(tokenizer) -> str:
    """tokenizer.json of an lmforge Tokenizer (data/tokenizer.py)."""
    return tokenizer.to_json()


def tokenizer_hash(tokenizer) -> str:
    return hashlib.sha256(_definition(tokenizer).encode("utf-8")).hexdigest()


def _remove_dead_builds(root: Path, key: str) -> None:
    import shutil
    import time

    for tmp in root.glob(f".{key}.*.tmp"):
        try:
            if time.time() - tmp.stat().st_mtime > DEAD_BUILD_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
        except FileNotFoundError:   # its own build finished or removed it meanwhile
            pass


def cache_key(files: list[Path], tokenizer) -> tuple[str, dict]:
    files_meta = []
    for f in files:
        st = f.stat()
        files_meta.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    inputs = {"format": FORMAT_VERSION, "tokenizer": tokenizer_hash(tokenizer),
              "splitter": corpus.splitter_version(), "unit_chars": UNIT_CHARS, "files": files_meta}
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode("utf-8")).hexdigest()[:24]
    return key, inputs


# -- worker side ------------------------------------------------------------------------------------
_W: dict = {}


def _init_worker(tokenizer_json: str, splitter) -> None:
    from tokenizers import Tokenizer as HFTokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the workers are the parallelism
    tok = HFTokenizer.from_str(tokenizer_json)
    tok.no_truncation()
    tok.no_padding()
    _W["tok"], _W["splitter"] = tok, splitter


def _encode_unit(documents: list[str]) -> dict:
    """One shard's arrays from a list of document texts."""
    tok, splitter = _W["tok"], _W["splitter"]
    ids, starts, sent_offsets, doc_offsets = [], [], [0], [0]
    n_tokens = 0
    for doc in documents:
        sentences = splitter.split(doc)
        # a space before every sentence but the first: byte-level BPE then spells the word after a
        # sentence break as it does mid-text ("Ġword"); WordPiece ignores the space
        texts = [s if i == 0 else " " + s for i, s in enumerate(sentences)]
        kept = 0
        for enc in tok.encode_batch(texts, add_special_tokens=False) if texts else []:
            if not enc.ids:
                continue
            words = enc.word_ids
            flags = [1] + [int(words[i] is None or words[i] != words[i - 1]) for i in range(1, len(words))]
            ids.extend(enc.ids)
            starts.extend(flags)
            n_tokens += len(enc.ids)
            sent_offsets.append(n_tokens)
            kept += 1
        if kept:
            doc_offsets.append(doc_offsets[-1] + kept)
    return {"ids": np.asarray(ids, dtype=np.int32), "word_start": np.asarray(starts, dtype=np.uint8),
            "sentences": np.asarray(sent_offsets, dtype=np.int64),
            "documents": np.asarray(doc_offsets, dtype=np.int64)}


def _units(files: list[Path]) -> Iterator[list[str]]:
    unit, size = [], 0
    for _, doc in corpus.read_corpus(files):
        unit.append(doc)
        size += len(doc)
        if size >= UNIT_CHARS:
            yield unit
            unit, size = [], 0
    if unit:
        yield unit


# -- the shard set ----------------------------------------------------------------------------------
@dataclass
class ShardSet:
    """A cache entry, memory-mapped. Global token offsets run over the shards back to back;
    sentence k spans tokens [sent_start[k], sent_end[k]) and belongs to document sent_doc[k]."""

    path: Path
    meta: dict
    reused: bool          # True: read from an existing entry; False: tokenized by this call

    def __post_init__(self):
        self.ids, self.word_start, bases = [], [], [0]
        starts, ends, docs = [], [], []
        n_docs = 0
        for name in self.meta["shards"]:
            ids = np.load(self.path / f"{name}.ids.npy", mmap_mode="r")
            ws = np.load(self.path / f"{name}.word_start.npy", mmap_mode="r")
            sent = np.load(self.path / f"{name}.sentences.npy")
            doc = np.load(self.path / f"{name}.documents.npy")
            self.ids.append(ids)
            self.word_start.append(ws)
            starts.append(sent[:-1] + bases[-1])
            ends.append(sent[1:] + bases[-1])
            docs.append(np.repeat(np.arange(len(doc) - 1) + n_docs, np.diff(doc)))
            n_docs += len(doc) - 1
            bases.append(bases[-1] + len(ids))
        self.bases = np.asarray(bases, dtype=np.int64)
        cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, dtype=np.int64))
        self.sent_start, self.sent_end, self.sent_doc = cat(starts), cat(ends), cat(docs)
        self.n_docs = n_docs

    @property
    def key(self) -> str:
        return self.path.name

    @property
    def n_tokens(self) -> int:
        return int(self.bases[-1])

    @property
    def n_sentences(self) -> int:
        return len(self.sent_start)

    def _slice(self, arrays, start: int, end: int) -> np.ndarray:
        k = int(np.searchsorted(self.bases, start, side="right")) - 1
        parts = []
        while start < end:
            stop = min(end, int(self.bases[k + 1]))
            parts.append(np.asarray(arrays[k][start - self.bases[k]:stop - self.bases[k]]))
            start, k = stop, k + 1
        return np.concatenate(parts) if len(parts) != 1 else parts[0]

    def tokens(self, start: int, end: int) -> np.ndarray:
        """Token ids [start, end) by global offset (crossing shards when needed)."""
        return self._slice(self.ids, start, end).astype(np.int64)

    def word_starts(self, start: int, end: int) -> np.ndarray:
        return self._slice(self.word_start, start, end).astype(bool)


def build_shards(paths: Iterable, tokenizer, cache_dir=None, workers: int = 1,
                 progress: bool = False) -> ShardSet:
    """The ShardSet of a corpus under a tokenizer: reused from `cache_dir` when its key matches,
    else tokenized with `workers` processes and written atomically."""
    if workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")
    files = corpus.list_files(paths)
    key, inputs = cache_key(files, tokenizer)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / key
    meta_path = final / "meta.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{meta_path}: invalid JSON at line {e.lineno}; delete {final}") from None
        if meta.get("inputs") == inputs:
            return ShardSet(final, meta, reused=True)

    if root.is_dir():
        _remove_dead_builds(root, key)
    # The splitter learns from a sample of the corpus itself (deterministic: corpus order).
    splitter = corpus.train_splitter(doc for _, doc in corpus.read_corpus(files))
    tok_json = _definition(tokenizer)
    with atomic_dir(final) as tmp:
        names, counts = [], {"tokens": 0, "sentences": 0, "documents": 0}
        if workers == 1:
            _init_worker(tok_json, splitter)
            results = map(_encode_unit, _units(files))
            pool = None
        else:
            # fork where there is one: spawn would re-run the caller's main script in each worker
            # (a script without an `if __name__ == "__main__"` guard would recurse). The workers
            # build their own Rust tokenizer from its JSON, so no parent thread state is used.
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            pool = ctx.Pool(workers, _init_worker, (tok_json, splitter))
            results = pool.imap(_encode_unit, _units(files))   # imap keeps corpus order
        try:
            for i, arrays in enumerate(results):
                name = f"{i:05d}"
                for field, arr in arrays.items():
                    np.save(tmp / f"{name}.{field}.npy", arr)
                names.append(name)
                counts["tokens"] += len(arrays["ids"])
                counts["sentences"] += len(arrays["sentences"]) - 1
                counts["documents"] += len(arrays["documents"]) - 1
                if progress:
                    print(f"tokenized shard {name}: {counts['tokens']:,} tokens so far", flush=True)
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
        if counts["tokens"] == 0:
            raise DataError(f"{', '.join(map(str, files))}: no text to tokenize")
        meta = {"inputs": inputs, "shards": names, **counts}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return ShardSet(final, meta, reused=False)


def epoch_order(n: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """This rank's item indices for an epoch: a permutation of range(n) drawn from (seed, epoch),
    dealt round-robin to the ranks. Each rank gets n // world_size items (the last n % world_size
    of the permutation are left out of that epoch) so every rank takes the same number of steps."""
    if not 0 <= rank < world_size:
        raise DataError(f"rank must be in [0, {world_size}), got {rank}")
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    per_rank = n // world_size
    return perm[rank: per_rank * world_size: world_size]
