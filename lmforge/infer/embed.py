"""Sentence embeddings: pooled last hidden states, L2-normalised, as sentence-transformers computes them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lmforge.data.tokenizer import load_tokenizer
from lmforge.errors import DataError
from lmforge.infer.quantize import quantize_model
from lmforge.models import from_pretrained
from lmforge.models.hub import resolve
from lmforge.models.packing import pack_padded


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """[B, T, D] hidden states + [B, T] mask -> [B, D]."""
    if mode == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).max(1).values
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def pool_packed(hidden: torch.Tensor, packed, mode: str = "mean") -> torch.Tensor:
    """Packed hidden states [N, D] -> [B, D], without padding them first (max pooling excepted)."""
    if mode == "cls":
        return hidden.index_select(0, packed.first)
    if mode == "max":
        return pool(packed.pad(hidden), packed.attention_mask(), mode)
    sums = hidden.new_zeros(packed.batch_size, hidden.shape[-1]).index_add_(0, packed.seq_ids, hidden)
    return sums / packed.lengths[:, None].to(hidden.dtype)


def _sentence_transformers_settings(directory: Path) -> tuple[str, int | None]:
    """Pooling mode and max length from a sentence-transformers export, when the folder has one."""
    mode, max_length = "mean", None
    pooling = directory / "1_Pooling" / "config.json"
    if pooling.is_file():
        cfg = json.loads(pooling.read_text())
        mode = next((m for m in ("cls", "max", "mean") if cfg.get(f"pooling_mode_{m}_token" if m == "cls"
                     else f"pooling_mode_{m}_tokens")), "mean")
    sbert = directory / "sentence_bert_config.json"
    if sbert.is_file():
        max_length = json.loads(sbert.read_text()).get("max_seq_length")
    return mode, max_length


class Embedder:
    def __init__(self, model: str, max_length: int | None = None, pooling: str | None = None,
                 normalize: bool = True, batch_size: int = 64, device: str = "cpu", quantize: str | None = None):
        directory = resolve(model)
        mode, st_max = _sentence_transformers_settings(directory)
        self.model = from_pretrained(directory, head=None, device=device).eval()
        if quantize:
            quantize_model(self.model, quantize)
        self.tokenizer = load_tokenizer(directory)
        self.pooling = pooling or mode
        self.max_length = max_length or st_max or self.model.config.max_position_embeddings
        self.normalize = normalize
        self.batch_size = batch_size

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @torch.inference_mode()
    def embed(self, texts: list[str], progress: bool = False) -> torch.Tensor:
        """[N, D] embeddings in the order of `texts`. Similar lengths are batched together so that
        little work goes into padding; the order is restored at the end."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty(len(texts), self.dim)
        bar = tqdm(total=len(texts), desc="embed", unit="text", disable=not progress, leave=False)
        device = self.model.device
        for start in range(0, len(texts), self.batch_size):
            idx = order[start:start + self.batch_size]
            batch = self.tokenizer([texts[i] for i in idx], max_length=self.max_length)
            # unpadded execution; pooling reads the padded view of the packed hidden states
            ids, packed, types = pack_padded(*(batch[k].to(device) for k in
                                               ("input_ids", "attention_mask", "token_type_ids")))
            hidden = self.model(ids, token_type_ids=types, packed=packed).hidden_states
            vec = pool_packed(hidden, packed, self.pooling)
            out[idx] = (F.normalize(vec, dim=-1) if self.normalize else vec).float().cpu()
            bar.update(len(idx))
        bar.close()
        return out


def read_lines(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text (byte {e.start})") from None
    if not lines:
        raise DataError(f"{p}: empty input (expected one text per line)")
    return lines


def iter_json_lines(vectors: torch.Tensor, decimals: int = 6) -> Iterable[str]:
    for v in vectors.tolist():
        yield json.dumps([round(x, decimals) for x in v])
