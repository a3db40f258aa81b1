"""Pre-training batches from token shards: packing, next-sentence pairs, masking, order, resume.

    data = PretrainData(PretrainDataConfig(corpus=("wiki.txt",), objectives=("mlm", "nsp")), tokenizer)
    data.load_state_dict(saved)                    # optional: continue mid-epoch
    for epoch in range(data.epoch, epochs):
        for batch in data.batches(epoch): ...      # len(data) batches an epoch on this rank

Batch contract (right-padded, dict of torch.LongTensor, Hugging Face names):
    input_ids            [B, T]   T = the longest sequence of the batch (<= max_seq_len); padding is
                                  the tokenizer's pad id
    attention_mask       [B, T]   1 on tokens, 0 on padding
    token_type_ids       [B, T]   0 for [CLS] A [SEP], 1 for B [SEP] (segment-pair); 0 elsewhere
    labels               [B, T]   mlm only: the original id where a token is to be predicted,
                                  -100 everywhere else (never on special tokens or padding)
    next_sentence_label  [B]      nsp only: 0 = B is the true continuation of A, 1 = B is from
                                  another document (transformers' BertForPreTraining convention)
For clm there are no labels: blocks are full (no padding) and the objective shifts input_ids.

Packing (`packing`; the default follows the objectives):
    segment-pair    BERT: [CLS] A [SEP] B [SEP]. Sentences of a document are gathered up to
                    max_seq_len - 3 tokens and cut at a random sentence boundary into A and B; with
                    nsp, B is, with probability 1/2, replaced by a span starting at a random sentence
                    of a random OTHER document (the unused true B sentences start the next pair, as in
                    BERT). Too long: the longer segment is trimmed, A from its front and B from its
                    back, so a true B still follows A directly. A one-sentence chunk is cut inside
                    the sentence (so the 50% rule holds exactly instead of BERT's slight bias).
    full-sentences  RoBERTa: [CLS] s1 s2 ... [SEP], sentences in corpus order packed up to
                    max_seq_len, crossing document boundaries with a [SEP] between documents.
    doc-sentences   the same, but a sequence ends at its document's end (never crosses).
    blocks          Cramming: [CLS] tokens [SEP] of exactly max_seq_len, the corpus as one stream
                    with a [SEP] after each document, cut with no regard for sentences (no padding).
    clm             decoders: the corpus as one stream, an end-of-text token after each document,
                    cut into blocks of exactly max_seq_len tokens (the last partial block dropped).
A sentence longer than a sequence's room is cut into pieces (its later pieces start mid-word: whole-
word masking treats such a piece as a word of its own).

The examples are built once from the seed (like BERT's create_pretraining_data); each epoch visits
them in a new order drawn from (seed, epoch), dealt round-robin to ranks (shards.epoch_order).

Masking (mlm): `dynamic` draws new masks at every visit, from (seed, example, epoch) (RoBERTa);
`static` fixes them from (seed, example, epoch % static_duplicates): with the default 1 duplicate a
sequence keeps one mask for the whole run; BERT duplicated its data 10 times (dupe_factor=10, 40
epochs: each mask seen 4 times) — `static_duplicates=10` reproduces that. Since every random choice is
a function of (seed, epoch, example index), resuming needs only the position (epoch, next batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from lmforge.data import masking, shards
from lmforge.errors import ConfigError, DataError
from lmforge.utils.checks import AT_LEAST_1, SEED, SEQ_LEN, UNIT_INTERVAL, check_fields, rule

OBJECTIVES = ("mlm", "nsp", "clm")
PACKINGS = ("segment-pair", "full-sentences", "doc-sentences", "blocks", "clm")
MASKINGS = ("static", "dynamic")
STATE_VERSION = 1
_SPECIAL = -1      # a piece whose start is _SPECIAL is one special token, its id in `end`


@dataclass
class PretrainDataConfig:
    corpus: tuple = ()                               # files or directories (corpus.list_files)
    objectives: tuple = ("mlm",)                     # any of mlm, nsp (with mlm or alone), or clm
    packing: str | None = None                       # None: segment-pair with nsp, clm with clm, else full-sentences
    max_seq_len: int = field(default=128, metadata=rule(SEQ_LEN))
    batch_size: int = field(default=32, metadata=rule(AT_LEAST_1))
    masking: str = "dynamic"
    whole_word: bool = False
    mlm_probability: float = field(default=0.15, metadata=rule(UNIT_INTERVAL))
    static_duplicates: int = field(default=1, metadata=rule(AT_LEAST_1))
    seed: int = field(default=0, metadata=rule(SEED))
    cache_dir: str | None = None                     # None: shards.default_cache_dir()
    workers: int = field(default=1, metadata=rule(AT_LEAST_1))

    def resolved_packing(self) -> str:
        if self.packing is not None:
            return self.packing
        if "clm" in self.objectives:
            return "clm"
        return "segment-pair" if "nsp" in self.objectives else "full-sentences"

    def check(self) -> None:
        check_fields(self)
        objectives = tuple(self.objectives)
        if not objectives or any(o not in OBJECTIVES for o in objectives):
            raise ConfigError(f"--objective must be a comma-separated subset of {', '.join(OBJECTIVES)}, "
                              f"got {','.join(objectives) or 'nothing'}")
        if "clm" in objectives and len(objectives) > 1:
            raise ConfigError(f"--objective clm trains a decoder alone, got {','.join(objectives)}")
        packing = self.resolved_packing()
        if packing not in PACKINGS:
            raise ConfigError(f"--packing must be one of {', '.join(PACKINGS)}, got {packing!r}")
        if "nsp" in objectives and packing != "segment-pair":
            raise ConfigError(f"--objective nsp needs --packing segment-pair, got {packing}")
        if ("clm" in objectives) != (packing == "clm"):
            raise ConfigError(f"--packing clm goes with --objective clm (and only it), got "
                              f"--packing {packing} with --objective {','.join(objectives)}")
        if self.masking not in MASKINGS:
            raise ConfigError(f"--masking must be one of {', '.join(MASKINGS)}, got {self.masking!r}")
        if not self.corpus:
            raise ConfigError("--corpus: give at least one file or directory")


@dataclass
class Examples:
    """Sequences as lists of pieces: a piece is a token range [start, end) of the shards, or one
    special token (start == _SPECIAL, id in end). Example i is pieces ptr[i]:ptr[i+1]."""

    start: np.ndarray      # int64 [P]
    end: np.ndarray        # int64 [P]
    segment: np.ndarray    # int64 [P]  token type of the piece
    doc: np.ndarray        # int64 [P]  document of a token piece, -1 for a special token
    ptr: np.ndarray        # int64 [E + 1]
    nsp: np.ndarray | None = None   # int64 [E]  0 = true next, 1 = random (segment-pair with nsp)

    def __len__(self) -> int:
        return len(self.ptr) - 1


class _Builder:
    def __init__(self):
        self.start, self.end, self.segment, self.doc, self.ptr, self.nsp = [], [], [], [], [0], []

    def token_piece(self, s: int, e: int, doc: int, segment: int = 0) -> None:
        self.start.append(s), self.end.append(e), self.segment.append(segment), self.doc.append(doc)

    def special(self, token_id: int, segment: int = 0) -> None:
        self.start.append(_SPECIAL), self.end.append(token_id), self.segment.append(segment), self.doc.append(-1)

    def close(self) -> None:
        self.ptr.append(len(self.start))

    def drop_open(self) -> None:
        """Forget the pieces added since the last close()."""
        n = self.ptr[-1]
        del self.start[n:], self.end[n:], self.segment[n:], self.doc[n:]

    def build(self) -> Examples:
        a = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
        return Examples(a(self.start), a(self.end), a(self.segment), a(self.doc), a(self.ptr),
                        a(self.nsp) if self.nsp else None)


def _need(token_id, what: str, packing: str) -> int:
    if token_id is None:
        raise ConfigError(f"--packing {packing} needs a {what} token and the tokenizer has none")
    return token_id


def pack_sentences(data: shards.ShardSet, max_len: int, cls_id: int, sep_id: int, cross_docs: bool) -> Examples:
    """full-sentences (cross_docs) and doc-sentences: [CLS] sentences [SEP], up to max_len."""
    room = max_len - 2
    b = _Builder()
    used, last_doc, pending_sep = 0, None, False

    def flush():
        nonlocal used
        if used:
            b.special(sep_id)
            b.close()
        else:
            b.drop_open()
        used = 0
        b.special(cls_id)

    b.special(cls_id)
    for s, e, d in zip(data.sent_start.tolist(), data.sent_end.tolist(), data.sent_doc.tolist()):
        if last_doc is not None and d != last_doc and used:
            if cross_docs:
                pending_sep = True      # RoBERTa's separator, placed only if text follows it here
            else:
                flush()
        last_doc = d
        while s < e:
            extra = 1 if pending_sep and used else 0
            if used and used + extra + (e - s) > room:   # the sentence does not fit: next sequence
                flush()
                extra = 0
            pending_sep = False
            if extra:
                b.special(sep_id)
                used += 1
            take = min(e - s, room - used)
            b.token_piece(s, s + take, d)
            used += take
            s += take
    if used:
        b.special(sep_id)
        b.close()
    b.drop_open()
    return b.build()


def pack_blocks(data: shards.ShardSet, max_len: int, eos_id: int, cls_id: int | None = None,
                sep_id: int | None = None) -> Examples:
    """Blocks of exactly max_len tokens over documents joined by `eos_id`; with cls_id and sep_id,
    each block is [CLS] + max_len - 2 tokens + [SEP] (Cramming's MLM packing)."""
    framed = cls_id is not None
    room = max_len - 2 if framed else max_len
    b = _Builder()
    used = 0

    def close():
        nonlocal used
        if framed:
            b.special(sep_id)
        b.close()
        used = 0
        if framed:
            b.special(cls_id)

    if framed:
        b.special(cls_id)
    doc_first = np.searchsorted(data.sent_doc, np.arange(data.n_docs), side="left")
    doc_last = np.searchsorted(data.sent_doc, np.arange(data.n_docs), side="right") - 1
    for d, (k0, k1) in enumerate(zip(doc_first.tolist(), doc_last.tolist())):
        s, e = int(data.sent_start[k0]), int(data.sent_end[k1])   # a document's sentences are contiguous
        while s < e:
            take = min(e - s, room - used)
            b.token_piece(s, s + take, d)
            used, s = used + take, s + take
            if used == room:
                close()
        b.special(eos_id)
        used += 1
        if used == room:
            close()
    b.drop_open()   # the last partial block
    return b.build()


def _trim(la: int, lb: int, room: int) -> tuple[int, int]:
    """Lengths after trimming the longer segment one token at a time until la + lb <= room."""
    if la + lb <= room:
        return la, lb
    short = min(la, lb)
    if short <= room - short:
        return (la, room - la) if la == short else (room - lb, lb)
    return room - room // 2, room // 2


def pack_segment_pairs(data: shards.ShardSet, max_len: int, cls_id: int, sep_id: int, nsp: bool,
                       seed: int) -> Examples:
    """[CLS] A [SEP] B [SEP] pairs; with nsp, B from another document half of the time."""
    if nsp and data.n_docs < 2:
        raise DataError(f"{data.path}: next-sentence prediction needs at least 2 documents, the corpus has "
                        f"{data.n_docs} (a .txt file is one document; use JSONL for many)")
    room = max_len - 3
    rng = np.random.default_rng([seed, 0x5E6])
    starts, ends, docs = data.sent_start, data.sent_end, data.sent_doc
    doc_first = np.searchsorted(docs, np.arange(data.n_docs), side="left")
    doc_end = np.searchsorted(docs, np.arange(data.n_docs), side="right")   # one past its last sentence
    b = _Builder()
    for d in range(data.n_docs):
        k, k_end = int(doc_first[d]), int(doc_end[d])
        while k < k_end:
            # gather sentences [k, j) up to `room` tokens
            j, n = k, 0
            while j < k_end and n < room:
                n += int(ends[j] - starts[j])
                j += 1
            is_random = bool(nsp and rng.random() < 0.5)
            a_start = int(starts[k])
            if j - k >= 2:
                a_split = int(rng.integers(k + 1, j))            # A = sentences [k, a_split)
                a_end = int(starts[a_split])
            else:                                                 # one sentence: cut inside it
                length = int(ends[k] - starts[k])
                if length < 2:
                    k = j
                    continue
                a_split = j
                a_end = a_start + int(rng.integers(1, length))
            if is_random:
                other = int(rng.integers(0, data.n_docs - 1))
                other += other >= d                               # uniformly among the OTHER documents
                r = int(rng.integers(doc_first[other], doc_end[other]))
                b_start, b_end, b_doc = int(starts[r]), int(starts[r]), other
                while r < doc_end[other] and (b_end - b_start) < room - (a_end - a_start):
                    b_end = int(ends[r])
                    r += 1
                next_k = a_split if a_split < j else j            # unused true B sentences go back
            else:
                b_start, b_end, b_doc = a_end, int(ends[j - 1]), d
                next_k = j
            la, lb = _trim(a_end - a_start, b_end - b_start, room)
            a_start = a_end - la                                   # A loses its front
            b_end = b_start + lb                                   # B loses its back
            if la < 1 or lb < 1:
                k = max(next_k, k + 1)
                continue
            b.special(cls_id)
            b.token_piece(a_start, a_end, d, 0)
            b.special(sep_id)
            b.token_piece(b_start, b_end, b_doc, 1)
            b.special(sep_id, 1)
            b.close()
            if nsp:
                b.nsp.append(int(is_random))
            k = max(next_k, k + 1)
    return b.build()


class PretrainData:
    """Batches for one rank of a pre-training run (see the module docstring)."""

    def __init__(self, config: PretrainDataConfig, tokenizer, rank: int = 0, world_size: int = 1,
                 progress: bool = False):
        config.check()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.config, self.rank, self.world_size = config, rank, world_size
        self.packing = config.resolved_packing()
        self.pad_id = tokenizer.pad_token_id
        self.shards = shards.build_shards(config.corpus, tokenizer, config.cache_dir, config.workers, progress)
        T = config.max_seq_len
        if self.packing == "clm":
            eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
            self.examples = pack_blocks(self.shards, T, _need(eos, "end-of-text", self.packing))
        else:
            cls_id = _need(tokenizer.cls_token_id, "[CLS]/<s>", self.packing)
            sep_id = _need(tokenizer.sep_token_id, "[SEP]/</s>", self.packing)
            if self.packing == "blocks":
                self.examples = pack_blocks(self.shards, T, sep_id, cls_id, sep_id)
            elif self.packing == "segment-pair":
                self.examples = pack_segment_pairs(self.shards, T, cls_id, sep_id, "nsp" in config.objectives,
                                                   config.seed)
            else:
                self.examples = pack_sentences(self.shards, T, cls_id, sep_id,
                                               cross_docs=self.packing == "full-sentences")
        if len(self.examples) < world_size:
            raise DataError(f"{', '.join(map(str, config.corpus))}: {len(self.examples)} sequences of "
                            f"{T} tokens, fewer than the {world_size} ranks")
        self.mask_spec = (masking.MaskSpec.from_tokenizer(tokenizer, config.mlm_probability, config.whole_word)
                          if "mlm" in config.objectives else None)
        self._epoch, self._batch = 0, 0     # the position of the next batch batches() yields

    # -- sizes --------------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        per_rank = len(self.examples) // self.world_size
        return -(-per_rank // self.config.batch_size)

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to (after load_state_dict: the one to continue)."""
        return self._epoch

    @property
    def n_examples(self) -> int:
        return len(self.examples)

    # -- one example --------------------------------------------------------------------------------
    def sequence(self, i: int) -> dict:
        """Example i unmasked, as numpy: input_ids, token_type_ids, maskable (text, not special),
        word_start (bool) and doc (document of each token, -1 on special tokens) — all [T_i]."""
        ex = self.examples
        ids, types, maskable, word_start, docs = [], [], [], [], []
        for p in range(ex.ptr[i], ex.ptr[i + 1]):
            s, e, seg = int(ex.start[p]), int(ex.end[p]), int(ex.segment[p])
            if s == _SPECIAL:
                n = 1
                ids.append(np.asarray([e], dtype=np.int64))
                maskable.append(np.zeros(1, bool))
                word_start.append(np.ones(1, bool))
            else:
                n = e - s
                ids.append(self.shards.tokens(s, e))
                maskable.append(np.ones(n, bool))
                ws = self.shards.word_starts(s, e)
                ws[0] = True       # a piece cut mid-word starts a unit of its own
                word_start.append(ws)
            types.append(np.full(n, seg, dtype=np.int64))
            docs.append(np.full(n, ex.doc[p], dtype=np.int64))
        return {"input_ids": np.concatenate(ids), "token_type_ids": np.concatenate(types),
                "maskable": np.concatenate(maskable), "word_start": np.concatenate(word_start),
                "doc": np.concatenate(docs)}

    def mask_round(self, epoch: int) -> int:
        """Which set of masks an epoch uses: the epoch itself (dynamic) or epoch % duplicates (static)."""
        return epoch if self.config.masking == "dynamic" else epoch % self.config.static_duplicates

    def masked(self, i: int, epoch: int) -> dict:
        """Example i as the model sees it in `epoch`: the sequence() fields plus, for mlm, the
        corrupted input_ids, `labels` and the original ids in `original_ids`."""
        seq = self.sequence(i)
        if self.mask_spec is not None:
            rng = np.random.default_rng([self.config.seed, 0x3A5C, i, self.mask_round(epoch)])
            seq["original_ids"] = seq["input_ids"]
            seq["input_ids"], seq["labels"] = masking.mask_sequence(
                seq["input_ids"], seq["maskable"], seq["word_start"], self.mask_spec, rng)
        return seq

    # -- batches -------------------------------------------------------------------------------------
    def order(self, epoch: int) -> np.ndarray:
        """This rank's example indices for an epoch."""
        return shards.epoch_order(len(self.examples), self.config.seed, epoch, self.rank, self.world_size)

    def collate(self, indices, epoch: int) -> dict:
        seqs = [self.masked(int(i), epoch) for i in indices]
        T = max(len(s["input_ids"]) for s in seqs)
        B = len(seqs)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        attention = torch.zeros((B, T), dtype=torch.long)
        types = torch.zeros((B, T), dtype=torch.long)
        labels = torch.full((B, T), masking.IGNORE_INDEX, dtype=torch.long) if self.mask_spec else None
        for r, s in enumerate(seqs):
            n = len(s["input_ids"])
            input_ids[r, :n] = torch.from_numpy(s["input_ids"])
            attention[r, :n] = 1
            types[r, :n] = torch.from_numpy(s["token_type_ids"])
            if labels is not None:
                labels[r, :n] = torch.from_numpy(s["labels"])
        batch = {"input_ids": input_ids, "attention_mask": attention, "token_type_ids": types}
        if labels is not None:
            batch["labels"] = labels
        if "nsp" in self.config.objectives:
            batch["next_sentence_label"] = torch.from_numpy(self.examples.nsp[np.asarray(indices, dtype=np.int64)])
        return batch

    def batches(self, epoch: int) -> Iterator[dict]:
        """The batches of `epoch` for this rank, from the saved position when it is in this epoch."""
        order = self.order(epoch)
        bs = self.config.batch_size
        first = self._batch if epoch == self._epoch else 0
        for b in range(first, len(self)):
            batch = self.collate(order[b * bs:(b + 1) * bs], epoch)
            # the position moves before the yield: a state_dict() taken while the consumer works on
            # this batch resumes after it
            self._epoch, self._batch = (epoch, b + 1) if b + 1 < len(self) else (epoch + 1, 0)
            yield batch

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self._epoch, "batch": self._batch,
                "seed": self.config.seed, "shards": self.shards.key, "examples": len(self.examples),
                "world_size": self.world_size, "packing": self.packing,
                "batch_size": self.config.batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; refuses one saved over other data or settings."""
        mine = self.state_dict()
        for k in ("version", "seed", "shards", "examples", "world_size", "packing", "batch_size"):
            if state.get(k) != mine[k]:
                raise ConfigError(f"the data position was saved with {k}={state.get(k)!r}, this run has "
                                  f"{k}={mine[k]!r}: cannot resume exactly")
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or not 0 <= batch < max(1, len(self)):
            raise ConfigError(f"the data position (epoch {epoch}, batch {batch}) is outside an epoch of "
                              f"{len(self)} batches")
        self._epoch, self._batch = epoch, batch

