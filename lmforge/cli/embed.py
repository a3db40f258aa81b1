"""Embed texts: one JSON array per input (mean-pooled, L2-normalised sentence embeddings).

Texts come as arguments, or one per line from --input FILE (or - for standard input).
"""

from __future__ import annotations

import sys

from lmforge.errors import DataError


def add_parser(p) -> None:
    p.add_argument("texts", nargs="*", help="texts to embed")
    p.add_argument("--model", default="minilm", help="model directory, alias or hub id (default: minilm)")
    p.add_argument("--input", help="file with one text per line ('-' for stdin)")
    p.add_argument("--max-length", type=int, help="truncate longer inputs (default: the model's setting)")
    p.add_argument("--pooling", choices=["mean", "cls", "max"], help="default: the model's setting, else mean")
    p.add_argument("--no-normalize", action="store_true", help="skip L2 normalisation")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--decimals", type=int, default=6, help="digits after the point in the output")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quantize", choices=["int8"], help="int8 dynamic quantization of the base model (CPU)")


def run(args) -> int:
    from lmforge.infer.embed import Embedder, iter_json_lines, read_lines

    if args.input and args.texts:
        raise DataError("give texts as arguments or --input, not both")
    if args.input == "-":
        texts = sys.stdin.read().splitlines()
        if not texts:
            raise DataError("<stdin>: empty input (expected one text per line)")
    elif args.input:
        texts = read_lines(args.input)
    else:
        texts = args.texts
    if not texts:
        raise DataError("nothing to embed: pass texts as arguments or --input FILE")
    embedder = Embedder(args.model, max_length=args.max_length, pooling=args.pooling,
                        normalize=not args.no_normalize, batch_size=args.batch_size, device=args.device,
                        quantize=args.quantize)
    vectors = embedder.embed(texts, progress=len(texts) > 256 and sys.stderr.isatty())
    out = sys.stdout
    for line in iter_json_lines(vectors, args.decimals):
        out.write(line + "\n")
    out.flush()
    return 0
