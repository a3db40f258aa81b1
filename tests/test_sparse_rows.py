"""Row-sparse embedding gradients change the cost of full fine-tuning, not its arithmetic."""

import pytest
import torch

from lmforge.train.optim import build_optimizer
from lmforge.train.sparse_rows import RowSparseGrads
from tests.test_packing import random_model, tiny


@pytest.mark.parametrize("model_type, head", [("bert", "classification"), ("gpt2", "causal-lm")])
def test_same_weights_as_dense_embedding_gradients(model_type, head):
    # gpt2's LM head is tied to the word embeddings: a dense contribution, so the whole buffer is zeroed
    models = [random_model(tiny(model_type, head)).train() for _ in range(2)]
    sparse = RowSparseGrads(models[1], min_rows=50)  # the 60-row vocabulary, not 40 positions
    assert len(sparse.tables) == 1 and models[1].transformer.embeddings.word_embeddings.sparse
    opts = [build_optimizer(m, lr=1e-2) for m in models]
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        ids = torch.randint(3, 60, (3, 7), generator=g)
        for i, (m, opt) in enumerate(zip(models, opts)):
            out = m(ids, torch.ones_like(ids)).logits
            out.pow(2).mean().backward()
            if i == 1:
                assert not models[1].transformer.embeddings.word_embeddings.weight.grad.is_sparse
            opt.step()
            sparse.zero_grad(opt) if i == 1 else opt.zero_grad(set_to_none=True)
        w = models[1].transformer.embeddings.word_embeddings.weight
        assert torch.count_nonzero(w.grad) == 0  # only the written rows were zeroed, and that was all of them
    for (n, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        if n.endswith("attention.key.bias"):
            # softmax ignores it: its gradient is rounding noise, which Adam normalises to +-lr steps
            continue
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=n)
    sparse.close()
    assert not models[1].transformer.embeddings.word_embeddings.sparse
