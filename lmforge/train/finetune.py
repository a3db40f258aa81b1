"""Fine-tune a pretrained encoder on a GLUE task or the user's own labelled file; a decoder on a
data-to-text task (e2e, webnlg, dart: train/data_to_text.py).

A run directory holds:
  run.json        the resolved configuration (everything needed to repeat or resume the run)
  metrics.jsonl   training loss, learning rate, samples/s, and every dev evaluation
  curves.png      training loss and dev metric curves
  best/           the best model so far (Hugging Face format, with tokenizer and label names)
  checkpoint/     the latest training state, for --resume
  summary.json    final metrics, best step, trainable parameters, wall time

Under torchrun (several processes, train/distributed.py) every rank runs this function; rank 0
alone writes the run directory and prints.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lmforge.data.batches import collate, collate_packed, encode_examples, token_budget_batches
from lmforge.data.tokenizer import load_tokenizer
from lmforge.errors import ConfigError
from lmforge.infer.classify import predict_logits
from lmforge.kernels import resolve_device, resolve_precision
from lmforge.models import from_pretrained
from lmforge.train.data import TaskData, is_nlg_task, load_task_data
from lmforge.train.data_to_text import DecodingConfig
from lmforge.adapters.methods import MethodConfig, apply_method, describe_parameters, parameter_counts
from lmforge.models import routing
from lmforge.train.metrics import compute_metrics
from lmforge.train.objectives import SequenceClassification
from lmforge.train import distributed
from lmforge.train.plot import plot_metrics
from lmforge.train.state import set_seed
from lmforge.train.trainer import TrainConfig, Trainer
from lmforge.utils import strict_json
from lmforge.utils.atomic import atomic_file, clean_stale_temps
from lmforge.utils.checks import AT_LEAST_1, DROPOUT, NON_NEGATIVE, POSITIVE, SEQ_LEN, Range, check_fields, rule

log = logging.getLogger(__name__)


# The ranges of the --method knobs (MethodConfig lives in adapters/, which knows nothing of the CLI).
METHOD_RULES = {"freeze_layers": NON_NEGATIVE, "lora_r": AT_LEAST_1, "lora_alpha": POSITIVE,
                "lora_dropout": DROPOUT, "adapter_size": AT_LEAST_1, "prefix_length": AT_LEAST_1}
LABEL_TYPES = ("auto", "class", "float")


@dataclass
class FinetuneConfig:
    model: str = "minilm"
    # data-to-text from scratch: a new model of this preset (models/presets.py) and --size, with
    # the vocabulary of `tokenizer` (default: --model's), instead of --model's weights
    arch: str | None = None
    size: str = "small"
    tokenizer: str | None = None
    task: str | None = "glue/sst2"        # a GLUE task, or None with train_file/dev_file
    data_dir: str | None = None           # GLUE layout; default $LMFORGE_DATA/glue
    train_file: str | None = None
    dev_file: str | None = None
    text_col: str = "text"
    pair_col: str | None = None
    label_col: str = "label"
    label_type: str = "auto"              # auto | class | float
    skip_bad_rows: bool = False
    adapt: MethodConfig = field(default_factory=MethodConfig)   # --method and its size knobs
    max_seq_len: int = field(default=128, metadata=rule(SEQ_LEN))
    packed: bool = True                   # unpadded execution (models/packing.py); False = padded batches
    # length-bucketed batches by token budget, not batch_size
    batch_tokens: int | None = field(default=None, metadata=rule(AT_LEAST_1))
    max_train_samples: int | None = field(default=None, metadata=rule(AT_LEAST_1))
    max_eval_samples: int | None = field(default=None, metadata=rule(AT_LEAST_1))
    eval_batch_size: int = field(default=128, metadata=rule(AT_LEAST_1))
    classifier_dropout: float | None = field(default=None, metadata=rule(DROPOUT))
    # data-to-text (decoders): label smoothing of the target tokens' loss, GPT's auxiliary LM weight
    # lambda (L3 = L2 + lambda L1, L1 over the prompt tokens), and how evaluation decodes
    label_smoothing: float = field(default=0.0, metadata=rule(Range(lo=0, hi=1, hi_open=True)))
    lm_aux_weight: float = field(default=0.0, metadata=rule(NON_NEGATIVE))
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir="runs/finetune"))

    @classmethod
    def from_dict(cls, d: dict) -> "FinetuneConfig":
        d = {"packed": False, **d}  # runs saved before packed execution ran padded
        d.pop("resolved", None)      # what auto meant on the machine that ran it: a record, not a setting
        d["train"] = TrainConfig(**d["train"])
        d["adapt"] = MethodConfig(**d["adapt"])
        d["decoding"] = DecodingConfig(**d.get("decoding", {}))
        return cls(**d)

    def validate(self) -> None:
        """ConfigError naming the option of the first bad setting; reads nothing, writes nothing."""
        check_fields(self)
        for name, r in METHOD_RULES.items():
            why = r.problem(getattr(self.adapt, name))
            if why:
                raise ConfigError(f"--{name.replace('_', '-')} {why}")
        self.decoding.validate()
        if (self.label_smoothing or self.lm_aux_weight) and not is_nlg_task(self.task):
            raise ConfigError("--label-smoothing and --lm-aux-weight apply to data-to-text tasks "
                              f"(--task e2e | webnlg | dart), not {self.task or 'your own files'}")
        if self.label_type not in LABEL_TYPES:
            raise ConfigError(f"--label-type {self.label_type!r} is not one of {', '.join(LABEL_TYPES)}")
        if self.batch_tokens is not None and self.batch_tokens < self.max_seq_len:
            raise ConfigError(f"--batch-tokens {self.batch_tokens} is less than --max-seq-len "
                              f"{self.max_seq_len}: a budget must hold at least one whole sequence")
        if self.batch_tokens is None:  # a token budget is split as it falls, never refused
            distributed.check_batch_size(self.train.batch_size)
        if self.arch is not None:
            from lmforge.models.presets import ARCHS, SIZES
            if not is_nlg_task(self.task):
                raise ConfigError(f"--arch trains a new model from scratch for a data-to-text task (--task e2e | "
                                  f"webnlg | dart), not {self.task or 'your own files'}; fine-tune a --model there")
            if self.arch not in ARCHS or self.size not in SIZES:
                raise ConfigError(f"--arch {self.arch!r} --size {self.size!r}: expected one of {', '.join(ARCHS)} "
                                  f"and one of {', '.join(SIZES)}")
            from lmforge.models.config import DECODERS, ENCODER_DECODERS
            if ARCHS[self.arch].get("model_type", "bert") not in DECODERS + ENCODER_DECODERS:
                raise ConfigError(f"--arch {self.arch}: not a decoder (a data-to-text task trains a causal LM, "
                                  "--arch gpt2 or llama, or the encoder-decoder, --arch transformer)")
            if self.adapt.method != "full":
                raise ConfigError(f"--arch trains every weight of a new model: --method full, not {self.adapt.method}")
        elif self.tokenizer is not None:
            raise ConfigError("--tokenizer goes with --arch (a new model); a pretrained --model brings its own")
        if distributed.world().active and self.adapt.method == "features":
            raise ConfigError("--method features fits its probe in one process: run it without torchrun")
        self.train.validate()


# Settings --resume may change: the progress bar changes nothing computed, and --skip-nonfinite is
# how a run stopped by a NaN continues from its last good checkpoint.
_RESUME_FREE = {"train.progress_bar", "train.skip_nonfinite"}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume(run_file: Path, cfg: FinetuneConfig) -> None:
    """--resume continues the run in run_file's directory only with the settings it was started with;
    otherwise a ConfigError names the first setting that differs, and nothing is changed."""
    try:
        saved = _flat(asdict(FinetuneConfig.from_dict(json.loads(run_file.read_text(encoding="utf-8")))))
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{run_file}: cannot read the interrupted run's settings ({e})") from None
    now = _flat(asdict(cfg))
    differ = [k for k in sorted(saved.keys() | now.keys())
              if k not in _RESUME_FREE and saved.get(k) != now.get(k)]
    if differ:
        k = differ[0]
        more = f" (and {len(differ) - 1} more: {', '.join(differ[1:4])})" if len(differ) > 1 else ""
        raise ConfigError(f"{run_file}: --resume needs the same settings as the interrupted run; {k} was "
                          f"{saved.get(k)!r}, now {now.get(k)!r}{more}. Run again with the same options, "
                          "or without --resume to start over")


def _write_json(path: Path, obj) -> None:
    with atomic_file(path, "w") as f:
        strict_json.dump(obj, f, indent=1)


def best_saver(spec, out: Path, cfg, tokenizer):
    """The trainer's on_best: saves only what the method changed under out/best (megabytes, not the
    model: full/freeze the model, LoRA its adapter and head) with the metrics that made it best."""
    def on_best(model, metrics):
        spec.save(model, out / "best", cfg.adapt, cfg.model, tokenizer)
        _write_json(out / "best" / "metrics.json", metrics)
    return on_best


def budget_plan(encoded, cfg):
    """The trainer's batch plan: token-budget batches with --batch-tokens, else None (fixed-size)."""
    if not cfg.batch_tokens:
        return None
    lengths = [len(e.input_ids) for e in encoded]
    return lambda epoch: token_budget_batches(lengths, cfg.batch_tokens, cfg.train.seed, epoch)


def evaluate_model(model, data: TaskData, encoded_dev, pad_id: int, batch_size: int = 128,
                   packed: bool = True) -> dict:
    return dev_evaluation(data, encoded_dev, pad_id, batch_size, packed)(model)


def dev_evaluation(data: TaskData, encoded_dev, pad_id: int, batch_size: int = 128, packed: bool = True):
    """The task's dev metrics of a model's predictions; several processes each predict a share."""
    from lmforge.train.evaluation import PredictionEvaluation

    def predict(model, indices):
        logits = predict_logits(model, [encoded_dev[i] for i in indices], pad_id, batch_size, packed=packed)
        return logits[:, 0] if data.regression else logits.argmax(-1)

    return PredictionEvaluation(len(encoded_dev), predict,
                                lambda preds: compute_metrics(data.metrics, preds.numpy(), [e.label for e in data.dev]))


def run_finetune(cfg: FinetuneConfig, resume: bool = False) -> dict:
    # Everything that can be refused is checked, and all inputs read, before the run directory is
    # touched: a failed command must not rewrite the run.json of the interrupted run it points at.
    if is_nlg_task(cfg.task):
        from lmforge.train.data_to_text import run_data_to_text
        return run_data_to_text(cfg, resume)
    cfg.validate()
    out = Path(cfg.train.out_dir)
    run_file = out / "run.json"
    if resume and run_file.is_file():
        check_resume(run_file, cfg)
    started = time.perf_counter()
    data = load_task_data(cfg)
    if not data.train:
        raise ConfigError(f"{data.name}: the training set is empty")
    tokenizer = load_tokenizer(cfg.model)
    device = distributed.init(resolve_device(cfg.train.device))   # a no-op in a single process
    main = distributed.world().is_main
    precision = resolve_precision(cfg.train.precision, device)
    set_seed(cfg.train.seed)  # the new head's initialisation is part of the run
    model = from_pretrained(
        cfg.model, head="classification", num_labels=1 if data.regression else len(data.labels),
        id2label=None if data.regression else dict(enumerate(data.labels)),
        problem_type="regression" if data.regression else "single_label_classification",
        classifier_dropout=cfg.classifier_dropout, device=device,
    )
    max_len = min(cfg.max_seq_len, model.config.max_position_embeddings)
    spec = apply_method(model, cfg.adapt)   # the method family (adapters/methods.py): one dispatch
    trainable, total = parameter_counts(model)
    resolved = {"device": str(device), "precision": precision.name, "precision_why": precision.why}
    if main:
        out.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(out)
        _write_json(run_file, {**asdict(cfg), "resolved": resolved})
        print(f"device {device}, precision {precision}", flush=True)
    method = cfg.adapt.method

    if not spec.trains_model:  # features: the probe is what trains, not the model's head
        from lmforge.train.features import fit_features
        metrics, trainable = fit_features(model, tokenizer, data, cfg, max_len, out / "best")
        print(f"features: trainable params: {trainable:,} (the linear probe) / {total:,} frozen", flush=True)
        result = {"steps": 0, "best_metric": metrics[data.main_metric], "last_eval": metrics}
    else:
        if main:
            print(f"{method}: {describe_parameters(model)}", flush=True)
        train_enc = encode_examples(tokenizer, data.train, max_len)
        dev_enc = encode_examples(tokenizer, data.dev, max_len)
        pad = tokenizer.pad_token_id

        trainer = Trainer(
            model, cfg.train, train_enc, batch_plan=budget_plan(train_enc, cfg),
            collate=(lambda items: collate_packed(items, data.regression)) if cfg.packed
            else (lambda items: collate(items, pad, data.regression)),
            objective=SequenceClassification(regression=data.regression),
            evaluate=dev_evaluation(data, dev_enc, pad, cfg.eval_batch_size, cfg.packed),
            main_metric=data.main_metric, on_best=best_saver(spec, out, cfg, tokenizer),
        )
        with routing.using(spec.adapter):  # every forward pass of the run (and its evaluations) routes to it
            result = trainer.train(resume=resume)
        if main:
            plot_metrics(out / "metrics.jsonl", out / "curves.png", f"{data.name} · {method}")
    best = json.loads((out / "best" / "metrics.json").read_text()) if (out / "best" / "metrics.json").is_file() \
        else result["last_eval"]
    summary = {"task": data.name, "model": cfg.model, "method": method, "seed": cfg.train.seed,
               "trainable_params": trainable, "total_params": total, "main_metric": data.main_metric,
               "best": best, "best_step": result.get("best_step"), "steps": result["steps"],
               "skipped_steps": result.get("skipped_steps", 0), **resolved,
               "epochs": cfg.train.epochs, "max_steps": cfg.train.max_steps, "train_examples": len(data.train), "dev_examples": len(data.dev),
               # an interrupted run counts its time up to the checkpoint it resumed from
               "wall_time_s": round(time.perf_counter() - started + result.get("resumed_elapsed_s", 0.0), 1)}
    if main:
        _write_json(out / "summary.json", summary)
    return summary
