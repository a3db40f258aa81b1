"""The adapter a row uses is an argument of the forward pass (models/routing.py): no model state
changes per call, so threads running forward passes on one model at the same time, each with its
own adapters (one for the whole batch, or one per row), get exactly what each gets alone."""

import threading

import pytest
import torch

from lmforge.adapters.lora import LoraConfig
from lmforge.adapters.manager import add_adapter, lora_layers
from lmforge.data.batches import Encoded, collate, collate_packed, model_inputs
from lmforge.errors import ConfigError
from lmforge.models import Model, ModelConfig, routing
from lmforge.models.heads import build_head

CFG = ModelConfig(model_type="bert", vocab_size=80, hidden_size=32, num_layers=2, num_heads=4,
                  intermediate_size=64, max_position_embeddings=64, head="classification", num_labels=2,
                  hidden_dropout=0.0, attention_dropout=0.0)
# name -> (rank, targets, number of labels of its head)
ADAPTERS = {"a": (4, ("query", "value"), 2), "b": (8, ("query", "key", "output"), 3), "c": (2, ("value",), 2)}


def adapted_model():
    torch.manual_seed(0)
    model = Model(CFG).eval()
    for seed, (name, (r, targets, labels)) in enumerate(ADAPTERS.items()):
        head_config = {"num_labels": labels}
        add_adapter(model, name, LoraConfig(r=r, alpha=2 * r, target_modules=targets),
                    head=build_head(CFG.replace(**head_config)), head_config=head_config)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                if name in layer.lora_B:
                    w = layer.lora_B[name].weight
                    w.copy_(torch.randn(w.shape, generator=g) * 0.5)
            for p in model.adapter_heads[name].parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


def examples(n=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 20, (n,), generator=g).tolist()
    return [Encoded(torch.randint(5, 80, (t,), generator=g).tolist(), [0] * t) for t in lengths]


def alone(model, ex, name):
    """Each example in a batch of its own, with its adapter for the whole batch."""
    return model(**model_inputs(collate([ex], 0)), adapters=name).logits[0]


@torch.no_grad()
def test_the_adapter_is_an_argument_and_nothing_stays_behind():
    model = adapted_model()
    ex = examples(4)
    b = model_inputs(collate(ex, 0))
    base = model(**b).logits
    assert routing.current() is routing.BASE
    a = model(**b, adapters="a").logits
    assert (a - base).abs().max() > 1e-2 and routing.current() is routing.BASE   # reset after the call
    torch.testing.assert_close(model(**b).logits, base, atol=0, rtol=0)          # no state was left
    torch.testing.assert_close(model(**b, adapters=None).logits, base, atol=0, rtol=0)
    torch.testing.assert_close(model(**b, adapters=["a"] * 4).logits, a, atol=0, rtol=0)  # same as uniform
    assert model.head is not model.adapter_heads["a"] and model.config.num_labels == 2   # nothing swapped
    with pytest.raises(ConfigError, match=r"no adapter named 'zz' \(loaded: a, b, c\)"):
        model(**b, adapters="zz")
    assert routing.current() is routing.BASE                                     # reset after an error too
    with pytest.raises(ValueError, match="names 3 rows but the batch has 4"):
        model(**b, adapters=["a", "b", None])
    # a block routes every call inside it (training loops, generation), on this thread only
    with routing.using("a"):
        torch.testing.assert_close(model(**b).logits, a, atol=0, rtol=0)
        torch.testing.assert_close(model(**b, adapters=None).logits, base, atol=0, rtol=0)  # explicit wins
    torch.testing.assert_close(model(**b).logits, base, atol=0, rtol=0)


@torch.no_grad()
def test_rows_use_their_own_heads_of_different_widths():
    model = adapted_model()
    ex = examples(6)
    names = ["a", "b", None, "c", "b", "a"]
    for batch in (collate(ex, 0), collate_packed(ex)):
        logits = model(**model_inputs(batch), adapters=names).logits
        assert [len(x) for x in logits] == [2, 3, 2, 2, 3, 2]
        for i, name in enumerate(names):
            torch.testing.assert_close(logits[i], alone(model, ex[i], name), atol=1e-5, rtol=1e-5)
    assert model.config_for("b").num_labels == 3 and model.config_for(None).num_labels == 2


@torch.no_grad()
def test_concurrent_threads_with_different_adapters_equal_sequential_runs():
    """Threads share one model: two with one adapter for the whole batch, two with a mixed batch
    (padded, packed). Every row equals its own adapter's run alone, computed sequentially first."""
    model = adapted_model()
    ex = examples(8)
    plans = {"a": ["a"] * 8, "b": ["b"] * 8,
             "mixed-padded": ["a", "b", None, "c", "c", "b", None, "a"],
             "mixed-packed": ["c", None, "b", "a", "b", "a", "c", None]}
    want = {k: [alone(model, ex[i], n) for i, n in enumerate(names)] for k, names in plans.items()}
    padded, packed = model_inputs(collate(ex, 0)), model_inputs(collate_packed(ex))

    def call(key):
        names = plans[key]
        adapters = names[0] if key in ("a", "b") else names
        return model(**(packed if key.endswith("packed") else padded), adapters=adapters).logits

    barrier = threading.Barrier(len(plans))
    errors: list = []

    def work(key):
        try:
            barrier.wait()
            for _ in range(30):
                got = call(key)
                for i in range(len(ex)):
                    if not torch.allclose(got[i], want[key][i], atol=1e-5, rtol=1e-5):
                        errors.append((key, i, (got[i] - want[key][i]).abs().max().item()))
                        return
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append((key, repr(e)))

    threads = [threading.Thread(target=work, args=(k,)) for k in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:4]
