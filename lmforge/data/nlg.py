"""Data-to-text tasks of the LoRA paper's NLG experiment: E2E NLG, WebNLG 2017 and DART.

Each task turns its files into
  - training examples: (source, reference), one per reference text, and
  - an evaluation set: the unique inputs of a split in a stable order, each with ALL its references
    (generation makes one output per unique input and the metrics score it against every reference).

Sources are written as the LoRA paper's files write them (microsoft/LoRA examples/NLG):
  e2e     name : The Eagle | Type : coffee shop | price : less than £ 20 | ...
          (slot names renamed: eatType -> Type, priceRange -> price, familyFriendly -> family friendly;
          '£' and a dash between digits split off in values, as in its tokenised files)
  webnlg  Aarhus : leaderName : Jacob_Bundsgaard | ...    (modified triples, as they are)
  dart    Mars Hill College : joined : 1973 | ...         (properties lower-cased)

A decoder's prompt is the source followed by SEPARATOR (" ||", the separator of the LoRA paper's
E2E files), and the text it learns is " " + reference (plus the tokenizer's end-of-text token): the
loss belongs on the reference tokens only. The LoRA repository's own encoder drops the "||" and
relies on the position alone; keeping it marks the boundary in the text itself, so a prompt built
here and a training example can never disagree about where the output starts.

Files, under $LMFORGE_DATA (or data_dir):
  e2e-nlg/lora_format/train.txt.gz   train (LoRA format: "source||tokenised reference", 42,061 lines)
  e2e-nlg/devset.csv                 dev   (official mr,ref CSV: 547 MRs, 4,672 references)
  e2e-nlg/testset_w_refs.csv         test  (630 MRs, 4,693 references)
  e2e-nlg/trainset.csv               train without the LoRA file (the official CSV; not in the shared copy)
  webnlg/lora_format_webnlg_challenge_2017/train.json.gz, or webnlg_challenge_2017/train/*triples/*.xml
  webnlg/webnlg_challenge_2017/dev/*triples/*.xml, test/testdata_with_lex.xml
  dart/dart-v1.1.1-full-train.one-annotation-per-item.json.gz (or dart-v1.1.1-full-train.json),
  dart/dart-v1.1.1-full-dev.json, dart-v1.1.1-full-test.json

Grouping: the references of equal sources are one input's, in first-appearance order, for every
task. E2E: the rows of one MR (the official script groups consecutive equal MRs: the same on these
files). WebNLG and DART: the LoRA repository's evaluation (gpt2_decode.py) groups by the source
text too, so entries or items with the same triples are one input: WebNLG dev has 872 entries but
871 unique triple sets, DART dev 2,768 items but 2,721 unique triple sets.
references="lora" takes E2E dev references from lora_format/valid.txt (tokenised, what the LoRA
paper scored against) instead of the official CSV; WebNLG and DART references are the same text in
both formats.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from lmforge.data.tables import decode_text
from lmforge.errors import ConfigError, DataError

TASKS = ("e2e", "webnlg", "dart")
SPLITS = ("train", "dev", "test")
SEPARATOR = " ||"

# E2E slot names in the official MRs -> the LoRA files' spelling. The eight slots of the data set.
E2E_SLOTS = {"name": "name", "eatType": "Type", "food": "food", "priceRange": "price",
             "customer rating": "customer rating", "area": "area", "familyFriendly": "family friendly",
             "near": "near"}


@dataclass(frozen=True)
class Example:
    source: str
    reference: str

    @property
    def prompt(self) -> str:
        return prompt(self.source)

    @property
    def completion(self) -> str:
        return " " + self.reference


@dataclass(frozen=True)
class EvalSet:
    """The unique inputs of one split, in order, with all their references (references[i] belongs
    to sources[i]); files: where they came from."""
    task: str
    split: str
    sources: tuple[str, ...]
    references: tuple[tuple[str, ...], ...]
    files: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.sources)

    @property
    def prompts(self) -> list[str]:
        return [prompt(s) for s in self.sources]

    @property
    def n_references(self) -> int:
        return sum(len(r) for r in self.references)

    def examples(self) -> list[Example]:
        """One training-style example per reference (for dev loss)."""
        return [Example(s, r) for s, refs in zip(self.sources, self.references) for r in refs]


def prompt(source: str) -> str:
    return source + SEPARATOR


# ---------------------------------------------------------------- reading files

def _read(path: Path) -> str:
    """A text file, gunzipped when it ends in .gz; a missing or non-UTF-8 file is a DataError."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    return decode_text(data, str(path))


def _load_json(path: Path):
    try:
        return json.loads(_read(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None


_SLOT = re.compile(r"\s*([^\[\],]+?)\s*\[([^\[\]]*)\]\s*(?:,|$)")


def parse_mr(mr: str) -> list[tuple[str, str]]:
    """'name[The Eagle], eatType[coffee shop], ...' -> [('name', 'The Eagle'), ('eatType', ...)];
    ValueError naming what is wrong."""
    slots, pos = [], 0
    while pos < len(mr):
        m = _SLOT.match(mr, pos)
        if not m or m.end() == pos:
            raise ValueError(f"expected slot[value] at character {pos + 1}, got {mr[pos:pos + 20]!r}")
        if m.group(1) not in E2E_SLOTS:
            raise ValueError(f"unknown slot {m.group(1)!r} (expected one of {', '.join(E2E_SLOTS)})")
        slots.append((m.group(1), m.group(2)))
        pos = m.end()
    if not slots:
        raise ValueError("empty meaning representation")
    return slots


def _e2e_value(value: str) -> str:
    # the LoRA files' tokenisation of the values: 'less than £20' -> 'less than £ 20', '£20-25' -> '£ 20 - 25'
    value = re.sub(r"£(?=\d)", "£ ", value)
    return re.sub(r"(?<=\d)-(?=\d)", " - ", value)


def e2e_source(slots: list[tuple[str, str]]) -> str:
    return " | ".join(f"{E2E_SLOTS[k]} : {_e2e_value(v)}" for k, v in slots)


def read_e2e_csv(path: Path) -> list[tuple[str, str, str]]:
    """(MR, source, reference) per row of an official E2E CSV (header mr,ref)."""
    text = _read(path)
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if not rows or [c.strip().lower() for c in rows[0]][:2] != ["mr", "ref"]:
        raise DataError(f"{path}:1: expected the header 'mr,ref', got {','.join(rows[0]) if rows else 'nothing'!r}")
    out = []
    reader = csv.reader(io.StringIO(text, newline=""))
    next(reader)
    for row in reader:
        line = reader.line_num
        if not row:
            continue
        if len(row) != 2:
            raise DataError(f"{path}:{line}: expected 2 fields (mr, ref), got {len(row)}")
        mr, ref = row
        try:
            slots = parse_mr(mr)
        except ValueError as e:
            raise DataError(f"{path}:{line}: field mr: {e}") from None
        if not ref.strip():
            raise DataError(f"{path}:{line}: field ref is empty")
        out.append((mr, e2e_source(slots), ref.strip()))
    if not out:
        raise DataError(f"{path}: no rows")
    return out


def read_lora_txt(path: Path) -> list[Example]:
    """The LoRA paper's E2E files: 'source||reference' per line."""
    out = []
    for n, line in enumerate(_read(path).split("\n"), 1):
        if not line.strip():
            continue
        if line.count("||") != 1:
            raise DataError(f"{path}:{n}: expected 'source||reference' (one '||'), got {line.count('||')}")
        src, ref = (part.strip() for part in line.split("||"))
        if not src or not ref:
            raise DataError(f"{path}:{n}: empty {'source' if not src else 'reference'}")
        for part in src.split(" | "):
            if " : " not in part:
                raise DataError(f"{path}:{n}: expected 'slot : value', got {part!r}")
        out.append(Example(src, ref))
    if not out:
        raise DataError(f"{path}: no examples")
    return out


def triples_source(triples: list[tuple[str, str, str]]) -> str:
    return " | ".join(f"{s} : {p} : {o}" for s, p, o in triples)


def _xml_files(folder: Path) -> list[Path]:
    # the challenge's order: 1triples .. 7triples, files by name inside each
    files = sorted(folder.glob("*triples/*.xml"), key=lambda p: (int(p.parent.name.split("triples")[0]), p.name))
    if not files:
        raise DataError(f"{folder}: no *triples/*.xml files")
    return files


def read_webnlg_xml(path: Path) -> list[tuple[str, tuple[str, ...]]]:
    """(source, lexicalisations) per <entry> of a WebNLG XML file (modified triples)."""
    text = _read(path)
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise DataError(f"{path}:{e.position[0]}: invalid XML ({e.msg if hasattr(e, 'msg') else e})") from None
    # ElementTree keeps no line numbers; the n-th <entry> tag of the text is the n-th entry
    starts = [text.count("\n", 0, m.start()) + 1 for m in re.finditer(r"<entry[\s>]", text)]
    out = []
    for i, entry in enumerate(root.iter("entry")):
        line = starts[i] if i < len(starts) else "?"
        triples = []
        for t in entry.iter("mtriple"):
            parts = [p.strip() for p in (t.text or "").split(" | ")]
            if len(parts) != 3 or not all(parts):
                raise DataError(f"{path}:{line}: entry {entry.get('eid')}: expected 'subject | property | object' "
                                f"in <mtriple>, got {t.text!r}")
            triples.append(tuple(parts))
        if not triples:
            raise DataError(f"{path}:{line}: entry {entry.get('eid')}: no <mtriple>")
        lexs = tuple(" ".join((lex.text or "").split()) for lex in entry.iter("lex"))
        out.append((triples_source(triples), tuple(x for x in lexs if x)))
    if not out:
        raise DataError(f"{path}: no <entry>")
    return out


def read_webnlg_lora_json(path: Path) -> list[tuple[str, tuple[str, ...]]]:
    """(source, good lexicalisations) per entry of the LoRA repository's WebNLG json."""
    data = _load_json(path)
    out = []
    try:
        for i, item in enumerate(data["entries"]):
            entry = item[str(i + 1)]
            triples = [(t["subject"], t["property"], t["object"]) for t in entry["modifiedtripleset"]]
            lexs = tuple(x["lex"] for x in entry["lexicalisations"] if x.get("comment") == "good")
            out.append((triples_source(triples), lexs))
    except (KeyError, TypeError) as e:
        raise DataError(f"{path}: entry {len(out) + 1}: missing or malformed field {e}") from None
    return out


def dart_source(tripleset) -> str:
    if not isinstance(tripleset, list) or not tripleset or not all(isinstance(t, list) and len(t) == 3 for t in tripleset):
        raise ValueError(f"expected a list of [subject, property, object], got {str(tripleset)[:60]}")
    return triples_source([(s, p.lower(), o) for s, p, o in tripleset])


def read_dart_json(path: Path) -> list[tuple[str, tuple[str, ...]]]:
    """(source, annotation texts) per item of an official DART json file."""
    data = _load_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}:1: expected a JSON list of items, got {type(data).__name__}")
    out = []
    for i, item in enumerate(data, 1):
        try:
            src = dart_source(item["tripleset"])
            texts = tuple(a["text"] for a in item["annotations"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{path}: item {i}: field tripleset/annotations: {e}") from None
        out.append((src, texts))
    return out


# ---------------------------------------------------------------- tasks and splits

def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    root = data_dir or os.environ.get("LMFORGE_DATA")
    if not root:
        raise ConfigError("no data directory: set LMFORGE_DATA (the folder holding e2e-nlg/, webnlg/, dart/)")
    return Path(root)


def _check(task: str, split: str) -> None:
    if task not in TASKS:
        raise ConfigError(f"unknown data-to-text task {task!r} (known: {', '.join(TASKS)})")
    if split not in SPLITS:
        raise ConfigError(f"{task}: unknown split {split!r} (splits: {', '.join(SPLITS)})")


def _first(*paths: Path) -> Path:
    for p in paths:
        if p.exists():
            return p
    raise DataError(f"{paths[0]}: no such file" + (f" (nor {', '.join(map(str, paths[1:]))})" if paths[1:] else ""))


def _grouped(items) -> tuple[list[str], list[list[str]]]:
    """Group (source, reference) pairs by source in first-appearance order."""
    index: dict[str, int] = {}
    sources, refs = [], []
    for src, ref in items:
        if src not in index:
            index[src] = len(sources)
            sources.append(src)
            refs.append([])
        refs[index[src]].append(ref)
    return sources, refs


def _raw_split(task: str, split: str, root: Path) -> tuple[list[tuple[str, tuple[str, ...]]], tuple[str, ...]]:
    """[(source, references)] per unique input of the official files, and the files read."""
    if task == "e2e":
        name = {"train": "trainset.csv", "dev": "devset.csv", "test": "testset_w_refs.csv"}[split]
        path = root / "e2e-nlg" / name
        rows = read_e2e_csv(path)
        # group by the MR string itself (two MRs differing only in spelling stay apart, as officially)
        mrs, refs = _grouped([(mr, ref) for mr, _, ref in rows])
        src_of = {mr: src for mr, src, _ in rows}
        return [(src_of[mr], tuple(r)) for mr, r in zip(mrs, refs)], (str(path),)
    if task == "webnlg":
        base = root / "webnlg" / "webnlg_challenge_2017"
        if split == "test":
            files = [base / "test" / "testdata_with_lex.xml"]
            if not files[0].is_file():
                raise DataError(f"{files[0]}: no such file (WebNLG test references; testdata_no_lex.xml has none)")
        else:
            files = _xml_files(base / split)
        entries = [e for f in files for e in read_webnlg_xml(f)]
        return _merged(entries), tuple(map(str, files))
    name = {"train": "dart-v1.1.1-full-train.json", "dev": "dart-v1.1.1-full-dev.json",
            "test": "dart-v1.1.1-full-test.json"}[split]
    path = root / "dart" / name
    return _merged(read_dart_json(path)), (str(path),)


def _merged(items: list[tuple[str, tuple[str, ...]]]) -> list[tuple[str, tuple[str, ...]]]:
    """Entries with the same source become one input holding all their references."""
    index: dict[str, int] = {}
    out: list[tuple[str, list[str]]] = []
    for src, group in items:
        if src not in index:
            index[src] = len(out)
            out.append((src, []))
        out[index[src]][1].extend(group)
    return [(s, tuple(group)) for s, group in out]


def eval_set(task: str, split: str, data_dir=None, references: str = "official") -> EvalSet:
    """The unique inputs of `split` with all their references, in a stable order (the official
    files' order); predictions files list one output per input in this order."""
    _check(task, split)
    if references not in ("official", "lora"):
        raise ConfigError(f"references must be 'official' or 'lora', got {references!r}")
    root = data_root(data_dir)
    items, files = _raw_split(task, split, root)
    if task == "e2e" and references == "lora":
        if split != "dev":
            raise ConfigError(f"e2e {split}: the LoRA-format references exist here for dev only (lora_format/valid.txt)")
        lora_path = root / "e2e-nlg" / "lora_format" / "valid.txt"
        lora = read_lora_txt(lora_path)
        sources, refs = _grouped([(e.source, e.reference) for e in lora])
        if sources != [s for s, _ in items]:
            raise DataError(f"{lora_path}: its sources do not match {files[0]}'s MRs (different files?)")
        items, files = list(zip(sources, map(tuple, refs))), files + (str(lora_path),)
    empty = [i for i, (_, r) in enumerate(items) if not r]
    if empty:
        raise DataError(f"{files[0]}: input {empty[0] + 1} ({items[empty[0]][0][:60]!r}) has no reference")
    return EvalSet(task, split, tuple(s for s, _ in items), tuple(tuple(r) for _, r in items), files)


def train_examples(task: str, data_dir=None, split: str = "train") -> list[Example]:
    """One (source, reference) example per reference text of `split`, in file order. Training data is
    what the LoRA paper trained on where present (E2E lora_format/train.txt.gz: tokenised texts;
    WebNLG's LoRA json: 'good' lexicalisations), else the official files (E2E trainset.csv, WebNLG
    XML); DART's official train json, or the one-annotation-per-item copy shipped here."""
    _check(task, split)
    root = data_root(data_dir)
    if split == "train" and task == "e2e":
        for path in (root / "e2e-nlg" / "lora_format" / "train.txt.gz", root / "e2e-nlg" / "lora_format" / "train.txt"):
            if path.is_file():
                return read_lora_txt(path)
        return [Example(src, ref) for _, src, ref in read_e2e_csv(root / "e2e-nlg" / "trainset.csv")]
    if split == "train" and task == "webnlg":
        lora = root / "webnlg" / "lora_format_webnlg_challenge_2017" / "train.json.gz"
        if lora.is_file():
            return [Example(s, r) for s, refs in read_webnlg_lora_json(lora) for r in refs]
    if split == "train" and task == "dart":
        path = _first(root / "dart" / "dart-v1.1.1-full-train.json",
                      root / "dart" / "dart-v1.1.1-full-train.one-annotation-per-item.json.gz")
        return [Example(s, r) for s, refs in read_dart_json(path) for r in refs]
    if task == "e2e":   # file order, not grouped
        name = {"dev": "devset.csv", "test": "testset_w_refs.csv"}[split]
        return [Example(src, ref) for _, src, ref in read_e2e_csv(root / "e2e-nlg" / name)]
    return eval_set(task, split, root).examples()


# ---------------------------------------------------------------- token ids and batches (decoders)

@dataclass(frozen=True)
class Encoded:
    """One training example as token ids: the prompt's, then the target's (" " + reference, then the
    end-of-text token). The loss belongs on the target ids only."""
    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]

    @property
    def input_ids(self) -> tuple[int, ...]:
        return self.prompt_ids + self.target_ids


def _ids(tokenizer, text: str) -> list[int]:
    # no special tokens: a decoder's prompt starts with the source itself, as the LoRA paper's does
    return list(tokenizer([text], padding="none", add_special_tokens=False)["input_ids"][0])


def prompt_ids(tokenizer, source: str) -> list[int]:
    """The token ids of the prompt a decoder continues for `source` (the same in training and generation)."""
    return _ids(tokenizer, prompt(source))


def encode_examples(tokenizer, examples: list[Example], max_len: int, eos_id: int) -> tuple[list[Encoded], int]:
    """(encoded examples, how many were cut to max_len). A prompt and its target are encoded apart, so
    the boundary between them never moves; a target that does not fit loses its end (end token
    included). A prompt that leaves no room for a target token is a DataError."""
    out, cut = [], 0
    for i, e in enumerate(examples, 1):
        p = prompt_ids(tokenizer, e.source)
        t = _ids(tokenizer, e.completion) + [eos_id]
        if len(p) >= max_len:
            raise DataError(f"example {i} ({e.source[:40]!r}...): its prompt has {len(p)} tokens, no room for "
                            f"the reference within --max-seq-len {max_len} (raise it)")
        if len(p) + len(t) > max_len:
            t, cut = t[:max_len - len(p)], cut + 1
        out.append(Encoded(tuple(p), tuple(t)))
    return out, cut


def collate(items: list[Encoded], pad_id: int) -> dict:
    """Right-padded input_ids and attention_mask [B, T], and target_mask [B, T]: True at the target's
    tokens (the reference and its end token), False at the prompt's and at padding."""
    import torch

    T = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(items), T, dtype=torch.long)
    target = torch.zeros(len(items), T, dtype=torch.bool)
    for b, e in enumerate(items):
        n, p = len(e.input_ids), len(e.prompt_ids)
        ids[b, :n] = torch.tensor(e.input_ids)
        mask[b, :n] = 1
        target[b, p:n] = True
    return {"input_ids": ids, "attention_mask": mask, "target_mask": target}


def collate_seq2seq(items: list[Encoded], pad_id: int, start_id: int) -> dict:
    """An encoder-decoder's batch: each prompt as its source (right-padded encoder_input_ids and
    encoder_attention_mask [B, S]) and, for the decoder, the decoder start token then the target,
    laid out as `collate` lays out a decoder's prompt and target (input_ids, attention_mask,
    target_mask [B, T], True at the target's tokens): the start token is the decoder's whole prompt."""
    import torch

    decoder = collate([Encoded((start_id,), e.target_ids) for e in items], pad_id)
    S = max(len(e.prompt_ids) for e in items)
    src = torch.full((len(items), S), pad_id, dtype=torch.long)
    src_mask = torch.zeros(len(items), S, dtype=torch.long)
    for b, e in enumerate(items):
        src[b, :len(e.prompt_ids)] = torch.tensor(e.prompt_ids)
        src_mask[b, :len(e.prompt_ids)] = 1
    return {**decoder, "encoder_input_ids": src, "encoder_attention_mask": src_mask}


def prompt_batch(prompts: list[list[int]], pad_id: int) -> tuple:
    """Left-padded input_ids and attention_mask [B, T] of token-id prompts, for generation."""
    import torch

    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p)
        mask[b, T - len(p):] = 1
    return ids, mask
