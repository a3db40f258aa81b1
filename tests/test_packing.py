"""Unpadded (packed) execution gives the padded path's outputs and gradients: every architecture and
head, every adaptation method, mixed-adapter batches; and token-budget batching covers every example
exactly once per epoch in a seed-determined order."""

import pytest
import torch

from lmforge.adapters.lora import LoraConfig
from lmforge.adapters.manager import add_adapter, classify_mixed
from lmforge.models import routing
from lmforge.adapters.methods import MethodConfig, apply_method
from lmforge.data.batches import Encoded, collate, collate_packed, model_inputs, token_budget_batches
from lmforge.models import Model, ModelConfig
from lmforge.models.packing import Packed, pack_padded

V = 60


def tiny(model_type="bert", head="classification", **kw):
    extra = {"roberta": dict(pad_token_id=1, type_vocab_size=1), "gpt2": dict(type_vocab_size=0)}
    return ModelConfig(model_type=model_type, vocab_size=V, hidden_size=32, num_layers=2, num_heads=4,
                       intermediate_size=48, max_position_embeddings=40, head=head, num_labels=3,
                       hidden_dropout=0.0, attention_dropout=0.0, **extra.get(model_type, {}), **kw)


def random_model(config, seed=0):
    torch.manual_seed(seed)
    model = Model(config)
    with torch.no_grad():  # everything random, so a mix-up of rows or positions cannot hide
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def items(lengths, seed=1, pair_at=None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(3, V, (n,), generator=g).tolist()
        types = [0] * n if pair_at is None else [0] * min(pair_at, n) + [1] * max(0, n - pair_at)
        out.append(Encoded(ids, types, i % 3))
    return out


LENGTHS = [7, 3, 11, 1, 5]


def both(model, lengths=LENGTHS, pad_id=0, **kw):
    """(padded output, packed output, padded mask) for the same examples."""
    ex = items(lengths, pair_at=2 if model.config.type_vocab_size > 1 else None)
    padded = collate(ex, pad_id)
    return model(**model_inputs(padded), **kw), model(**model_inputs(collate_packed(ex)), **kw), \
        padded["attention_mask"].bool()


def token_rows(x, mask):
    return x[mask]  # [B, T, ...] -> [N, ...] in stream order (row-major over the batch)


CASES = [("bert", None), ("bert", "mlm"), ("bert", "pretraining"), ("bert", "nsp"), ("bert", "classification"),
         ("bert", "token-classification"), ("bert", "scalar"), ("roberta", "mlm"), ("roberta", "classification"),
         ("gpt2", None), ("gpt2", "causal-lm"), ("gpt2", "classification"), ("gpt2", "scalar")]


@pytest.mark.parametrize("model_type,head", CASES)
def test_packed_equals_padded_outputs_and_gradients(model_type, head):
    torch.manual_seed(0)
    pad = 1 if model_type == "roberta" else 0
    model = random_model(tiny(model_type, head))
    a, b, mask = both(model, pad_id=pad)
    torch.testing.assert_close(token_rows(a.hidden_states, mask), b.hidden_states, atol=1e-5, rtol=1e-5)
    sequence_level = head in ("classification", "nsp") or (head == "scalar")
    if head is None:
        out_a, out_b = token_rows(a.hidden_states, mask), b.hidden_states
    elif sequence_level:
        out_a, out_b = a.logits, b.logits
    else:
        out_a, out_b = token_rows(a.logits, mask), b.logits
    torch.testing.assert_close(out_a, out_b, atol=1e-5, rtol=1e-5)
    if head == "pretraining":
        torch.testing.assert_close(a.nsp_logits, b.nsp_logits, atol=1e-5, rtol=1e-5)
    # gradients of every parameter agree
    w = torch.randn_like(out_a)
    grads = []
    for out in (out_a, out_b):
        model.zero_grad()
        (out * w).sum().backward(retain_graph=True)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-4, rtol=1e-4, msg=n)


METHODS = ["full", "bitfit", "lora", "adapter-houlsby", "adapter-pfeiffer", "prefix-embedding", "prefix-layer"]


@pytest.mark.parametrize("model_type", ["bert", "gpt2"])
@pytest.mark.parametrize("method", METHODS)
def test_packed_equals_padded_for_every_method(method, model_type):
    model = random_model(tiny(model_type))
    spec = apply_method(model, MethodConfig(method=method, adapter_size=4, lora_r=4, lora_dropout=0.0,
                                            prefix_length=3))
    with torch.no_grad():  # adapters start as the identity; make them do something
        for n, p in model.named_parameters():
            if ".lora_B" in n or ".adapters." in n:
                p.normal_(0, 0.3)
    with routing.using(spec.adapter):   # the adapter the method trains (LoRA's), as a run routes to it
        a, b, _ = both(model)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    grads = []
    for out in (a.logits, b.logits):
        model.zero_grad()
        out.square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-4, rtol=1e-4, msg=n)


MANY = [7, 3, 11, 1, 5, 9, 2, 14, 6, 6, 13, 4, 8, 12, 10, 3, 5, 1, 9, 2]  # 20 sequences: 3 length buckets


@pytest.mark.parametrize("model_type,method", [("bert", "full"), ("gpt2", "full"), ("bert", "prefix-layer"),
                                               ("gpt2", "prefix-layer")])
def test_length_buckets_in_attention_equal_padded(model_type, method):
    model = random_model(tiny(model_type, "token-classification"))
    adapter = apply_method(model, MethodConfig(method=method, prefix_length=3)).adapter   # routing name
    if adapter is not None:   # a prefix that starts at zero would change nothing
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "prefix" in n:
                    p.normal_(0, 0.5)
    ex = items(MANY)
    b = collate_packed(ex)
    packed = Packed(b["cu_seqlens"], b["max_len"])
    assert len(packed.groups) == 3 and sorted(torch.cat([g.seqs for g in packed.groups]).tolist()) == list(range(20))
    assert packed.attn_rows < len(MANY) * max(MANY)  # less padding than one padded batch
    padded = collate(ex, 0)
    a = model(**model_inputs(padded), adapters=adapter).logits[padded["attention_mask"].bool()]
    torch.testing.assert_close(model(**model_inputs(b), adapters=adapter).logits, a, atol=1e-5, rtol=1e-5)
    if adapter is not None:   # the prefix took part
        base = model(**model_inputs(padded)).logits[padded["attention_mask"].bool()]
        assert not torch.allclose(base, a, atol=1e-3)


@torch.no_grad()
def test_packed_mixed_adapter_batch_equals_each_adapter_alone():
    model = random_model(tiny()).eval()
    add_adapter(model, "a", LoraConfig(r=4, alpha=8))
    add_adapter(model, "b", LoraConfig(r=2, alpha=2, target_modules=("query", "value", "output")))
    for n, p in model.named_parameters():
        if ".lora_B" in n or n.startswith("adapter_heads."):
            p.normal_(0, 0.3)
    names = ["a", "b", None, "b", "a"]
    ex = items(LENGTHS)
    b = collate_packed(ex)
    packed = Packed(b["cu_seqlens"], b["max_len"])
    mixed = classify_mixed(model, b["input_ids"], None, b["token_type_ids"], names, packed=packed)
    padded = collate(ex, 0)
    mixed_padded = classify_mixed(model, padded["input_ids"], padded["attention_mask"],
                                  padded["token_type_ids"], names)
    for i, name in enumerate(names):
        alone = model(**model_inputs(collate([ex[i]], 0)), adapters=name).logits[0]
        torch.testing.assert_close(mixed[i], alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mixed_padded[i], alone, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_mlm_head_scores_only_the_given_positions():
    model = random_model(tiny(head="mlm")).eval()
    ex = items(LENGTHS)
    b = collate_packed(ex)
    full = model(**model_inputs(b)).logits                      # [N, V]
    positions = torch.tensor([0, 4, 9, 26])
    part = model(**model_inputs(b), positions=positions).logits  # [4, V]
    torch.testing.assert_close(part, full[positions], atol=1e-6, rtol=0)


def test_pack_padded_and_layout():
    ids = torch.tensor([[5, 6, 7], [8, 0, 0]])
    flat, p = pack_padded(ids, torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert flat.tolist() == [5, 6, 7, 8] and p.cu_seqlens.tolist() == [0, 3, 4] and p.max_len == 3
    assert p.position_ids.tolist() == [0, 1, 2, 0] and p.seq_ids.tolist() == [0, 0, 0, 1]
    assert p.pad(torch.arange(4.0)[:, None]).squeeze(-1).tolist() == [[0, 1, 2], [3, 0, 0]]
    with pytest.raises(ValueError, match="lengths >= 1"):
        Packed.from_lengths([2, 0])


def test_packed_training_matches_padded_training():
    """A few optimizer steps from the same start, with dropout off: the same weights."""
    from lmforge.train.objectives import sequence_classification_loss

    ex = items([9, 4, 13, 2, 6, 8, 3, 12], seed=5)
    finals = []
    for packed in (False, True):
        model = random_model(tiny(), seed=3)
        apply_method(model, MethodConfig(method="lora", lora_r=4, lora_dropout=0.0))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        with routing.using("default"):   # the adapter the LoRA method trains
            for step in range(4):
                batch = ex[step * 2:(step + 1) * 2] + ex[:1]
                loss = sequence_classification_loss(model, collate_packed(batch) if packed else collate(batch, 0))
                loss.backward()
                opt.step()
                opt.zero_grad()
        finals.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    for n in finals[0]:
        torch.testing.assert_close(finals[0][n], finals[1][n], atol=1e-5, rtol=1e-4, msg=n)


def test_token_budget_batches_cover_every_example_once_in_a_seeded_order():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 70, (1000,), generator=g).tolist() + [300]  # one longer than the budget
    plan = token_budget_batches(lengths, 256, seed=4, epoch=0)
    flat = [i for b in plan for i in b]
    assert sorted(flat) == list(range(len(lengths)))                       # each exactly once
    for b in plan:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 256     # the budget holds
    assert plan == token_budget_batches(lengths, 256, seed=4, epoch=0)     # a function of the seed
    assert plan != token_budget_batches(lengths, 256, seed=4, epoch=1)     # a new order each epoch
    assert plan != token_budget_batches(lengths, 256, seed=5, epoch=0)
    # bucketing: far less padding than random batches of the same mean size
    padded = sum(len(b) * max(lengths[i] for i in b) for b in plan)
    assert padded < 1.2 * sum(lengths)
