"""Embed texts: one JSON array per input (mean-pooled, L2-normalised sentence embeddings).

Texts come as arguments, or one per line from --input FILE (or - for standard input).
"""

from __future__ import annotations

import sys

from lmforge.cli.runtime import add_runtime_args, resolve_runtime
from lmforge.cli.validate import non_negative_int, positive_int, seq_len
from lmforge.errors import DataError


def add_parser(p) -> None:
    p.add_argument("texts", nargs="*", help="texts to embed")
    p.add_argument("--model", default="minilm", help="model directory, alias or hub id (default: minilm)")
    p.add_argument("--input", help="file with one text per line ('-' for stdin)")
    p.add_argument("--max-length", type=seq_len, help="truncate longer inputs (default: the model's setting)")
    p.add_argument("--pooling", choices=["mean", "cls", "max"], help="default: the model's setting, else mean")
    p.add_argument("--no-normalize", action="store_true", help="skip L2 normalisation")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--decimals", type=non_negative_int, default=6, help="digits after the point in the output")
    p.add_argument("--quantize", choices=["int8"], help="int8 dynamic quantization of the base model (CPU)")
    add_runtime_args(p)


def run(args) -> int:
    from lmforge.data.tables import decode_text, read_text_file
    from lmforge.infer.embed import Embedder, iter_json_lines

    if args.input and args.texts:
        raise DataError("give texts as arguments or --input, not both")
    if args.input:
        # decoded here, not by Python's text layer, so a bad byte is reported with its line
        texts = (decode_text(sys.stdin.buffer.read(), "<stdin>") if args.input == "-"
                 else read_text_file(args.input)).splitlines()
        if not texts:
            raise DataError(f"{args.input if args.input != '-' else '<stdin>'}: empty input "
                            "(expected one text per line)")
    else:
        texts = args.texts
    if not texts:
        raise DataError("nothing to embed: pass texts as arguments or --input FILE")
    device, precision = resolve_runtime(args, quiet=True)
    embedder = Embedder(args.model, max_length=args.max_length, pooling=args.pooling,
                        normalize=not args.no_normalize, batch_size=args.batch_size, device=device,
                        quantize=args.quantize)
    print(f"device {device}, precision {precision}", file=sys.stderr, flush=True)
    with precision.autocast(device):
        vectors = embedder.embed(texts, progress=len(texts) > 256 and sys.stderr.isatty()).float()
    out = sys.stdout
    for line in iter_json_lines(vectors, args.decimals):
        out.write(line + "\n")
    out.flush()
    return 0
