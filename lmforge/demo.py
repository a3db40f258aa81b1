"""`make demo`: embed SST-2 dev sentences with MiniLM and show nearest neighbours.

Runs offline. Uses $LMFORGE_DATA/glue/SST-2/dev.tsv when present, else a few embedded sentences.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from lmforge.infer.embed import Embedder

EMBEDDED = [
    ("a gorgeous , witty , seductive movie .", 1),
    ("the acting is superb and the story moves along briskly .", 1),
    ("one of the most delightful films of the year .", 1),
    ("a warm , funny and deeply moving portrait of a family .", 1),
    ("the plot is thin and the jokes fall flat .", 0),
    ("a tedious , overlong mess with nothing to say .", 0),
    ("i was bored from the first scene to the last .", 0),
    ("the dialogue is clumsy and the characters are paper-thin .", 0),
    ("the cinematography alone is worth the price of admission .", 1),
    ("an ugly , joyless film that wastes a talented cast .", 0),
]
QUERIES = ["a charming , funny film that i loved", "a dull and lifeless movie", "the actors are wonderful"]


def load_sentences() -> tuple[list[tuple[str, int]], str]:
    root = os.environ.get("LMFORGE_DATA")
    candidates = [Path(root)] if root else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    for base in candidates:
        dev = base / "glue" / "SST-2" / "dev.tsv"
        if dev.is_file():
            rows = dev.read_text(encoding="utf-8").splitlines()[1:]
            return [(r.split("\t")[0].strip(), int(r.split("\t")[1])) for r in rows if r], str(dev)
    return EMBEDDED, "embedded sentences"


def main() -> int:
    torch.manual_seed(0)
    sentences, source = load_sentences()
    texts = [s for s, _ in sentences]
    labels = torch.tensor([y for _, y in sentences])
    print(f"lmforge demo: all-MiniLM-L6-v2 sentence embeddings of {len(texts)} texts ({source})\n")
    t0 = time.perf_counter()
    embedder = Embedder("minilm")
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    vectors = embedder.embed(texts, progress=sys.stderr.isatty())
    embed_s = time.perf_counter() - t0
    print(f"model loaded in {load_s:.1f}s; {len(texts)} texts embedded in {embed_s:.1f}s "
          f"({len(texts) / embed_s:.0f} texts/s, dim {vectors.shape[1]}, max_length {embedder.max_length})\n")

    names = {0: "neg", 1: "pos"}
    for q in QUERIES:
        sims = vectors @ embedder.embed([q])[0]
        top = sims.topk(3)
        print(f"query: {q!r}")
        for score, i in zip(top.values.tolist(), top.indices.tolist()):
            print(f"   {score:.3f}  [{names[int(labels[i])]}] {texts[i]}")
        print()

    # Leave-one-out 5-nearest-neighbour sentiment: what the embeddings know before any fine-tuning.
    sims = vectors @ vectors.T
    sims.fill_diagonal_(-2)
    k = min(5, len(texts) - 1)
    votes = labels[sims.topk(k, dim=1).indices].float().mean(1)
    acc = ((votes > 0.5).long() == labels).float().mean().item()
    majority = max(labels.float().mean().item(), 1 - labels.float().mean().item())
    print(f"{k}-NN sentiment accuracy with frozen embeddings: {acc:.1%} (majority class {majority:.1%})")
    print("\nnext: lmforge embed --model minilm \"first text\" \"second text\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
