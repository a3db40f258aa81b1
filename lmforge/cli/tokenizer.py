"""Train a tokenizer on a corpus (the `tokenizers` library).

  lmforge tokenizer train --kind wordpiece --vocab-size 8000 --corpus data/wiki --out runs/tok --lowercase

Kinds:
  wordpiece  BERT: BERT normalizer and pre-tokenizer, ## continuation pieces, specials
             [PAD] [UNK] [CLS] [SEP] [MASK], [CLS] A [SEP] B [SEP]; also writes vocab.txt
  bpe        BPE over characters with SentencePiece-style word starts (Metaspace, "▁"), the same
             BERT specials and template
  byte-bpe   GPT-2/RoBERTa byte-level BPE (never an unknown token), specials <s> <pad> </s> <unk>
             <mask> at ids 0-4 as RoBERTa, <s> A </s></s> B </s>
The corpus is read as lmforge pre-training reads it (lmforge.data.corpus: .txt, .txt.gz, JSONL,
directories; Project Gutenberg licence text stripped). The output directory (tokenizer.json,
tokenizer_config.json, special_tokens_map.json) loads with lmforge and with transformers'
AutoTokenizer; it is written whole or not at all.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.cli.validate import positive_int, ranged, writable_dir
from lmforge.errors import ConfigError
from lmforge.utils import checks

KINDS = ("wordpiece", "bpe", "byte-bpe")
_BERT_SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                  "mask_token": "[MASK]"}
_ROBERTA_SPECIALS = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
                     "mask_token": "<mask>", "cls_token": "<s>", "sep_token": "</s>"}
_OUR_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"}
_MIN_VOCAB = {"wordpiece": 64, "bpe": 64, "byte-bpe": 256 + 5 + 1}   # byte-bpe: every byte, the specials, a merge


def add_parser(p) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = sub.add_parser("train", help="train a tokenizer on a corpus", description=__doc__,
                       formatter_class=p.formatter_class)
    t.add_argument("--kind", required=True, choices=KINDS)
    t.add_argument("--vocab-size", required=True, type=positive_int, help="size of the vocabulary (with specials)")
    t.add_argument("--corpus", required=True, nargs="+", metavar="PATH", help="corpus files or directories")
    t.add_argument("--out", required=True, type=writable_dir, help="tokenizer directory to write")
    t.add_argument("--min-frequency", type=ranged(int, checks.AT_LEAST_1), default=2,
                   help="a merge or piece must occur this often (default 2)")
    t.add_argument("--lowercase", action="store_true", help="lowercase the text (wordpiece, bpe)")
    t.add_argument("--model-max-length", type=ranged(int, checks.SEQ_LEN), default=512,
                   help="recorded for transformers (default 512)")


def _check_out(out: Path) -> None:
    """--out is replaced whole: refuse a directory holding anything but a tokenizer's files."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    if out.is_dir():
        other = sorted(p.name for p in out.iterdir() if p.name not in _OUR_FILES)
        if other:
            raise ConfigError(f"--out {out}: holds other files ({', '.join(other[:3])}); "
                              "give a new directory or a tokenizer directory to replace")


def build(kind: str, vocab_size: int, lowercase: bool, min_frequency: int):
    """An untrained `tokenizers.Tokenizer` and its trainer for `kind`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if kind == "byte-bpe":
        specials = list(dict.fromkeys(_ROBERTA_SPECIALS.values()))   # <s> <pad> </s> <unk> <mask>
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        return tok, trainer, specials
    specials = list(_BERT_SPECIALS.values())
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=None, lowercase=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                            special_tokens=specials, continuing_subword_prefix="##",
                                            show_progress=False)
    else:
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        steps = [normalizers.NFC()] + ([normalizers.Lowercase()] if lowercase else [])
        tok.normalizer = normalizers.Sequence(steps)
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                      show_progress=False)
    return tok, trainer, specials


def _add_template(tok, kind: str) -> None:
    from tokenizers import processors

    if kind == "byte-bpe":
        tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")),
                                                          ("<s>", tok.token_to_id("<s>")),
                                                          trim_offsets=True, add_prefix_space=False)
    else:
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)])


def train(kind: str, vocab_size: int, corpus_paths, out, min_frequency: int = 2, lowercase: bool = False,
          model_max_length: int = 512) -> dict:
    """Train and write the tokenizer directory `out` atomically; returns a summary."""
    from lmforge.data import corpus
    from lmforge.utils.atomic import atomic_dir

    if kind not in KINDS:
        raise ConfigError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if vocab_size < _MIN_VOCAB[kind]:
        raise ConfigError(f"--vocab-size must be >= {_MIN_VOCAB[kind]} for {kind}, got {vocab_size}")
    out = Path(out)
    _check_out(out)
    files = corpus.list_files(corpus_paths)          # bad paths fail before any training
    tok, trainer, specials = build(kind, vocab_size, lowercase and kind != "byte-bpe", min_frequency)
    docs = (doc for _, doc in corpus.read_corpus(files))
    tok.train_from_iterator(docs, trainer=trainer)
    _add_template(tok, kind)
    names = _ROBERTA_SPECIALS if kind == "byte-bpe" else _BERT_SPECIALS
    model_type = "roberta" if kind == "byte-bpe" else "bert"
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "lmforge_model_type": model_type, "lmforge_kind": kind, **names}
    if kind != "byte-bpe":   # BERT-style: segment ids are a model input (transformers' default omits them)
        config["do_lower_case"] = bool(lowercase)
        config["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    with atomic_dir(out) as tmp:
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
        (tmp / "special_tokens_map.json").write_text(json.dumps(names, indent=1) + "\n", encoding="utf-8")
        if kind == "wordpiece":   # BertTokenizer-style vocabulary, one token a line in id order
            vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
            (tmp / "vocab.txt").write_text("".join(t + "\n" for t, _ in vocab), encoding="utf-8")
    return {"kind": kind, "vocab_size": tok.get_vocab_size(), "files": len(files), "out": str(out),
            "specials": specials}


def run(args) -> int:
    summary = train(args.kind, args.vocab_size, args.corpus, args.out, args.min_frequency, args.lowercase,
                    args.model_max_length)
    print(f"wrote {summary['out']}: {summary['kind']} tokenizer, {summary['vocab_size']} tokens, "
          f"trained on {summary['files']} file(s)")
    return 0
