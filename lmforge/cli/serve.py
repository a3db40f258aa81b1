r"""Serve a model over HTTP: classification with many LoRA adapters batched together, embeddings, generation.

  lmforge serve --model minilm --adapter sst2=runs/sst2-lora --adapter cola=runs/cola-lora --port 8000
  curl -s localhost:8000/v1/classify -H 'content-type: application/json' \
       -d '{"adapter": "sst2", "inputs": ["a gorgeous film"]}'

Endpoints: POST /v1/classify, /v1/embed, /v1/generate (decoders); GET/POST /v1/adapters,
DELETE /v1/adapters/NAME; GET /healthz, /metrics (Prometheus), /openapi.json, / (a web page).
SIGTERM or Ctrl-C answers the requests in flight, then exits.
"""

from __future__ import annotations

import argparse
import os

from lmforge.cli.runtime import add_runtime_args, resolve_runtime
from lmforge.cli.validate import non_negative_float, port, positive_int
from lmforge.errors import ConfigError


def _adapter(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{value!r}: expected NAME=DIR (a LoRA run directory or its best/)")
    return name, path


def _existing_dir(value: str) -> str:
    if not os.path.isdir(value):
        raise argparse.ArgumentTypeError(f"{value}: no such directory")
    return value


def add_parser(p) -> None:
    p.add_argument("--model", default="minilm", help="base model directory or alias (default: minilm)")
    p.add_argument("--adapter", action="append", default=[], type=_adapter, metavar="NAME=DIR",
                   help="load a LoRA adapter (a `finetune --method lora` run or its best/); repeatable")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port, default=8000, help="0: any free port")
    p.add_argument("--max-batch-size", type=positive_int, default=32, help="sequences per forward pass (default 32)")
    p.add_argument("--max-wait-ms", type=non_negative_float, default=5.0,
                   help="how long the first request of a batch waits for others (default 5)")
    p.add_argument("--max-queue", type=positive_int, default=1024,
                   help="sequences that may wait; more are refused with 429 (default 1024)")
    p.add_argument("--max-input-tokens", type=positive_int,
                   help="longer inputs get 413 unless the request asks to truncate (default: the model's limit)")
    p.add_argument("--api-key-env", metavar="NAME",
                   help="require the key held in this environment variable on every /v1 endpoint")
    p.add_argument("--adapter-root", metavar="DIR", type=_existing_dir,
                   help="allow hot-loading adapters (POST /v1/adapters) from below DIR only")
    p.add_argument("--quantize", choices=["int8"], help="dynamic int8 quantization of the base model")
    add_runtime_args(p)
    p.add_argument("--threads", type=positive_int, help="torch threads for the forward passes (default: torch's)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def run(args) -> int:
    import torch
    import uvicorn

    from lmforge.serve.app import ServeSettings, create_app

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise ConfigError(f"--api-key-env {args.api_key_env}: that environment variable is empty or unset")
    if args.threads:
        torch.set_num_threads(args.threads)
    resolve_runtime(args)   # said at the start (and refused here if unavailable); the app resolves it again
    settings = ServeSettings(model=args.model, adapters=args.adapter,
                             max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                             max_queue=args.max_queue, max_input_tokens=args.max_input_tokens,
                             api_key=api_key, adapter_root=args.adapter_root, quantize=args.quantize,
                             device=args.device, precision=args.precision)
    app = create_app(settings)
    # uvicorn handles SIGTERM/SIGINT: stop accepting, answer what is open, then the app's shutdown
    # drains the batcher.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0
