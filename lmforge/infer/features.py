"""Frozen-encoder features for the `features` method: pooled last hidden states, and for text pairs
either one joint input ("joint") or each text alone combined as [u, v, |u - v|, u * v] ("separate",
the SentEval/InferSent recipe, which suits sentence-embedding models such as all-MiniLM)."""

from __future__ import annotations

import numpy as np
import torch

from lmforge.data.batches import Encoded, collate_packed, encode_examples, model_inputs
from lmforge.data.tables import Example
from lmforge.infer.embed import pool_packed

PAIR_MODES = ("separate", "joint")


@torch.no_grad()
def extract_features(model, encoded: list[Encoded], pooling: str = "mean", batch_size: int = 128) -> np.ndarray:
    """[N, D] pooled last hidden states ("mean" over tokens, or the first token "cls"), each batch one
    packed stream (no work on padding)."""
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))  # even length buckets
    out = np.empty((len(encoded), model.config.hidden_size), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        inputs = model_inputs(collate_packed([Encoded(encoded[i].input_ids, encoded[i].token_type_ids)
                                              for i in idx]))
        h = model.transformer(inputs["input_ids"], None, inputs["token_type_ids"], packed=inputs["packed"])
        out[idx] = pool_packed(h, inputs["packed"], pooling).numpy()
    return out


def example_features(model, tokenizer, examples: list[Example], max_length: int, pooling: str = "mean",
                     pairs: str = "separate", batch_size: int = 128) -> np.ndarray:
    """[N, D] for single texts or joint pairs; [N, 4D] for separately encoded pairs."""
    if pairs not in PAIR_MODES:
        raise ValueError(f"pairs {pairs!r} is not one of {', '.join(PAIR_MODES)}")
    if pairs == "joint" or not examples or examples[0].pair is None:
        return extract_features(model, encode_examples(tokenizer, examples, max_length), pooling, batch_size)
    u, v = (extract_features(model, encode_examples(tokenizer, [Example(t) for t in texts], max_length),
                             pooling, batch_size)
            for texts in ([e.text for e in examples], [e.pair for e in examples]))
    return np.concatenate([u, v, np.abs(u - v), u * v], axis=1)
