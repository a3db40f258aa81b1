"""The tokenizer a GGUF checkpoint carries in its metadata, as an lmforge Tokenizer.

A GGUF file has no tokenizer.json: llama.cpp stores the vocabulary (`tokenizer.ggml.tokens`, already
in GPT-2's byte-to-unicode spelling), the BPE merges, each token's type, the special token ids, the
pre-tokenizer's name (`tokenizer.ggml.pre`) and the Jinja chat template as metadata. This rebuilds
the byte-level BPE tokenizer from them with the `tokenizers` library.

The pre-tokenizer follows llama.cpp, which is what the file was made for: for "smollm" (and the
StarCoder family it descends from) every digit is its own pre-token before the GPT-2 split, as in
SmolLM2's own tokenizer.json. transformers' GGUF loader does not know "smollm" and keeps numbers
whole the GPT-2 way; the ids still agree for SmolLM2 because its vocabulary has no merge that joins a
digit to anything, but a vocabulary with such merges would tell the two apart.
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _HFTokenizer

from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import CheckpointError, DataError

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types (1 normal, 2 unknown, 5 unused, 6 byte)

# tokenizer.ggml.pre -> split every digit apart before the GPT-2 regex (llama.cpp's "\p{N}" rule)?
_PRE_TOKENIZERS = {
    "default": False, "gpt2": False, "gpt-2": False, "mpt": False, "olmo": False, "jais": False,
    "smollm": True, "starcoder": True, "refact": True, "codeshell": True,
}


def _pre_tokenizer(pre: str, source: str):
    if pre not in _PRE_TOKENIZERS:
        raise DataError(f"{source}: tokenizer.ggml.pre {pre!r} is not supported "
                        f"(supported: {', '.join(sorted(_PRE_TOKENIZERS))})")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's regex
    if _PRE_TOKENIZERS[pre]:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def _field(meta: dict, key: str, source: str, kind: type, required: bool = True):
    value = meta.get(key)
    if value is None:
        if required:
            raise DataError(f"{source}: metadata field {key!r} is missing")
        return None
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise DataError(f"{source}: metadata field {key!r} must be an integer, got {value!r}")
    if kind is list and not isinstance(value, list):
        raise DataError(f"{source}: metadata field {key!r} must be an array, got {type(value).__name__}")
    if kind in (str, bool) and not isinstance(value, kind):
        raise DataError(f"{source}: metadata field {key!r} must be a {kind.__name__}, got {value!r}")
    return value


def tokenizer_from_gguf_metadata(meta: dict, source: str = "GGUF metadata") -> Tokenizer:
    """Build the Tokenizer from a GGUF file's metadata (lmforge.models.gguf.read_gguf_metadata);
    `source` names the file in error messages."""
    kind = _field(meta, "tokenizer.ggml.model", source, str)
    if kind != "gpt2":
        raise DataError(f"{source}: tokenizer.ggml.model {kind!r} is not supported (expected 'gpt2', byte-level BPE)")
    tokens = _field(meta, "tokenizer.ggml.tokens", source, list)
    merges = _field(meta, "tokenizer.ggml.merges", source, list)
    types = _field(meta, "tokenizer.ggml.token_type", source, list, required=False) or [1] * len(tokens)
    if len(types) != len(tokens):
        raise DataError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise DataError(f"{source}: tokenizer.ggml.tokens repeats a token ({len(tokens) - len(vocab)} duplicates)")
    pairs = []
    for n, merge in enumerate(merges):
        parts = merge.split(" ") if isinstance(merge, str) else []
        if len(parts) != 2:
            raise DataError(f"{source}: tokenizer.ggml.merges[{n}] is {merge!r}, "
                            "expected two tokens separated by a space")
        pairs.append((parts[0], parts[1]))

    tok = _HFTokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(_field(meta, "tokenizer.ggml.pre", source, str, required=False) or "default",
                                       source)
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, <|endoftext|>) are special: matched whole, dropped when decoding
    # with skip_special_tokens; user-defined ones are matched whole but are ordinary text.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _USER_DEFINED])

    ids = {}
    for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id"),
                      ("unk", "unknown_token_id")):
        i = _field(meta, "tokenizer.ggml." + key, source, int, required=False)
        if i is not None:
            if not 0 <= i < len(tokens):
                raise DataError(f"{source}: tokenizer.ggml.{key} {i} is outside the {len(tokens)}-token vocabulary")
            ids[role] = i
    tok.post_processor = _post_processor(meta, ids, tokens, source)
    template = _field(meta, "tokenizer.chat_template", source, str, required=False)
    return Tokenizer(tok, "bpe", str(meta.get("general.architecture") or "llama"),
                     special_token_ids=ids, chat_template=template)


def _post_processor(meta: dict, ids: dict, tokens: list, source: str):
    """What encode(add_special_tokens=True) adds: BOS / EOS around each sequence, only where the file
    asks for them (SmolLM2 asks for neither: its chat template writes <|im_start|> itself)."""
    wanted = {}
    for role in ("bos", "eos"):
        if _field(meta, f"tokenizer.ggml.add_{role}_token", source, bool, required=False):
            if role not in ids:
                raise DataError(f"{source}: tokenizer.ggml.add_{role}_token is set but the {role} token id is missing")
            wanted[role] = tokens[ids[role]]
    if not wanted:
        return processors.ByteLevel(trim_offsets=False)
    bos, eos = [wanted["bos"]] if "bos" in wanted else [], [wanted["eos"]] if "eos" in wanted else []
    single = bos + ["$A:0"] + eos
    pair = single + [f"{t}:1" for t in bos] + ["$B:1"] + [f"{t}:1" for t in eos]
    return processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair),
                                         special_tokens=[(t, ids[r]) for r, t in wanted.items()])


def load_gguf_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a GGUF checkpoint file."""
    from lmforge.models.gguf import read_gguf_metadata  # data/ reads the file through models/

    p = Path(path)
    try:
        meta = read_gguf_metadata(p)
    except CheckpointError as e:
        raise DataError(str(e)) from None
    return tokenizer_from_gguf_metadata(meta, str(p))
