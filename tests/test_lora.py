"""LoRA: starts from the base model, merges and unmerges exactly, mixes adapters in one batch."""

import pytest
import torch

from lmforge.adapters.lora import LoraConfig
from lmforge.adapters.manager import (add_adapter, adapters, classify_mixed, delete_adapter, lora_layers,
                                      mark_trainable, merge, mixed_batch, unmerge)
from lmforge.errors import ConfigError
from lmforge.models import Model, ModelConfig

KINDS = {
    "bert": ModelConfig(model_type="bert", vocab_size=60, hidden_size=32, num_layers=2, num_heads=4,
                        intermediate_size=48, max_position_embeddings=32, head="classification", num_labels=3),
    "roberta": ModelConfig(model_type="roberta", vocab_size=60, hidden_size=32, num_layers=2, num_heads=4,
                           intermediate_size=48, max_position_embeddings=40, pad_token_id=1,
                           head="classification", num_labels=3),
    "gpt2": ModelConfig(model_type="gpt2", vocab_size=60, hidden_size=32, num_layers=2, num_heads=4,
                        intermediate_size=48, max_position_embeddings=32, pad_token_id=0, head="causal-lm",
                        layer_norm_eps=1e-5),
}


def model_of(kind, seed=0):
    torch.manual_seed(seed)
    return Model(KINDS[kind].replace(hidden_dropout=0.0, attention_dropout=0.0)).eval()


def randomize(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            if name in layer.lora_B:
                layer.lora_B[name].weight.copy_(torch.randn(layer.lora_B[name].weight.shape, generator=g) * 0.5)
        if name in model.adapter_heads:
            for p in model.adapter_heads[name].parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def batch(n=6, T=9):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 60, (n, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[3, 4:] = 0
    return ids, mask


@pytest.mark.parametrize("kind", list(KINDS))
def test_new_adapter_is_the_base_model_and_merge_roundtrip(kind):
    model = model_of(kind)
    ids, mask = batch()
    base = model(ids, mask).hidden_states
    add_adapter(model, "a", LoraConfig(r=4, alpha=8, target_modules=("query", "value", "output")))
    torch.testing.assert_close(model(ids, mask, adapters="a").hidden_states, base, atol=0, rtol=0)
    randomize(model, "a", 0)
    adapted = model(ids, mask, adapters="a").hidden_states
    assert (adapted - base).abs().max() > 1e-2
    torch.testing.assert_close(model(ids, mask).hidden_states, base, atol=0, rtol=0)  # no adapter named: base
    weights = {n: m.base.weight.clone() for n, m in lora_layers(model).items()}
    merge(model, "a")
    merge(model, "a")  # idempotent
    # merged: the weights carry the adapter (a routing naming it adds nothing more)
    torch.testing.assert_close(model(ids, mask).hidden_states, adapted, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(ids, mask, adapters="a").hidden_states, adapted, atol=1e-5, rtol=1e-5)
    unmerge(model)
    unmerge(model)
    for n, m in lora_layers(model).items():
        torch.testing.assert_close(m.base.weight, weights[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(model(ids, mask, adapters="a").hidden_states, adapted, atol=1e-5, rtol=1e-5)
    # train()/eval() never merge or unmerge
    merge(model, "a")
    model.train()
    model.eval()
    assert all(m.merged == ["a"] for m in lora_layers(model).values())


def test_merge_refuses_nan():
    model = model_of("bert")
    add_adapter(model, "a", LoraConfig())
    layer = next(iter(lora_layers(model).values()))
    with torch.no_grad():
        layer.lora_B["a"].weight.fill_(float("inf"))
        layer.lora_A["a"].weight.fill_(1.0)
    before = layer.base.weight.clone()
    with pytest.raises(ConfigError, match="NaN/Inf"):
        merge(model, "a")
    assert torch.equal(layer.base.weight, before)


@pytest.mark.parametrize("kind", list(KINDS))
@torch.no_grad()
def test_mixed_batch_equals_each_adapter_alone(kind):
    model = model_of(kind)
    for i, (name, r, targets) in enumerate([("a", 4, ("query", "value")), ("b", 8, ("query", "key", "output")),
                                            ("c", 2, ("value", "intermediate"))]):
        add_adapter(model, name, LoraConfig(r=r, alpha=2 * r, target_modules=targets))
        randomize(model, name, i + 10)
    ids, mask = batch()
    names = ["a", "b", None, "c", "a", "b"]
    with mixed_batch(model, names):
        mixed = model.transformer(ids, mask)
    via_forward = model(ids, mask, adapters=names).hidden_states
    for i, name in enumerate(names):
        alone = model(ids[i:i + 1], mask[i:i + 1], adapters=name).hidden_states
        keep = mask[i].bool()
        torch.testing.assert_close(mixed[i][keep], alone[0][keep], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(via_forward[i][keep], alone[0][keep], atol=1e-5, rtol=1e-5)
    if kind != "gpt2":
        logits = classify_mixed(model, ids, mask, None, names)
        for i, name in enumerate(names):
            want = model(ids[i:i + 1], mask[i:i + 1], adapters=name).logits[0]
            torch.testing.assert_close(logits[i], want, atol=1e-5, rtol=1e-5)


def test_adapter_management_errors_and_delete():
    model = model_of("bert")
    with pytest.raises(ConfigError, match="LoRA target 'query_proj' matched no module"):
        add_adapter(model, "x", LoraConfig(target_modules=("query", "query_proj")))
    add_adapter(model, "a", LoraConfig())
    with pytest.raises(ConfigError, match="already exists"):
        add_adapter(model, "a", LoraConfig())
    ids, mask = batch()
    with pytest.raises(ConfigError, match=r"no adapter named 'zz' \(loaded: a\)"):
        model(ids, mask, adapters="zz")
    with pytest.raises(ConfigError, match=r"no adapter named 'zz' \(loaded: a\)"):
        model(ids, mask, adapters=["a", "zz", None, None, None, None])
    with pytest.raises(ConfigError, match="no adapter named 'zz'"):
        with mixed_batch(model, ["a", "zz"]):
            pass
    delete_adapter(model, "a")
    assert adapters(model) == {} and all(not m.lora_A for m in lora_layers(model).values())


def test_only_the_adapter_and_its_head_train():
    model = model_of("bert")
    add_adapter(model, "a", LoraConfig(r=8, target_modules=("query", "value")))
    mark_trainable(model, "a")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A.a." in n or ".lora_B.a." in n or n.startswith("adapter_heads.a.")
                             for n in trainable)
    assert any(n.startswith("adapter_heads.a.") for n in trainable)


ROBERTA = {"base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
           "large": dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096)}


@pytest.mark.parametrize("size,want", [("base", 294_912), ("large", 786_432)])
def test_table2_lora_parameter_counts(size, want):
    """LoRA r=8 on W_q, W_v: 0.3M (RoBERTa-base) and 0.8M (RoBERTa-large), as in the paper's Table 2."""
    cfg = ModelConfig(model_type="roberta", vocab_size=50265, max_position_embeddings=514, pad_token_id=1,
                      type_vocab_size=1, **ROBERTA[size])
    with torch.device("meta"):
        model = Model(cfg)
        add_adapter(model, "t", LoraConfig(r=8, target_modules=("query", "value")), head=False)
    mark_trainable(model, "t")
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n == want and round(n / 1e6, 1) == {"base": 0.3, "large": 0.8}[size]


@torch.no_grad()
def test_merged_export_is_a_plain_model_with_the_same_outputs(tmp_path):
    import transformers as T

    from lmforge.adapters.manager import merged_model
    from lmforge.models import from_pretrained, save_pretrained

    model = model_of("bert")
    add_adapter(model, "a", LoraConfig(r=4, target_modules=("query", "value", "intermediate")))
    randomize(model, "a", 3)
    ids, mask = batch()
    want = model(ids, mask, adapters="a").logits
    plain = merged_model(model, "a")
    assert not any(".lora_" in k for k in plain.state_dict())
    torch.testing.assert_close(plain(ids, mask).logits, want, atol=1e-5, rtol=1e-5)
    assert all(not m.merged for m in lora_layers(model).values())  # the source stays unmerged
    save_pretrained(plain, tmp_path)
    hf = T.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(hf(input_ids=ids, attention_mask=mask).logits, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size,want", [("base", 0.1)])
def test_table2_bitfit_parameter_count(size, want):
    """BitFit trains the biases only: 0.1M on RoBERTa-base, as in the paper's Table 2."""
    from lmforge.adapters.methods import MethodConfig, apply_method

    cfg = ModelConfig(model_type="roberta", vocab_size=50265, max_position_embeddings=514, pad_token_id=1,
                      type_vocab_size=1, **ROBERTA[size])
    with torch.device("meta"):
        model = Model(cfg)
    apply_method(model, MethodConfig(method="bitfit"))
    n = sum(p.numel() for p in model.transformer.parameters() if p.requires_grad)
    assert round(n / 1e6, 1) == want, n


@torch.no_grad()
def test_adapter_added_to_an_eval_model_does_not_drop_out():
    torch.manual_seed(0)
    model = Model(KINDS["bert"]).eval()     # dropout 0.1 in the config; eval() turns it off
    add_adapter(model, "a", LoraConfig(r=4, alpha=8, dropout=0.5))
    randomize(model, "a", 3)
    ids, mask = batch()
    assert not model.adapter_heads["a"].training
    assert all(not layer.lora_dropout["a"].training for layer in lora_layers(model).values())
    torch.testing.assert_close(model(ids, mask, adapters="a").logits, model(ids, mask, adapters="a").logits,
                               atol=0, rtol=0)
    model.train()
    add_adapter(model, "b", LoraConfig(r=4, alpha=8, dropout=0.5))
    assert model.adapter_heads["b"].training  # and a training model's new adapter trains
