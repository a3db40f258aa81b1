"""Architectures are configuration: presets are data over one model definition, every recipe field
round-trips through a checkpoint, the layouts transformers has load there with equal logits, and a
variant it lacks (Cramming's) says so and round-trips through lmforge."""

import dataclasses
import json

import pytest
import torch
import transformers as T

from lmforge.errors import ConfigError
from lmforge.models import Model, ModelConfig, from_pretrained, save_pretrained
from lmforge.models.hf import variant_features
from lmforge.models.presets import ARCHS, SIZES, config_from_file, preset

V = 97
SMALL = dict(vocab_size=V, hidden_size=32, num_heads=2, intermediate_size=48, max_position_embeddings=40)

# arch -> the recipe it must resolve to
RECIPES = {
    "bert": dict(model_type="bert", pre_norm=False, embedding_norm=True, final_norm=False, linear_bias=True,
                 ffn="mlp", position_embedding="learned", tie_word_embeddings=True, type_vocab_size=2),
    "roberta": dict(model_type="roberta", pre_norm=False, embedding_norm=True, final_norm=False, linear_bias=True,
                    ffn="mlp", position_embedding="learned", type_vocab_size=1, pad_token_id=1),
    "gpt2": dict(model_type="gpt2", pre_norm=True, embedding_norm=False, final_norm=True, linear_bias=True,
                 ffn="mlp", position_embedding="learned", type_vocab_size=0, hidden_act="gelu_new"),
    "cramming": dict(model_type="bert", pre_norm=True, embedding_norm=True, final_norm=True, linear_bias=False,
                     ffn="glu", position_embedding="scaled-sinusoidal", hidden_dropout=0.0, attention_dropout=0.0),
    "llama": dict(model_type="llama", pre_norm=True, embedding_norm=False, final_norm=True, linear_bias=False,
                  ffn="glu", hidden_act="silu", position_embedding="rope", norm="rmsnorm", type_vocab_size=0),
    "transformer": dict(model_type="encoder-decoder", pre_norm=False, embedding_norm=False, final_norm=False,
                        linear_bias=True, ffn="mlp", hidden_act="relu", position_embedding="sinusoidal",
                        type_vocab_size=0, hidden_dropout=0.1, attention_dropout=0.0),
}
DIMS = {"tiny": (2, 128, 2, 512), "mini": (4, 256, 4, 1024), "small": (4, 512, 8, 2048), "base": (12, 768, 12, 3072)}


@pytest.mark.parametrize("arch", list(RECIPES))
@pytest.mark.parametrize("size", list(DIMS))
def test_presets_are_recipes_times_sizes(arch, size):
    c = preset(arch, size)
    assert {k: getattr(c, k) for k in RECIPES[arch]} == RECIPES[arch]
    assert (c.num_layers, c.hidden_size, c.num_heads, c.intermediate_size) == DIMS[size]
    assert set(ARCHS) == set(RECIPES) and set(SIZES) == set(DIMS)
    # transformers has all but Cramming's and the encoder-decoder (saved with lmforge's names)
    assert bool(variant_features(c)) == (arch in ("cramming", "transformer"))


def test_preset_refusals():
    with pytest.raises(ConfigError, match="--arch 't5' is not one of bert, roberta, gpt2, cramming, llama, transformer"):
        preset("t5", "tiny")
    with pytest.raises(ConfigError, match="--size 'huge' is not one of tiny, mini, small, base"):
        preset("bert", "huge")


@pytest.mark.parametrize("content,error", [
    ('{"arch": "cramming", "size": "tiny", "hidden_sise": 64}', r"unknown field 'hidden_sise'"),
    ('{"ffn": "swiglu"}', r"ffn 'swiglu' is not one of \['mlp', 'glu'\]"),
    ('{"pre_norm": "yes"}', r"field 'pre_norm' must be bool, got 'yes'"),
    ('{"num_layers": 2.5}', r"field 'num_layers' must be int, got 2.5"),
    ('{"position_embedding": "rotary"}', r"position_embedding 'rotary' is not one of"),
    ('{"arch": "t5"}', r"arch 't5' is not one of"),
    ('[1, 2]', r"expected a JSON object of model settings, got list"),
    ('{"num_layers": 2,}', r"invalid JSON at line 1, column 18"),
])
def test_config_file_errors_name_the_file_and_field(tmp_path, content, error):
    f = tmp_path / "model.json"
    f.write_text(content)
    with pytest.raises(ConfigError, match=rf"^{f}: .*{error}"):
        config_from_file(f)


def test_config_file_starts_from_a_preset(tmp_path):
    f = tmp_path / "m.json"
    f.write_text(json.dumps({"arch": "cramming", "size": "tiny", "num_layers": 3, "linear_bias": True}))
    c = config_from_file(f, vocab_size=V)
    assert (c.num_layers, c.hidden_size, c.linear_bias, c.ffn, c.vocab_size) == (3, 128, True, "glu", V)


# every recipe field, set away from what model_type implies, alone
FIELDS = [("pre_norm", True), ("embedding_norm", False), ("final_norm", True), ("linear_bias", False),
          ("ffn", "glu"), ("position_embedding", "sinusoidal"), ("position_embedding", "scaled-sinusoidal"),
          ("tie_word_embeddings", False), ("norm", "rmsnorm"), ("position_embedding", "rope"), ("num_kv_heads", 1)]


@pytest.mark.parametrize("name,value", FIELDS, ids=[f"{n}={v}" for n, v in FIELDS])
def test_every_recipe_field_round_trips_and_changes_the_model(tmp_path, name, value):
    base = ModelConfig(**SMALL, num_layers=2, head="mlm", hidden_dropout=0.0, attention_dropout=0.0)
    config = base.replace(**{name: value})
    torch.manual_seed(0)
    model = Model(config).eval()
    ids = torch.randint(5, V, (2, 11), generator=torch.Generator().manual_seed(1))
    logits = model(ids).logits
    save_pretrained(model, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    back = from_pretrained(tmp_path / "m").eval()
    assert getattr(back.config, name) == value and back.config == config
    assert torch.equal(back(ids).logits, logits)
    # the field is not decoration: the same weights under the default recipe compute something else
    # (or the parameters differ)
    torch.manual_seed(0)
    plain = Model(base).eval()
    shapes = {k: v.shape for k, v in plain.state_dict().items()}
    if shapes == {k: v.shape for k, v in model.state_dict().items()}:
        plain.load_state_dict(model.state_dict())
        assert not torch.allclose(plain(ids).logits, logits, atol=1e-4)
    if name == "tie_word_embeddings":   # transformers has untied BERT: a plain BERT checkpoint
        assert saved["model_type"] == "bert" and "cls.predictions.decoder.weight" in _keys(tmp_path / "m")
    else:
        assert saved["model_type"] == "lmforge" and saved["lmforge_config"][name] == value


def _keys(d):
    from safetensors import safe_open
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def test_recipe_fields_shape_the_modules():
    c = preset("cramming", "tiny", **SMALL)
    m = Model(c.replace(head="mlm"))
    block = m.transformer.layers[0]
    assert block.intermediate.weight.shape == (2 * 48, 32) and block.output.weight.shape == (32, 48)
    assert all(lin.bias is None for lin in (block.attention.query, block.attention.key, block.attention.value,
                                            block.attention.output, block.intermediate, block.output))
    pos = m.transformer.embeddings.position_embeddings
    assert not any("table" in k for k in m.state_dict())           # fixed sinusoids are never saved
    assert torch.allclose(pos.table[0, 0::2], torch.zeros(16)) and torch.allclose(pos.table[0, 1::2], torch.ones(16))
    assert float(pos.scale.detach()) == pytest.approx(32 ** -0.5)
    assert m.transformer.final_norm is not None and m.transformer.embeddings.norm is not None
    # the formulas: sin/cos at wavelengths 10000^(2i/D); the gated FFN is out(gelu(gate x) * (up x))
    p, i = 7, torch.arange(16)
    assert torch.allclose(pos.table[p, 0::2], torch.sin(p / 10000 ** (2 * i / 32)), atol=1e-6)
    assert torch.allclose(pos.table[p, 1::2], torch.cos(p / 10000 ** (2 * i / 32)), atol=1e-6)
    x = torch.randn(5, 32)
    gate, up = block.intermediate.weight[:48], block.intermediate.weight[48:]
    want = (torch.nn.functional.gelu(x @ gate.T) * (x @ up.T)) @ block.output.weight.T
    assert torch.allclose(block.ffn(x), want, atol=1e-5)
    m.eval()
    with torch.no_grad():   # the inference path (fused kernels) computes the same
        assert torch.allclose(block.ffn_residual(x, x), x + want, atol=1e-5)


# (arch, head, transformers class): what a pre-training run of that layout saves
HF_LAYOUTS = [("bert", "pretraining", "BertForPreTraining"), ("bert", "mlm", "BertForMaskedLM"),
              ("roberta", "mlm", "RobertaForMaskedLM"), ("gpt2", "causal-lm", "GPT2LMHeadModel"),
              ("bert", "mlm-untied", "BertForMaskedLM"), ("llama", "causal-lm", "LlamaForCausalLM"),
              ("llama", "causal-lm-untied", "LlamaForCausalLM")]


@pytest.mark.parametrize("arch,head,cls", HF_LAYOUTS, ids=[f"{a}-{h}" for a, h, _ in HF_LAYOUTS])
def test_pretraining_layouts_load_in_transformers_with_equal_logits(tmp_path, arch, head, cls):
    extra = {"tie_word_embeddings": False} if head.endswith("untied") else {}
    torch.manual_seed(0)
    model = Model(preset(arch, "tiny", **SMALL, head=head.removesuffix("-untied"), **extra)).eval()
    with torch.no_grad():   # random everything: a swapped bias or LayerNorm cannot hide
        for p in model.parameters():
            p.normal_(0, 0.2)
    save_pretrained(model, tmp_path / "m")
    theirs = getattr(T, cls).from_pretrained(tmp_path / "m").eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(5, V, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    ids[mask == 0] = model.config.pad_token_id
    ours = model(ids, mask)
    with torch.no_grad():
        out = theirs(input_ids=ids, attention_mask=mask)
    keep = mask.bool()
    logits = out.prediction_logits if cls == "BertForPreTraining" else out.logits
    assert torch.allclose(ours.logits[keep], logits[keep], atol=1e-4)
    if cls == "BertForPreTraining":
        assert torch.allclose(ours.nsp_logits, out.seq_relationship_logits, atol=1e-4)


def test_a_variant_says_so_and_round_trips_through_lmforge_only(tmp_path):
    torch.manual_seed(0)
    model = Model(preset("cramming", "tiny", **SMALL, head="pretraining")).eval()
    save_pretrained(model, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["model_type"] == "lmforge"
    for what in ("pre-LayerNorm", "no linear biases", "gated (glu)", "scaled-sinusoidal positions"):
        assert what in saved["lmforge_note"]
    with pytest.raises(ValueError):
        T.AutoConfig.from_pretrained(tmp_path / "m")   # refused, not loaded as something else
    back = from_pretrained(tmp_path / "m").eval()
    ids = torch.randint(5, V, (2, 9))
    assert torch.equal(back(ids).logits, model(ids).logits)
    # fine-tuning starts from it: the trunk is kept, a fresh classification head is made
    clf = from_pretrained(tmp_path / "m", head="classification", num_labels=3)
    trunk = {k: v for k, v in model.state_dict().items() if k.startswith("transformer.")}
    assert all(torch.equal(clf.state_dict()[k], v) for k, v in trunk.items())
    assert clf(ids).logits.shape == (2, 3)


def test_existing_configs_resolve_to_what_their_model_type_had():
    # checkpoints from before the recipe fields: config.json has none of them
    for mt, pre in (("bert", False), ("roberta", False), ("gpt2", True)):
        c = ModelConfig(model_type=mt, head="causal-lm" if mt == "gpt2" else None)
        assert (c.pre_norm, c.embedding_norm, c.final_norm) == (pre, not pre, pre)
        assert not variant_features(c)
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    assert {"pre_norm", "embedding_norm", "final_norm", "linear_bias", "ffn", "position_embedding"} <= names
