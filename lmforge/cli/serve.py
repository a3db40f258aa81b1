r"""Serve a model over HTTP: classification with many LoRA adapters batched together, embeddings, generation.

  lmforge serve --model minilm --adapter sst2=runs/sst2-lora --adapter cola=runs/cola-lora --port 8000
  curl -s localhost:8000/v1/classify -H 'content-type: application/json' \
       -d '{"adapter": "sst2", "inputs": ["a gorgeous film"]}'

Endpoints: POST /v1/classify, /v1/embed, /v1/generate (decoders); GET/POST /v1/adapters,
DELETE /v1/adapters/NAME; GET /healthz, /metrics (Prometheus), /openapi.json, / (a web page).
SIGTERM or Ctrl-C answers the requests in flight, then exits.
"""

from __future__ import annotations

import os

from lmforge.errors import ConfigError


def _adapter(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise ConfigError(f"--adapter {value!r}: expected NAME=DIR (a LoRA run directory or its best/)")
    return name, path


def add_parser(p) -> None:
    p.add_argument("--model", default="minilm", help="base model directory or alias (default: minilm)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="load a LoRA adapter (a `finetune --method lora` run or its best/); repeatable")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=32, help="sequences per forward pass (default 32)")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long the first request of a batch waits for others (default 5)")
    p.add_argument("--max-queue", type=int, default=1024,
                   help="sequences that may wait; more are refused with 429 (default 1024)")
    p.add_argument("--max-input-tokens", type=int,
                   help="longer inputs get 413 unless the request asks to truncate (default: the model's limit)")
    p.add_argument("--api-key-env", metavar="NAME",
                   help="require the key held in this environment variable on every /v1 endpoint")
    p.add_argument("--adapter-root", metavar="DIR",
                   help="allow hot-loading adapters (POST /v1/adapters) from below DIR only")
    p.add_argument("--quantize", choices=["int8"], help="dynamic int8 quantization of the base model")
    p.add_argument("--threads", type=int, help="torch threads for the forward passes (default: torch's)")
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
    for name, value in (("--max-batch-size", args.max_batch_size), ("--max-queue", args.max_queue)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if args.max_wait_ms < 0:
        raise ConfigError(f"--max-wait-ms must be >= 0, got {args.max_wait_ms}")
    if args.max_input_tokens is not None and args.max_input_tokens < 1:
        raise ConfigError(f"--max-input-tokens must be >= 1, got {args.max_input_tokens}")
    if args.adapter_root and not os.path.isdir(args.adapter_root):
        raise ConfigError(f"--adapter-root {args.adapter_root}: no such directory")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = ServeSettings(model=args.model, adapters=[_adapter(a) for a in args.adapter],
                             max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                             max_queue=args.max_queue, max_input_tokens=args.max_input_tokens,
                             api_key=api_key, adapter_root=args.adapter_root, quantize=args.quantize)
    app = create_app(settings)
    # uvicorn handles SIGTERM/SIGINT: stop accepting, answer what is open, then the app's shutdown
    # drains the batcher.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0
