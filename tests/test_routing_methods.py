"""Bottleneck adapters and prefix tuning are routed per call like LoRA (models/routing.py): a forward
pass uses the adapter its `adapters=` argument names, and nothing on the modules says which one is
"active". Bottleneck adapters mix in one batch (each row's tokens through its own adapter); a prefix
changes the sequence of the rows that use it, so a mixed batch naming one is refused, as the method
interface says (Method.mixable)."""

import threading

import pytest
import torch

from lmforge.adapters.bottleneck import BottleneckConfig, add_bottleneck
from lmforge.adapters.methods import get_method
from lmforge.adapters.prefix import PrefixConfig, add_prefix
from lmforge.data.batches import collate, collate_packed, model_inputs
from lmforge.errors import ConfigError
from lmforge.models.routing import Routing
from tests.test_packing import items, random_model, tiny

LENGTHS = [7, 3, 11, 1, 5, 9]
KINDS = {  # method -> function adding adapter `name` of that method to a model
    "adapter-houlsby": lambda model, name: add_bottleneck(model, name, BottleneckConfig("houlsby", size=4)),
    "adapter-pfeiffer": lambda model, name: add_bottleneck(model, name, BottleneckConfig("pfeiffer", size=4)),
    "prefix-embedding": lambda model, name: add_prefix(model, name, PrefixConfig("embedding", length=3)),
    "prefix-layer": lambda model, name: add_prefix(model, name, PrefixConfig("layer", length=3)),
}
CASES = [(method, arch) for method in KINDS for arch in ("bert", "gpt2")]


def adapted(method: str, arch: str, names=("x", "y")):
    """A random tiny model with adapters `names` of `method`, each with its own random weights (the
    same weights for a name whichever other adapters the model has)."""
    model = random_model(tiny(arch)).eval()
    for name in names:
        KINDS[method](model, name)
    with torch.no_grad():
        for n, p in model.named_parameters():
            for name in names:
                if n.endswith(f".{name}") or f".{name}." in n:   # this adapter's tensors
                    g = torch.Generator().manual_seed(sum(map(ord, n)))
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def padded(ex):
    return model_inputs(collate(ex, 0))


def alone(model, ex, name):
    return model(**padded([ex]), adapters=name).logits[0]


@pytest.mark.parametrize("method,arch", CASES)
@torch.no_grad()
def test_each_adapter_by_argument_equals_that_adapter_alone(method, arch):
    model = adapted(method, arch)
    b = padded(items(LENGTHS))
    base = model(**b).logits
    x, y = model(**b, adapters="x").logits, model(**b, adapters="y").logits
    assert (x - base).abs().max() > 1e-3 and (y - x).abs().max() > 1e-3   # each one does something of its own
    # a model holding only that adapter, with the same weights, gives the same numbers
    for name, got in (("x", x), ("y", y)):
        only = adapted(method, arch, names=(name,))
        torch.testing.assert_close(only(**b, adapters=name).logits, got, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(only(**b).logits, base, atol=0, rtol=0)   # not named: the base model
    # nothing stays switched on after a call, and nothing on the modules says which one ran
    torch.testing.assert_close(model(**b).logits, base, atol=0, rtol=0)
    assert not any(hasattr(m, "active") for m in model.modules())
    assert get_method(method).adapter == "default"   # what a run of this method routes to


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
@pytest.mark.parametrize("method", ["adapter-houlsby", "adapter-pfeiffer"])
@torch.no_grad()
def test_bottleneck_mixed_batch_equals_each_row_alone(method, arch):
    assert get_method(method).mixable
    model = adapted(method, arch)
    ex = items(LENGTHS)
    names = ["x", "y", None, "y", "x", None]
    want = [alone(model, e, n) for e, n in zip(ex, names)]
    got_padded = model(**padded(ex), adapters=names).logits
    got_packed = model(**model_inputs(collate_packed(ex)), adapters=names).logits
    for i in range(len(ex)):
        torch.testing.assert_close(got_padded[i], want[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_packed[i], want[i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["prefix-embedding", "prefix-layer"])
@torch.no_grad()
def test_prefix_refuses_a_mixed_batch_and_stacking(method):
    assert not get_method(method).mixable
    model = adapted(method, "bert")
    b = padded(items(LENGTHS[:3]))
    with pytest.raises(ConfigError, match="prefix 'x' cannot run in a mixed-adapter batch"):
        model(**b, adapters=["x", None, "x"])
    with pytest.raises(ConfigError, match="cannot be stacked"):
        model(**b, adapters=Routing.stack("x", "y"))
    # a routing the prefixes are not part of runs as the base model would
    torch.testing.assert_close(model(**b, adapters=None).logits, model(**b).logits, atol=0, rtol=0)


@pytest.mark.parametrize("method", list(KINDS))
@torch.no_grad()
def test_threads_with_different_adapters_get_what_each_gets_alone(method):
    """Several threads run forward passes on one model at the same time, each with its own routing;
    each gets exactly what it gets running alone (a module-global 'active adapter' would mix them)."""
    model = adapted(method, "gpt2")
    ex = items(LENGTHS)
    plans = ["x", "y", None]
    if get_method(method).mixable:
        plans.append(["y", "x", None, "x", "y", "x"])
    inputs = padded(ex)
    want = [model(**inputs, adapters=p).logits for p in plans]
    barrier = threading.Barrier(len(plans))
    errors = []

    def work(k):
        barrier.wait()
        for _ in range(25):
            got = model(**inputs, adapters=plans[k]).logits
            if not torch.allclose(got, want[k], atol=1e-5, rtol=1e-5):
                errors.append((k, (got - want[k]).abs().max().item()))
                return

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(plans))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
