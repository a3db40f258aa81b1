"""Llama as configuration (issue #16): RMSNorm, rotary positions, grouped-query attention and a SwiGLU
FFN are ModelConfig fields of the one model definition. Golden parity with transformers'
LlamaForCausalLM on tiny random models loaded through the Hugging Face names: padded batches with
an attention mask, the packed path, incremental decoding with the KV cache and greedy generation;
checkpoints both ways; SmolLM2-135M from its GGUF file against transformers' own GGUF loading; LoRA
on Llama in PEFT's format; bad configs as one-line errors naming the field."""

import json

import peft
import pytest
import torch
import transformers as T

from lmforge.adapters.lora import LoraConfig
from lmforge.adapters.manager import add_adapter, lora_layers
from lmforge.adapters.peft_format import load_adapter, save_adapter
from lmforge.errors import ConfigError
from lmforge.models import Model, ModelConfig, from_pretrained, generate, hub, load_config, save_pretrained
from lmforge.models.hf import config_from_hf, variant_features
from lmforge.models.packing import pack_padded

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

V = 61
# name -> transformers LlamaConfig fields on top of BASE
CASES = {
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "mha-tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "mqa-theta500": dict(num_attention_heads=4, num_key_value_heads=1, rope_theta=500.0),
    "head_dim-theta1e6": dict(num_attention_heads=2, num_key_value_heads=1, head_dim=24, rope_theta=1e6,
                              tie_word_embeddings=True),
    "biases": dict(num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
                   rms_norm_eps=1e-5),
}
BASE = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, intermediate_size=40, max_position_embeddings=64,
            tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=0)


def reference(case: str, seed: int = 0) -> T.LlamaForCausalLM:
    """A transformers Llama with random weights large enough that every part moves the logits."""
    torch.manual_seed(seed)
    model = T.LlamaForCausalLM(T.LlamaConfig(**{**BASE, **CASES[case]})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    """(case, transformers model, lmforge model loaded from the transformers checkpoint directory)."""
    ref = reference(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(directory)
    ours = from_pretrained(directory).eval()
    return request.param, ref, ours


def batch(B: int = 3, T_: int = 10, left: bool = False, seed: int = 1):
    """ids [B, T] with rows of different lengths, padded on the right (or left); mask [B, T]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, T_), generator=g)
    lengths = torch.tensor([T_ - 3 * i for i in range(B)])[:, None]
    col = torch.arange(T_)[None]
    mask = (col >= T_ - lengths if left else col < lengths).long()
    return ids.masked_fill(mask == 0, 0), mask


def hf_positions(mask):
    """The position ids transformers' generate gives a padded batch: tokens counted, pads at 1."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def test_config_is_the_llama_recipe(pair):
    case, ref, ours = pair
    c, h = ours.config, ref.config
    assert (c.model_type, c.head, c.norm, c.ffn, c.position_embedding, c.hidden_act) == \
        ("llama", "causal-lm", "rmsnorm", "glu", "rope", "silu")
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.rope_theta, c.layer_norm_eps, c.tie_word_embeddings,
            c.linear_bias) == (h.num_attention_heads, h.num_key_value_heads, h.head_dim,
                               h.rope_parameters["rope_theta"], h.rms_norm_eps, h.tie_word_embeddings,
                               h.attention_bias)
    assert variant_features(c) == []
    assert ours.transformer.layers[0].attention.key.out_features == h.num_key_value_heads * h.head_dim


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
@torch.no_grad()
def test_padded_logits_equal_transformers(pair, left):
    _, ref, ours = pair
    ids, mask = batch(left=left)
    want = ref(ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
    got = ours(ids, attention_mask=mask).logits
    real = mask.bool()   # a pad's output is whatever each library makes of nothing
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5)
    # and without a mask: SDPA's own causal path
    torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("B", [3, 17], ids=["one-group", "length-buckets"])
@torch.no_grad()
def test_packed_logits_equal_transformers(pair, B):
    """Packed: positions restart at 0 in every sequence. 17 sequences of different lengths are cut
    into length buckets, so the scatter into the attention layout is exercised too."""
    _, ref, ours = pair
    ids, mask = batch(B=B, T_=B + 2) if B > 3 else batch()
    if B > 3:   # lengths 3 .. B + 2, every one different
        mask = (torch.arange(B + 2)[None] < torch.arange(3, B + 3)[:, None]).long()
        ids = ids.masked_fill(mask == 0, 0)
    flat, packed = pack_padded(ids, mask)
    assert B == 3 or len(packed.groups) > 1
    got = ours(flat, packed=packed).logits                                         # [N, V]
    want = ref(ids, attention_mask=mask).logits[mask.bool()]                        # [N, V]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@torch.no_grad()
def test_incremental_decoding_with_the_cache_equals_transformers(pair):
    """A left-padded prompt, then one token at a time through the KV cache (keys cached with the
    Hkv heads, rotated at their own positions): each step's logits are transformers' full forward."""
    _, ref, ours = pair
    ids, mask = batch(B=2, T_=6, left=True)
    steps = torch.randint(1, V, (2, 4), generator=torch.Generator().manual_seed(3))
    cache = ours.new_cache(2, 10)
    assert cache.k.shape[2] == ours.config.num_kv_heads
    got = [ours(ids, attention_mask=mask, cache=cache).logits[:, -1]]
    for t in range(steps.shape[1]):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        got.append(ours(steps[:, t:t + 1], attention_mask=mask, cache=cache).logits[:, -1])
    full = torch.cat([ids, steps], dim=1)
    want = ref(full, attention_mask=mask, position_ids=hf_positions(mask)).logits[:, 5:]
    torch.testing.assert_close(torch.stack(got, dim=1), want, rtol=0, atol=1e-5)


@torch.no_grad()
def test_greedy_generate_equals_transformers(pair):
    _, ref, ours = pair
    ids, mask = batch(B=2, T_=6, left=True, seed=4)
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                        eos_token_id=None)
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=12)
    assert got.tolist() == want.tolist()


@torch.no_grad()
def test_beam_search_equals_transformers(pair):
    """Beams reorder the cache rows (of Hkv heads, rotated at their positions)."""
    from lmforge.models.beam_search import beam_search

    _, ref, ours = pair
    prompt = torch.randint(1, V, (2, 5), generator=torch.Generator().manual_seed(6))
    want = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                        num_beams=3, pad_token_id=0, early_stopping=False)
    assert beam_search(ours, prompt, num_beams=3, max_new_tokens=8, pad_token_id=0).tolist() == want.tolist()


@torch.no_grad()
def test_save_pretrained_loads_in_transformers(pair, tmp_path):
    """lmforge -> config.json (model_type llama) + safetensors under Llama's names -> transformers."""
    _, _, ours = pair
    torch.manual_seed(1)
    fresh = Model(ours.config).eval()   # lmforge's own initialisation, not the loaded weights
    save_pretrained(fresh, tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert (saved["model_type"], saved["architectures"]) == ("llama", ["LlamaForCausalLM"])
    theirs = T.AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert type(theirs).__name__ == "LlamaForCausalLM"
    ids, mask = batch()
    real = mask.bool()
    want = theirs(ids, attention_mask=mask).logits[real]
    torch.testing.assert_close(fresh(ids, attention_mask=mask).logits[real], want, rtol=0, atol=1e-5)
    again = from_pretrained(tmp_path / "saved").eval()
    assert again.config == fresh.config
    torch.testing.assert_close(again(ids, attention_mask=mask).logits[real], want, rtol=0, atol=1e-5)


# -- SmolLM2-135M from its 4-bit GGUF file ------------------------------------------------------------

@pytest.mark.slow
@torch.no_grad()
def test_smollm2_gguf_logits_equal_transformers_gguf_loading():
    path = hub.resolve("smollm2-135m")
    ref = T.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    ours = from_pretrained("smollm2-135m").eval()
    assert (ours.config.head, ours.config.num_heads, ours.config.num_kv_heads) == ("causal-lm", 9, 3)
    assert load_config(path) == ours.config   # a path to the .gguf file reads the same config
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 5896, 47, 2]])   # a short prompt
    want = ref(ids).logits
    got = ours(ids).logits
    # 30 layers of fp32 GEMMs summed in another order (oneDNN where lmforge measured it faster):
    # differences of ~1e-4 on logits of magnitude ~20; the tiny models above hold 1e-5
    torch.testing.assert_close(got, want, rtol=0, atol=5e-4)
    assert bool((got.argmax(-1) == want.argmax(-1)).all())
    # the cache continues the positions: greedy decoding is transformers'
    want_ids = ref.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=2)
    assert generate(ours, ids, max_new_tokens=6).tolist() == want_ids.tolist()


# -- LoRA on Llama ------------------------------------------------------------------------------------

@torch.no_grad()
def test_lora_on_llama_loads_in_peft(tmp_path):
    ref = reference("gqa")
    ref.save_pretrained(tmp_path / "base")
    ours = from_pretrained(tmp_path / "base").eval()
    add_adapter(ours, "x", LoraConfig(r=4, alpha=8, target_modules=("query", "value", "ffn_out")))
    g = torch.Generator().manual_seed(5)
    for layer in lora_layers(ours).values():   # B starts at zero: give the adapter an effect
        layer.lora_B["x"].weight.copy_(torch.randn(layer.lora_B["x"].weight.shape, generator=g))
    ids, mask = batch()
    real = mask.bool()
    got = ours(ids, attention_mask=mask, adapters="x").logits
    assert not torch.allclose(got, ours(ids, attention_mask=mask).logits)
    save_adapter(ours, "x", tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    theirs = peft.PeftModel.from_pretrained(T.AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                            tmp_path / "adapter").eval()
    wrapped = {n.rsplit(".", 1)[-1] for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"q_proj", "v_proj", "down_proj"}
    want = theirs(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5)
    again = from_pretrained(tmp_path / "base").eval()
    load_adapter(again, tmp_path / "adapter", "x")
    torch.testing.assert_close(again(ids, attention_mask=mask, adapters="x").logits, got, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["embedding", "layer"])
@torch.no_grad()
def test_prefix_tuning_on_llama_padded_equals_packed(kind):
    """Virtual tokens take rotary positions like real ones (padded and packed alike); prefix keys and
    values have the Hkv key/value heads."""
    from lmforge.adapters.prefix import PrefixConfig, add_prefix

    torch.manual_seed(0)
    model = Model(ModelConfig(**{**LLAMA_SMALL, "num_layers": 2})).eval()
    add_prefix(model, "p", PrefixConfig(kind=kind, length=3, init_std=0.5))
    ids, mask = batch()
    padded = model(ids, attention_mask=mask, adapters="p").logits
    assert not torch.allclose(padded, model(ids, attention_mask=mask).logits)
    flat, packed = pack_padded(ids, mask)
    torch.testing.assert_close(model(flat, packed=packed, adapters="p").logits, padded[mask.bool()],
                               rtol=0, atol=1e-5)


def test_lora_on_the_fused_gate_up_has_no_peft_name(tmp_path):
    ours = Model(ModelConfig(**LLAMA_SMALL))
    add_adapter(ours, "x", LoraConfig(r=2, target_modules=("intermediate",)))   # trains fine in lmforge
    with pytest.raises(ConfigError, match="LoRA target 'intermediate' has no PEFT name for llama"):
        save_adapter(ours, "x", tmp_path / "adapter")


# -- configs and errors -------------------------------------------------------------------------------

LLAMA_SMALL = dict(model_type="llama", vocab_size=V, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                   intermediate_size=40, max_position_embeddings=32, type_vocab_size=0, hidden_act="silu",
                   norm="rmsnorm", ffn="glu", position_embedding="rope", linear_bias=False, head="causal-lm")


def test_a_llama_with_another_recipe_is_a_variant_that_round_trips(tmp_path):
    config = ModelConfig(**{**LLAMA_SMALL, "norm": "layernorm"})
    assert variant_features(config) == ["norm='layernorm' (Llama has 'rmsnorm')"]
    model = Model(config).eval()
    save_pretrained(model, tmp_path / "v")
    assert json.loads((tmp_path / "v" / "config.json").read_text())["model_type"] == "lmforge"
    again = from_pretrained(tmp_path / "v").eval()
    ids = torch.randint(0, V, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
    # and rotary positions and grouped-query attention on a GPT-2 are variants too
    assert variant_features(ModelConfig(model_type="gpt2", position_embedding="rope", num_heads=4,
                                        num_kv_heads=2, hidden_size=32)) == \
        ["rope positions", "grouped-query attention"]


def test_replace_rederives_head_dim_and_kv_heads():
    c = ModelConfig(**{**LLAMA_SMALL, "num_kv_heads": None})
    wider = c.replace(hidden_size=64, num_heads=8)
    assert (wider.head_dim, wider.num_kv_heads) == (8, 8)
    gqa = ModelConfig(**LLAMA_SMALL).replace(hidden_size=64)
    assert (gqa.head_dim, gqa.num_kv_heads) == (16, 2)


def test_llama_config_defaults_are_transformers_defaults():
    """A config.json that leaves fields out means transformers' LlamaConfig defaults (untied output
    embeddings, rms_norm_eps 1e-6, rope_theta 10000, as many key/value heads as heads)."""
    d = _hf_llama()
    for key in ("tie_word_embeddings", "rms_norm_eps", "rope_parameters", "rope_theta", "num_key_value_heads",
                "head_dim", "attention_bias", "mlp_bias", "hidden_act"):
        d.pop(key, None)
    ours, theirs = config_from_hf(d), T.LlamaConfig(**d)
    assert (ours.tie_word_embeddings, ours.layer_norm_eps, ours.rope_theta, ours.num_kv_heads, ours.head_dim,
            ours.linear_bias) == (theirs.tie_word_embeddings, theirs.rms_norm_eps,
                                  theirs.rope_parameters["rope_theta"], theirs.num_key_value_heads,
                                  theirs.head_dim, theirs.attention_bias)


def _hf_llama(**changes) -> dict:
    return {**T.LlamaConfig(**BASE, num_attention_heads=4).to_dict(), "architectures": ["LlamaForCausalLM"],
            **changes}


@pytest.mark.parametrize("changes,message", [
    ({"model_type": "mistral"}, "config.json: model_type 'mistral' is not supported (supported: bert, roberta, "
                                "gpt2, llama)"),
    ({"num_key_value_heads": 3}, "config.json: num_key_value_heads 3 must divide num_attention_heads 4"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
     "config.json: rope_type 'llama3' is not supported (expected 'default')"),
    ({"hidden_act": "gelu"}, "config.json: hidden_act='gelu' is not supported (expected 'silu')"),
    ({"attention_bias": True}, "config.json: mlp_bias=False must equal attention_bias=True"),
    ({"num_hidden_layers": None, "n_layer": 2}, "config.json: "),
])
def test_bad_llama_config_is_a_one_line_error(changes, message):
    d = _hf_llama(**changes)
    if d.get("num_hidden_layers") is None:
        del d["num_hidden_layers"]
        message = "config.json: missing field 'num_hidden_layers' for model_type 'llama'"
    with pytest.raises(ConfigError) as e:
        config_from_hf(d, "config.json")
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize("fields,message", [
    (dict(num_heads=4, num_kv_heads=3), "num_kv_heads 3 must divide num_heads 4"),
    (dict(num_heads=4, num_kv_heads=0), "num_kv_heads 0 must divide num_heads 4"),
    (dict(norm="layer_norm"), "norm 'layer_norm' is not one of ['layernorm', 'rmsnorm']"),
    (dict(head_dim=7), "head_dim 7 must be even for rotary positions"),
])
def test_bad_model_config_names_the_field(fields, message):
    with pytest.raises(ConfigError) as e:
        ModelConfig(**{**LLAMA_SMALL, **fields})
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_rotation_runs_in_the_compute_dtype_under_bf16_autocast(pair, packed, monkeypatch):
    """Under bf16 autocast the rotary tables are bf16, as the queries and keys they rotate: fp32
    tables would promote every rotated head to fp32 and cast it back (three casts a layer, per
    decode step), and the logits still follow the fp32 model closely."""
    from lmforge.kernels import rotary
    from lmforge.models import layers

    from lmforge.kernels.calibrate import CHOICES

    _, _, ours = pair
    seen = []
    real = rotary.rotate
    spy = lambda x, cos, sin: seen.append((x.dtype, cos.dtype)) or real(x, cos, sin)   # noqa: E731
    monkeypatch.setattr(layers, "rotate", spy)    # the padded path
    monkeypatch.setattr(rotary, "rotate", spy)    # the packed stream's (rotary.rotate_stream)
    # the plain rotation is what this test watches (at inference the compiled rotate_store may take it)
    monkeypatch.setenv("LMFORGE_KERNELS", "rotate_store=plain")
    CHOICES.reset()
    ids, mask = batch(B=3, T_=7)
    with torch.no_grad():
        want = ours(ids, attention_mask=mask).logits
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if packed:
                stream, p = pack_padded(ids, mask)
                out = ours(stream, packed=p).logits
                got = torch.zeros_like(want).masked_scatter(mask.bool()[..., None], out.float())
            else:
                got = ours(ids, attention_mask=mask).logits.float()
    CHOICES.reset()
    assert seen and all(d == (torch.bfloat16, torch.bfloat16) for d in seen), seen
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], atol=0.1, rtol=0.05)
