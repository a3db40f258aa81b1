"""Examples -> token ids once, up front; token ids -> padded batches (to the longest in each batch)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Encoded:
    input_ids: list[int]
    token_type_ids: list[int]
    label: int | float | None = None


def encode_examples(tokenizer, examples, max_length: int, chunk: int = 2048) -> list[Encoded]:
    """Tokenise text (and pair) of every example; the tokenizers library batches in Rust."""
    out: list[Encoded] = []
    for start in range(0, len(examples), chunk):
        part = examples[start:start + chunk]
        pairs = [e.pair for e in part] if part and part[0].pair is not None else None
        enc = tokenizer([e.text for e in part], pairs=pairs, max_length=max_length, padding="none")
        for e, ids, types in zip(part, enc["input_ids"], enc["token_type_ids"]):
            out.append(Encoded(ids, types, e.label))
    return out


def collate(items: list[Encoded], pad_id: int, regression: bool = False) -> dict[str, torch.Tensor]:
    """Right-pad to the longest item: input_ids, attention_mask, token_type_ids [B, T], labels [B]."""
    T = max(len(x.input_ids) for x in items)
    ids = torch.full((len(items), T), pad_id, dtype=torch.long)
    types = torch.zeros((len(items), T), dtype=torch.long)
    mask = torch.zeros((len(items), T), dtype=torch.long)
    for i, x in enumerate(items):
        n = len(x.input_ids)
        ids[i, :n] = torch.tensor(x.input_ids)
        types[i, :n] = torch.tensor(x.token_type_ids)
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    if items[0].label is not None:
        batch["labels"] = torch.tensor([x.label for x in items],
                                       dtype=torch.float32 if regression else torch.long)
    return batch
