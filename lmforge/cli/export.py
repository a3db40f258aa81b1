"""Export a run as a plain Hugging Face model directory (config.json + model.safetensors + tokenizer).

  lmforge export --run runs/sst2-lora --merged --out runs/sst2-merged

For a LoRA run, --merged folds B A into W (no added latency at inference) and keeps the adapter's
head; the result loads in `transformers` with AutoModelForSequenceClassification.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.cli.validate import writable_dir
from lmforge.errors import ConfigError


def add_parser(p) -> None:
    p.add_argument("--run", required=True, help="run directory (its best/) or adapter/model directory")
    p.add_argument("--out", required=True, type=writable_dir, help="the model directory to write")
    p.add_argument("--merged", action="store_true", help="fold the LoRA adapter into the weights")


def run(args) -> int:
    from lmforge.adapters.methods import method_of_dir
    from lmforge.cli.evaluate import run_files
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.models import save_pretrained

    with run_files(args.run) as (directory, files):
        method = method_of_dir(files)   # the method that wrote the run loads and exports it
        if method.mergeable and not args.merged:
            raise ConfigError(f"{directory}: an adapter run; pass --merged to fold it into a plain model")
        model, adapter = method.load(files)
        model = method.export(model, adapter)
        save_pretrained(model, args.out, tokenizer=load_tokenizer(files))
    print(f"wrote {Path(args.out)} ({model.config.model_type}, head {model.config.head})")
    return 0
