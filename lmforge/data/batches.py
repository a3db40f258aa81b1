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


def collate_packed(items: list[Encoded], regression: bool = False) -> dict:
    """Concatenate the items into one stream, no padding: input_ids, token_type_ids [N],
    cu_seqlens [B + 1] (cumulative lengths), max_len (int), labels [B]. See models/packing.py."""
    lengths = [len(x.input_ids) for x in items]
    cu = torch.zeros(len(items) + 1, dtype=torch.long)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    batch = {"input_ids": torch.tensor([t for x in items for t in x.input_ids], dtype=torch.long),
             "token_type_ids": torch.tensor([t for x in items for t in x.token_type_ids], dtype=torch.long),
             "cu_seqlens": cu, "max_len": max(lengths)}
    if items[0].label is not None:
        batch["labels"] = torch.tensor([x.label for x in items],
                                       dtype=torch.float32 if regression else torch.long)
    return batch


def model_inputs(batch: dict) -> dict:
    """The keyword arguments of Model.forward for a padded or a packed batch."""
    if "cu_seqlens" in batch:
        from lmforge.models.packing import Packed

        return {"input_ids": batch["input_ids"], "token_type_ids": batch["token_type_ids"],
                "packed": Packed(batch["cu_seqlens"], batch["max_len"])}
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


def token_budget_batches(lengths: list[int], max_tokens: int, seed: int, epoch: int,
                         pool_batches: int = 64) -> list[list[int]]:
    """Batches of similar-length examples whose padded size (count x longest) stays within
    max_tokens; a longer example is a batch of its own. The order is a function of (seed, epoch)
    alone, so a resumed run sees the same batches: shuffle, sort by length within pools of about
    `pool_batches` batches (so batches still mix the data), cut greedily, shuffle the batches."""
    if max_tokens < 1:
        raise ValueError(f"the token budget must be >= 1, got {max_tokens}")
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    mean = max(1, sum(lengths) // max(len(lengths), 1))
    pool = max(1, pool_batches * max(1, max_tokens // mean))
    batches: list[list[int]] = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start:start + pool], key=lambda i: lengths[i])  # stable: ties stay random
        current: list[int] = []
        longest = 0
        for i in chunk:
            n = lengths[i]
            if current and (len(current) + 1) * max(longest, n) > max_tokens:
                batches.append(current)
                current, longest = [], 0
            current.append(i)
            longest = max(longest, n)
        if current:
            batches.append(current)
    perm = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in perm]
