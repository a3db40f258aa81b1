"""Every adaptation method: what trains, that it starts from the base model, Table 2 counts, and
the saved run rebuilds the same model."""

import pytest
import torch

from lmforge.adapters.delta import load_delta, save_delta
from lmforge.adapters.methods import METHODS, MethodConfig, apply_method
from lmforge.errors import ConfigError
from lmforge.models import Model, ModelConfig, save_pretrained

TINY = ModelConfig(vocab_size=60, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
                   max_position_embeddings=32, head="classification", num_labels=2,
                   id2label={0: "neg", 1: "pos"}, hidden_dropout=0.0, attention_dropout=0.0)
IDS = torch.randint(2, 60, (3, 8), generator=torch.Generator().manual_seed(0))


def fresh(seed=0):
    torch.manual_seed(seed)
    return Model(TINY).eval()


# method -> predicate on parameter names that must train (and nothing else in the trunk)
TRAINS = {
    "full": lambda n: True,
    "freeze": lambda n: n.startswith(("transformer.layers.1.", "transformer.pooler", "head.")),
    "features": lambda n: n.startswith("head."),
    "bitfit": lambda n: n.endswith("bias") or n.startswith("head."),
    "lora": lambda n: ".lora_" in n or n.startswith("adapter_heads.default."),   # its own head, not the base's
    "adapter-houlsby": lambda n: ".adapters." in n or n.startswith("head."),
    "adapter-pfeiffer": lambda n: ".adapters." in n or n.startswith("head."),
    "adapter-l": lambda n: (".adapters." in n and ".attention." not in n) or n.startswith("head."),
    "prefix-embedding": lambda n: ".input_prefix." in n or n.startswith("head."),
    "prefix-layer": lambda n: ".kv_prefix." in n or n.startswith("head."),
}


@pytest.mark.parametrize("method", METHODS)
@torch.no_grad()
def test_what_trains_and_start_from_base(method):
    model = fresh()
    before = model(IDS).logits
    spec = apply_method(model, MethodConfig(method=method, freeze_layers=1, adapter_size=4, prefix_length=3))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(TRAINS[method](n) for n in names), sorted(names)[:5]
    if method.startswith("prefix-"):  # prefixes change attention from the first step: no identity start
        n = sum(p.numel() for p in model.transformer.parameters() if p.requires_grad)
        assert n == 3 * 32 * (1 if method == "prefix-embedding" else 2 * 2)  # P d, or L 2 P d
        assert not torch.allclose(model(IDS, adapters=spec.adapter).logits, before)
        return
    if method == "adapter-houlsby":
        assert sum(".attention.output.adapters." in n for n in names) == 2 * 4  # down/up w+b, 2 layers
    if method == "adapter-pfeiffer":
        assert not any(".attention.output.adapters." in n for n in names)
    if method == "lora":   # it runs routed to its adapter, whose head starts as a copy of the base head
        assert spec.adapter == "default" and spec.mixable and spec.servable
    torch.testing.assert_close(model(IDS, adapters=spec.adapter).logits, before, atol=1e-6, rtol=0)  # identity


def test_unknown_method():
    with pytest.raises(ConfigError, match="--method 'prefix-magic' is not one of"):
        MethodConfig(method="prefix-magic")


ROBERTA = dict(model_type="roberta", vocab_size=50265, max_position_embeddings=514, pad_token_id=1,
               type_vocab_size=1)
SIZES = {"base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
         "large": dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096)}


@pytest.mark.parametrize("method,size,bottleneck,paper", [
    ("adapter-pfeiffer", "large", 16, 0.8e6), ("adapter-pfeiffer", "large", 64, 3.0e6),
    ("adapter-houlsby", "large", 8, 0.8e6), ("adapter-houlsby", "large", 64, 6.0e6),
])
def test_table2_adapter_parameter_counts(method, size, bottleneck, paper):
    """The adapter rows of the LoRA paper's Table 2, for the bottleneck sizes that give them.
    The paper rounds (and some rows came from other papers' counts): within 6%."""
    with torch.device("meta"):
        model = Model(ModelConfig(**ROBERTA, **SIZES[size]))
        apply_method(model, MethodConfig(method=method, adapter_size=bottleneck))
    n = sum(p.numel() for p in model.transformer.parameters() if p.requires_grad)
    assert abs(n - paper) / paper < 0.06, n


@pytest.mark.parametrize("method", ["bitfit", "adapter-houlsby", "adapter-pfeiffer", "adapter-l", "prefix-embedding",
                                    "prefix-layer"])
@torch.no_grad()
def test_delta_run_roundtrip(tmp_path, method):
    save_pretrained(fresh(), tmp_path / "base")
    from lmforge.models import from_pretrained
    model = from_pretrained(tmp_path / "base").eval()
    m = MethodConfig(method=method, adapter_size=4)
    spec = apply_method(model, m)
    base = model(IDS, adapters=None).logits
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn_like(p) * 0.1)
    want = model(IDS, adapters=spec.adapter).logits   # what the run routes to (bitfit: the model itself)
    assert (want - base).abs().max() > 1e-4
    save_delta(model, tmp_path / "run", m, base_model=str(tmp_path / "base"))
    size = sum(f.stat().st_size for f in (tmp_path / "run").iterdir())
    assert size < (tmp_path / "base" / "model.safetensors").stat().st_size
    again = load_delta(tmp_path / "run")
    assert again.config.labels == ["neg", "pos"]
    torch.testing.assert_close(again(IDS, adapters=spec.adapter).logits, want, atol=1e-6, rtol=0)
