"""Tokenizers through the Hugging Face `tokenizers` library: BERT WordPiece and byte-level BPE
(GPT-2, RoBERTa). This wrapper adds what a model needs around it: special-token templates, sentence
pairs with token-type ids, longest-first truncation, and padded batches with attention masks."""

from __future__ import annotations

import collections
import json
import re
import threading
from pathlib import Path

import torch
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from lmforge.errors import DataError

_BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_GPT2_EOS = "<|endoftext|>"


def _bert_template(tok: _HFTokenizer) -> processors.TemplateProcessing:
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    return processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])


def _wordpiece(vocab: Path, lowercase: bool) -> _HFTokenizer:
    tok = _HFTokenizer(models.WordPiece.from_file(str(vocab), unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = _bert_template(tok)
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens([t for t in _BERT_SPECIALS if tok.token_to_id(t) is not None])
    return tok


def _bpe(vocab: Path, merges: Path, model_type: str) -> _HFTokenizer:
    tok = _HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if model_type == "roberta":
        bos, eos = ("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))
        if bos[1] is None or eos[1] is None:
            raise DataError(f"{vocab}: a RoBERTa vocabulary needs <s> and </s>")
        tok.post_processor = processors.RobertaProcessing(eos, bos, trim_offsets=True, add_prefix_space=False)
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)  # GPT-2 adds no special tokens
        specials = [_GPT2_EOS]
    tok.add_special_tokens([t for t in specials if tok.token_to_id(t) is not None])
    return tok


def _vocab_is_uncased(vocab: Path) -> bool:
    """vocab.txt alone does not say; a cased vocab has tokens with capitals that are not [SPECIAL]."""
    for line in vocab.read_text(encoding="utf-8").splitlines():
        if re.search(r"[A-Z]", line) and not re.fullmatch(r"\[[A-Z_]+\]|\[unused\d+\]", line):
            return False
    return True


class Tokenizer:
    """Thread-safe: a call never changes settings another call sees. The Rust tokenizer carries its
    truncation and padding as state, so each setting (max_length, padding, side) gets its own copy,
    configured once when first asked for and never changed after; `_tok` itself stays unconfigured."""

    _MAX_CONFIGURED = 16   # settings kept (a server uses one or two; an LRU bound for the rest)

    def __init__(self, tok: _HFTokenizer, kind: str, model_type: str, lowercase: bool | None = None,
                 special_token_ids: dict[str, int] | None = None, chat_template: str | None = None):
        """special_token_ids: {"bos"|"eos"|"pad"|"unk": id} where the vocabulary's own conventions do not
        say (a GGUF file states them; SmolLM2's bos is <|im_start|>, not <s>); chat_template: the
        model's Jinja chat template, if it has one."""
        tok.no_truncation()  # a tokenizer.json may carry its own settings: each call picks its own
        tok.no_padding()
        self._tok, self.kind, self.model_type, self.lowercase = tok, kind, model_type, lowercase
        unknown = set(special_token_ids or {}) - set(_SPECIAL_ROLES)
        if unknown:
            raise ValueError(f"special_token_ids: unknown role(s) {sorted(unknown)}; "
                             f"expected {', '.join(_SPECIAL_ROLES)}")
        self.special_ids_by_role = dict(special_token_ids or {})
        self.chat_template = chat_template
        self._configured: collections.OrderedDict = collections.OrderedDict()
        self._configured_lock = threading.Lock()

    def _for(self, max_length: int | None, padding: str, padding_side: str) -> _HFTokenizer:
        """The Rust tokenizer set up for these settings (a private copy; the plain one when none)."""
        if padding == "none" and not max_length:
            return self._tok
        key = (max_length or None, padding, padding_side)
        with self._configured_lock:
            tok = self._configured.get(key)
            if tok is not None:
                self._configured.move_to_end(key)
                return tok
        tok = _HFTokenizer.from_str(self._tok.to_str())   # configured before any other thread sees it
        if max_length:
            tok.enable_truncation(max_length, strategy="longest_first")
        if padding != "none":
            tok.enable_padding(direction=padding_side, pad_id=self.pad_token_id,
                               pad_token=tok.id_to_token(self.pad_token_id) or "",
                               length=max_length if padding == "max_length" else None)
        with self._configured_lock:
            tok = self._configured.setdefault(key, tok)
            while len(self._configured) > self._MAX_CONFIGURED:
                self._configured.popitem(last=False)
        return tok

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_files(cls, vocab, merges=None, lowercase: bool | None = None,
                   model_type: str | None = None) -> "Tokenizer":
        vocab = Path(vocab)
        if not vocab.is_file():
            raise DataError(f"{vocab}: tokenizer vocabulary not found")
        if merges is None:
            lowercase = _vocab_is_uncased(vocab) if lowercase is None else lowercase
            return cls(_wordpiece(vocab, lowercase), "wordpiece", model_type or "bert", lowercase)
        model_type = model_type or "gpt2"
        return cls(_bpe(vocab, Path(merges), model_type), "bpe", model_type)

    @classmethod
    def from_gguf(cls, path) -> "Tokenizer":
        """The tokenizer a GGUF checkpoint carries in its metadata (vocabulary, merges, special
        tokens, chat template); see lmforge/data/gguf_tokenizer.py."""
        from lmforge.data.gguf_tokenizer import load_gguf_tokenizer

        return load_gguf_tokenizer(path)

    @classmethod
    def from_dir(cls, path, model_type: str | None = None) -> "Tokenizer":
        d = Path(path)
        if not d.is_dir():
            raise DataError(f"{d}: tokenizer directory not found")
        cfg = _read_json(d / "tokenizer_config.json")
        model_type = model_type or cfg.get("lmforge_model_type") or _read_json(d / "config.json").get("model_type")
        if (d / "tokenizer.json").is_file():
            try:
                tok = _HFTokenizer.from_file(str(d / "tokenizer.json"))
            except Exception as e:
                raise DataError(f"{d / 'tokenizer.json'}: cannot be read ({e})") from None
            kind = "wordpiece" if isinstance(tok.model, models.WordPiece) else "bpe"
            return cls(tok, kind, model_type or ("bert" if kind == "wordpiece" else "gpt2"),
                       cfg.get("do_lower_case"), _special_ids(cfg, d / "tokenizer_config.json"),
                       cfg.get("chat_template") if isinstance(cfg.get("chat_template"), str) else None)
        if (d / "vocab.txt").is_file():
            return cls.from_files(d / "vocab.txt", lowercase=cfg.get("do_lower_case"), model_type=model_type)
        for vocab, merges in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
            if (d / vocab).is_file() and (d / merges).is_file():
                return cls.from_files(d / vocab, d / merges, model_type=model_type)
        raise DataError(f"{d}: no tokenizer files (expected tokenizer.json, vocab.txt, "
                        "vocab.json + merges.txt, or encoder.json + vocab.bpe)")

    def save(self, directory) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(d / "tokenizer.json"))
        cfg = {"lmforge_model_type": self.model_type, "model_max_length": 512}
        if self.lowercase is not None:
            cfg["do_lower_case"] = self.lowercase
        if self.special_ids_by_role:
            cfg["lmforge_special_ids"] = self.special_ids_by_role
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1) + "\n")

    def to_json(self) -> str:
        """The whole tokenizer definition (tokenizer.json), for worker processes that rebuild it and
        for cache keys."""
        return self._tok.to_str()

    # -- special tokens ---------------------------------------------------------------------------
    @property
    def special_ids(self) -> set[int]:
        """Every special token id: the named ones and any added special token."""
        named = (self.pad_token_id, self.cls_token_id, self.sep_token_id, self.mask_token_id, self.unk_token_id,
                 self.bos_token_id, self.eos_token_id)
        ids = {i for i in named if i is not None}
        ids.update(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)
        return ids

    def _id(self, *tokens: str) -> int | None:
        for t in tokens:
            i = self._tok.token_to_id(t)
            if i is not None:
                return i
        return None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def end_ids(self, model_eos: int | None, chat: bool) -> list[int]:
        """The tokens that end a generation: the model's end token, this tokenizer's, and with the
        chat template in use the end of a turn (ChatML's <|im_end|>, SmolLM2's)."""
        ends = {model_eos, self.eos_token_id}
        if chat and self.chat_template is not None:
            ends.add(self.token_to_id("<|im_end|>"))
        return sorted(e for e in ends if e is not None)

    def token_to_id(self, token: str) -> int | None:
        """The id of a token of the vocabulary (None when it has none), e.g. a chat end marker."""
        return self._tok.token_to_id(token)

    @property
    def pad_token_id(self) -> int:
        if "pad" in self.special_ids_by_role:
            return self.special_ids_by_role["pad"]
        # GPT-2 has no pad token: pad with <|endoftext|>, which the attention mask hides anyway
        i = self._id("[PAD]", "<pad>", _GPT2_EOS)
        return 0 if i is None else i

    cls_token_id = property(lambda self: self._id("[CLS]", "<s>"))
    sep_token_id = property(lambda self: self._id("[SEP]", "</s>"))
    mask_token_id = property(lambda self: self._id("[MASK]", "<mask>"))
    unk_token_id = property(lambda self: self.special_ids_by_role.get("unk", self._id("[UNK]", "<unk>")))
    bos_token_id = property(lambda self: self.special_ids_by_role.get("bos", self._id("<s>", _GPT2_EOS)))
    eos_token_id = property(lambda self: self.special_ids_by_role.get("eos", self._id("</s>", _GPT2_EOS)))

    # -- chat ---------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as the model's chat template writes it (a string, special tokens in
        it as text: encode it with add_special_tokens=False). Rendered as Hugging Face renders
        chat templates: a sandboxed Jinja environment with trim_blocks and lstrip_blocks."""
        if self.chat_template is None:
            raise DataError("this tokenizer has no chat template")
        names = {f"{role}_token": self._tok.id_to_token(i) if i is not None else None
                 for role, i in (("bos", self.bos_token_id), ("eos", self.eos_token_id),
                                 ("pad", self.pad_token_id), ("unk", self.unk_token_id))}
        return _render_chat_template(self.chat_template, messages, add_generation_prompt, names)

    # -- encoding ---------------------------------------------------------------------------------
    def encode(self, text: str, pair: str | None = None, max_length: int | None = None,
               add_special_tokens: bool = True) -> list[int]:
        return self([text], [pair] if pair is not None else None, max_length, "none",
                    add_special_tokens)["input_ids"][0]

    def __call__(self, texts, pairs=None, max_length: int | None = None, padding: str = "longest",
                 add_special_tokens: bool = True, padding_side: str = "right") -> dict:
        """Encode a batch. padding: "longest" | "max_length" -> LongTensors [B, T] with an
        attention mask; "none" -> ragged lists of ids and token-type ids."""
        if isinstance(texts, str):
            texts = [texts]
        if pairs is not None and len(pairs) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(pairs)} pairs")
        if padding not in ("longest", "max_length", "none"):
            raise ValueError(f"padding {padding!r} is not one of longest, max_length, none")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side {padding_side!r} is not one of left, right")
        tok = self._for(max_length, padding, padding_side)
        inputs = list(zip(texts, pairs)) if pairs is not None else list(texts)
        encodings = tok.encode_batch(inputs, add_special_tokens=add_special_tokens)
        if padding == "none":
            return {"input_ids": [e.ids for e in encodings], "token_type_ids": [e.type_ids for e in encodings]}
        return {
            "input_ids": torch.tensor([e.ids for e in encodings], dtype=torch.long),
            "attention_mask": torch.tensor([e.attention_mask for e in encodings], dtype=torch.long),
            "token_type_ids": torch.tensor([e.type_ids for e in encodings], dtype=torch.long),
        }

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if torch.is_tensor(ids):
            ids = ids.tolist()
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids) -> list[str]:
        return [self._tok.id_to_token(i) for i in ids]


_SPECIAL_ROLES = ("bos", "eos", "pad", "unk")


def _render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool,
                          special_tokens: dict) -> str:
    """A chat template is Jinja, written for Hugging Face's environment: the same sandbox (a template
    comes with a downloaded model and must not reach Python objects), trim_blocks/lstrip_blocks,
    loop controls, raise_exception() and a tojson that leaves non-ASCII and HTML characters alone."""
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise DataError("chat templates need jinja2: pip install jinja2") from None

    def raise_exception(message):
        raise DataError(f"chat template: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **special_tokens)
    except jinja2.TemplateError as e:
        raise DataError(f"chat template: {type(e).__name__}: {e}") from None


def _special_ids(cfg: dict, path: Path) -> dict[str, int] | None:
    ids = cfg.get("lmforge_special_ids")
    if ids is None:
        return None
    if not isinstance(ids, dict) or not all(k in _SPECIAL_ROLES and isinstance(v, int) and not isinstance(v, bool)
                                            for k, v in ids.items()):
        raise DataError(f"{path}: lmforge_special_ids must map {'/'.join(_SPECIAL_ROLES)} to token ids, got {ids!r}")
    return ids


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


def load_tokenizer(name_or_dir) -> Tokenizer:
    """The tokenizer of a model directory, or of an alias such as "minilm"."""
    p = Path(name_or_dir)
    if not p.is_dir():
        from lmforge.models.hub import resolve  # lazy: data/ needs models/ only to find aliases

        p = resolve(name_or_dir)
    if p.is_file() and p.suffix.lower() == ".gguf":  # a GGUF checkpoint carries its tokenizer
        return Tokenizer.from_gguf(p)
    return Tokenizer.from_dir(p)
