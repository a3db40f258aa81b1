"""Export a run as a plain Hugging Face model directory (config.json + model.safetensors + tokenizer).

  lmforge export --run runs/sst2-lora --merged --out runs/sst2-merged

For a LoRA run, --merged folds B A into W (no added latency at inference) and keeps the adapter's
head; the result loads in `transformers` with AutoModelForSequenceClassification.

A sharded checkpoint (a `--fsdp` run under torchrun: RUN/checkpoint/shards/, one file per process)
is consolidated in one process into an ordinary model directory:

  lmforge export --run runs/pretrain-fsdp --out runs/pretrain-fsdp-model

A fine-tuning run exports its best/ model as any other (a --fsdp run gathered it whole); its
checkpoint is consolidated when named itself (--run RUN/checkpoint), for full, freeze and bitfit runs.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.cli.validate import writable_dir
from lmforge.errors import ConfigError


def add_parser(p) -> None:
    p.add_argument("--run", required=True, help="run directory (its best/) or adapter/model directory")
    p.add_argument("--out", required=True, type=writable_dir, help="the model directory to write")
    p.add_argument("--merged", action="store_true", help="fold the LoRA adapter into the weights")


def sharded_checkpoint(run: str) -> Path | None:
    """RUN itself, or RUN/checkpoint when RUN has no best/ model (pre-training), when it is a sharded
    training checkpoint; else None."""
    import json

    for d in (Path(run),) if (Path(run) / "best").is_dir() else (Path(run) / "checkpoint", Path(run)):
        state = d / "trainer_state.json"
        if state.is_file() and (d / "shards").is_dir():
            try:
                if json.loads(state.read_text()).get("sharded"):
                    return d
            except ValueError:
                raise ConfigError(f"{state}: not valid JSON") from None
    return None


def consolidate(checkpoint: Path, out: str) -> int:
    """The shards, whole, in a plain model of the checkpoint's config, saved with the run's tokenizer."""
    import json

    from lmforge.adapters.methods import get_method
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.models import Model, ModelConfig, save_pretrained
    from lmforge.train.pretrain import DEFAULT_TOKENIZER
    from lmforge.train.state import consolidate as load_shards

    try:
        config = ModelConfig(**json.loads((checkpoint / "config.json").read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"{checkpoint / 'config.json'}: cannot read the model's config ({e})") from None
    run_json = checkpoint.parent / "run.json"   # the run says which tokenizer it used
    settings = json.loads(run_json.read_text()) if run_json.is_file() else {}
    method = (settings.get("adapt") or {}).get("method", "full")   # a fine-tuning run's --method
    if get_method(method).adapter is not None:
        raise ConfigError(f"{checkpoint}: the checkpoint of a --method {method} run holds the model with its "
                          f"adapter modules; export the run's best/ instead (--run {checkpoint.parent})")
    model = Model(config)
    load_shards(checkpoint, model)
    # pre-training: --tokenizer, else the --init model's, else the default; fine-tuning: the --model's
    tokenizer = settings.get("tokenizer") or settings.get("init") or settings.get("model") or DEFAULT_TOKENIZER
    save_pretrained(model, out, tokenizer=load_tokenizer(tokenizer))
    print(f"wrote {Path(out)} ({model.config.model_type}, head {model.config.head}), consolidated from {checkpoint}")
    return 0


def run(args) -> int:
    checkpoint = sharded_checkpoint(args.run)
    if checkpoint is not None:
        return consolidate(checkpoint, args.out)
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
