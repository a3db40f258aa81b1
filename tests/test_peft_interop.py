"""lmforge LoRA adapters load in PEFT and PEFT's load here, heads included; bad adapters are named."""

import json

import peft
import pytest
import torch
import transformers as T

from lmforge.adapters.lora import LoraConfig
from lmforge.adapters.manager import add_adapter, adapters, lora_layers
from lmforge.adapters.peft_format import load_adapter, save_adapter
from lmforge.errors import CheckpointError, ConfigError
from lmforge.models import Model, ModelConfig, from_pretrained, save_pretrained

CFG = {
    "bert": ModelConfig(vocab_size=60, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
                        max_position_embeddings=32, head="classification", num_labels=3,
                        hidden_dropout=0.0, attention_dropout=0.0),
    "roberta": ModelConfig(model_type="roberta", vocab_size=60, hidden_size=32, num_layers=2, num_heads=4,
                           intermediate_size=48, max_position_embeddings=40, pad_token_id=1,
                           head="classification", num_labels=3, hidden_dropout=0.0, attention_dropout=0.0),
}
IDS = torch.randint(3, 60, (3, 7), generator=torch.Generator().manual_seed(0))


def trained_adapter(model, name, targets, r=4):
    add_adapter(model, name, LoraConfig(r=r, alpha=2 * r, target_modules=targets))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            if name in layer.lora_B:
                layer.lora_B[name].weight.copy_(torch.randn(layer.lora_B[name].weight.shape, generator=g))
        for p in model.adapter_heads[name].parameters():
            p.copy_(torch.randn(p.shape, generator=g))


@pytest.fixture
def base(tmp_path):
    def make(kind):
        torch.manual_seed(0)
        m = Model(CFG[kind]).eval()
        save_pretrained(m, tmp_path / f"base-{kind}")
        return tmp_path / f"base-{kind}"
    return make


@pytest.mark.parametrize("kind", list(CFG))
@torch.no_grad()
def test_our_adapter_loads_in_peft_with_its_head(tmp_path, base, kind):
    model = from_pretrained(base(kind)).eval()
    trained_adapter(model, "sst2", ("query", "value", "output"))
    ours = model(IDS, adapters="sst2").logits
    save_adapter(model, "sst2", tmp_path / "adapter")
    ref = peft.PeftModel.from_pretrained(T.AutoModelForSequenceClassification.from_pretrained(base(kind)),
                                         tmp_path / "adapter").eval()
    torch.testing.assert_close(ref(input_ids=IDS).logits, ours, atol=1e-5, rtol=1e-5)
    # and back: a reloaded adapter gives the same logits, head included (not a random one)
    again = from_pretrained(base(kind)).eval()
    load_adapter(again, tmp_path / "adapter", "sst2")
    torch.testing.assert_close(again(IDS, adapters="sst2").logits, ours, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", list(CFG))
@torch.no_grad()
def test_peft_adapter_loads_here(tmp_path, base, kind):
    ref = peft.get_peft_model(T.AutoModelForSequenceClassification.from_pretrained(base(kind)),
                              peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=6,
                                              target_modules=["query", "key", "dense"]))
    for n, p in ref.named_parameters():
        if "lora_B" in n or "modules_to_save" in n:
            p.normal_()
    ref.eval().save_pretrained(tmp_path / "peft")
    model = from_pretrained(base(kind)).eval()
    load_adapter(model, tmp_path / "peft", "p")
    torch.testing.assert_close(model(IDS, adapters="p").logits, ref(input_ids=IDS).logits, atol=1e-5, rtol=1e-5)


def _other_base(tmp_path):
    torch.manual_seed(1)
    m = Model(CFG["bert"].replace(hidden_size=48, intermediate_size=64))
    trained_adapter(m, "x", ("query", "value"))
    save_adapter(m, "x", tmp_path / "other")
    return tmp_path / "other"


def _edit(tmp_path, **changes):
    torch.manual_seed(0)
    m = Model(CFG["bert"])
    trained_adapter(m, "x", ("query", "value"))
    save_adapter(m, "x", tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    cfg.update(changes)
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(cfg))
    return tmp_path / "ad"


def _truncate(tmp_path):
    d = _edit(tmp_path)
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    return d


BAD = [
    ("other base", _other_base, CheckpointError, ["shape [", "expects ["]),
    ("unknown key", lambda p: _edit(p, shiny_new_option=1), ConfigError, ["unknown key 'shiny_new_option'"]),
    ("dora", lambda p: _edit(p, use_dora=True), ConfigError, ["use_dora=True is not supported"]),
    ("not lora", lambda p: _edit(p, peft_type="IA3"), ConfigError, ["peft_type='IA3'"]),
    ("truncated", _truncate, CheckpointError, ["adapter_model.safetensors", "corrupt or truncated"]),
]


@pytest.mark.parametrize("name,make,error,words", BAD, ids=[b[0] for b in BAD])
def test_bad_adapters_are_named_and_leave_nothing_behind(tmp_path, base, name, make, error, words):
    model = from_pretrained(base("bert"))
    with pytest.raises(error) as e:
        load_adapter(model, make(tmp_path), "bad")
    for w in words:
        assert w in str(e.value), str(e.value)
    assert adapters(model) == {}
