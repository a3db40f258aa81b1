"""Pre-train a model from a corpus: BERT's MLM (+ NSP), RoBERTa's recipe, GPT's causal LM, Cramming.

The architecture is a preset (`--arch` x `--size`, models/presets.py), a JSON file of ModelConfig
fields (`--config`), or an existing checkpoint to continue (`--init minilm`). Batches come from
data/pretrain.py (token shards, packing, masking), the loss from train/objectives.py, and the loop is
the shared Trainer (schedules, accumulation, clipping, precision, checkpoints that resume exactly).

A run directory holds:
  run.json        the resolved settings (what --resume must match)
  metrics.jsonl   loss, MLM loss and masked-token accuracy, NSP accuracy, perplexity (clm), tokens/s;
                  with --valid, the same metrics on held-out files at each evaluation ("eval")
  curves.png      those curves against optimizer steps
  checkpoint/     the latest training state, for --resume
  model/          the pre-trained model with its tokenizer: `lmforge finetune --model DIR/model`
                  reads it, and for BERT, RoBERTa and GPT-2 layouts so does `transformers`
  summary.json    steps, tokens, wall time, the last logged metrics

Under torchrun (several processes, train/distributed.py) --batch-size is the global batch: each rank
reads batch/N sequences of its own share of every epoch (data/pretrain.py deals them round-robin),
rank 0 builds the token-shard cache before the others read it, evaluates --valid, and alone writes
the run directory.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from pathlib import Path

from lmforge.data.pretrain import PretrainData, PretrainDataConfig
from lmforge.errors import ConfigError
from lmforge.train.evaluation import TalliesEvaluation
from lmforge.train import distributed, plot
from lmforge.train.objectives import pretraining_objective
from lmforge.train.state import set_seed
from lmforge.train.trainer import TrainConfig, Trainer
from lmforge.utils import strict_json
from lmforge.utils.atomic import atomic_file, clean_stale_temps
from lmforge.utils.checks import AT_LEAST_1, check_fields, rule

# the head each objective trains
HEADS = {"mlm": "mlm", "nsp": "nsp", "mlm,nsp": "pretraining", "clm": "causal-lm"}
DEFAULT_TOKENIZER = "minilm"   # BERT's uncased WordPiece vocabulary, bundled with the MiniLM model


@dataclass
class PretrainConfig:
    data: PretrainDataConfig
    train: TrainConfig
    arch: str | None = None               # a preset (with size), unless config_file or init says otherwise
    size: str | None = None
    config_file: str | None = None        # --config: a JSON file of ModelConfig fields
    init: str | None = None               # --init: continue pre-training this model (alias or directory)
    tokenizer: str | None = None          # a tokenizer directory; default: the init model's, else minilm's
    objective: str = "mlm"
    valid: tuple = ()                     # --valid: held-out corpus files, evaluated with the objective
    eval_batches: int = field(default=50, metadata=rule(AT_LEAST_1))   # batches of it per evaluation
    # --tokens: a budget of sequence positions (batch x length per micro-batch), turned into steps
    tokens: int | None = field(default=None, metadata=rule(AT_LEAST_1))

    @classmethod
    def from_dict(cls, d: dict) -> "PretrainConfig":
        d = dict(d)
        d.pop("resolved", None)
        data = dict(d.pop("data"))
        data["corpus"] = tuple(data["corpus"])
        data["objectives"] = tuple(data["objectives"])
        d["valid"] = tuple(d.get("valid", ()))
        return cls(data=PretrainDataConfig(**data), train=TrainConfig(**d.pop("train")), **d)

    @property
    def head(self) -> str:
        return HEADS[self.objective_key]

    @property
    def objective_key(self) -> str:
        return pretraining_objective(self.objective).name

    def validate(self) -> None:
        """ConfigError naming the option of the first bad setting; reads nothing but --config,
        writes nothing."""
        check_fields(self)
        key = self.objective_key     # refuses an unknown --objective
        sources = [s for s, given in (("--arch/--size", self.arch or self.size), ("--config", self.config_file),
                                      ("--init", self.init)) if given]
        if len(sources) != 1:
            raise ConfigError("give the model as one of --arch with --size, --config FILE or --init MODEL"
                              + (f" (got {' and '.join(sources)})" if sources else ""))
        if (self.arch is None) != (self.size is None):
            raise ConfigError("--arch and --size go together")
        if tuple(self.data.objectives) != tuple(key.split(",")):
            raise ConfigError(f"the data objectives {','.join(self.data.objectives)} differ from --objective {key}")
        if not (self.train.max_steps or self.train.max_minutes or self.tokens):
            raise ConfigError("give a budget: --tokens N, --minutes M or --max-steps N")
        self.data.check()
        distributed.check_batch_size(self.data.batch_size)
        self.train.validate()
        if self.init is None:
            self.model_config(vocab_size=2, pad_token_id=0)   # the architecture is refused now, not later

    def budget_steps(self) -> int | None:
        """Optimizer steps of a --tokens budget (every step sees batch x accumulation x length positions)."""
        if not self.tokens:
            return self.train.max_steps
        per_step = self.data.batch_size * self.train.grad_accum * self.data.max_seq_len
        return max(1, math.ceil(self.tokens / per_step))

    def model_config(self, **fields):
        """The ModelConfig of --arch/--size or --config with the head of the objective and `fields`
        (vocabulary size and ids from the tokenizer) on top; checked against the objective."""
        from lmforge.models.presets import config_from_file, preset

        fields = {"head": None, **fields}   # the objective's head once the trunk fits it
        config = (config_from_file(self.config_file, **fields) if self.config_file
                  else preset(self.arch, self.size, **fields))
        check_model(config, self.objective_key, self.data.max_seq_len)
        try:
            return config.replace(head=self.head)
        except ConfigError as e:
            raise ConfigError(f"--objective {self.objective_key}: {e}") from None


def check_model(config, objective: str, max_seq_len: int) -> None:
    if config.is_encoder_decoder:
        raise ConfigError("an encoder-decoder (--arch transformer) is trained on sequence pairs: "
                          "lmforge finetune --arch transformer --task e2e|webnlg|dart, not pretrain")
    if objective == "clm" and not config.causal:
        raise ConfigError(f"--objective clm needs a decoder (--arch gpt2 or llama), not {config.model_type}")
    if objective != "clm" and config.causal:
        raise ConfigError(f"--objective {objective} needs an encoder (bert, roberta, cramming), not a decoder")
    room = config.max_position_embeddings - config.position_offset
    if max_seq_len > room:
        raise ConfigError(f"--max-seq-len {max_seq_len} is more than the model's {room} positions")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


# what --resume may change: nothing computed depends on them
_RESUME_FREE = {"train.progress_bar", "train.skip_nonfinite", "data.workers", "data.cache_dir"}


def check_resume(run_file: Path, cfg: PretrainConfig) -> None:
    try:
        saved = _flat(asdict(PretrainConfig.from_dict(json.loads(run_file.read_text(encoding="utf-8")))))
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{run_file}: cannot read the interrupted run's settings ({e})") from None
    now = _flat(asdict(cfg))
    differ = [k for k in sorted(saved.keys() | now.keys()) if k not in _RESUME_FREE and saved.get(k) != now.get(k)]
    if differ:
        k = differ[0]
        raise ConfigError(f"{run_file}: --resume needs the same settings as the interrupted run; {k} was "
                          f"{saved.get(k)!r}, now {now.get(k)!r}. Run again with the same options, or "
                          "without --resume to start over")


def _say(message: str) -> None:
    if distributed.world().is_main:
        print(message, file=sys.stderr, flush=True)


def build_model(cfg: PretrainConfig, tokenizer, device):
    """The model to train: a fresh preset/--config model sized to the tokenizer, or --init's model
    with the objective's head (created when it has none, and said so)."""
    from lmforge.models import Model, from_pretrained, load_config
    from lmforge.models.hf import variant_features

    if cfg.init is not None:
        saved = load_config(cfg.init)
        model = from_pretrained(cfg.init, head=cfg.head, device=device)
        check_model(model.config, cfg.objective_key, cfg.data.max_seq_len)
        if model.config.vocab_size < tokenizer.vocab_size:
            raise ConfigError(f"--tokenizer has {tokenizer.vocab_size} tokens, the --init model only "
                              f"{model.config.vocab_size} embeddings")
        if saved.head != cfg.head:
            fresh = sum(p.numel() for n, p in model.named_parameters() if n.startswith("head."))
            what = {None: "no head", "classification": "a classification head"}.get(saved.head, f"a {saved.head} head")
            _say(f"--init {cfg.init}: the checkpoint has {what}, not a {cfg.head} head: initialised one "
                 f"({fresh:,} new parameters; the output embeddings are the input ones)")
        return model
    pad = tokenizer.pad_token_id
    config = cfg.model_config(vocab_size=tokenizer.vocab_size, pad_token_id=pad,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    missing = variant_features(config)
    if missing:
        _say(f"note: transformers has no class for this architecture ({', '.join(missing)}); the model is "
             "saved in lmforge's format (model_type 'lmforge'), which lmforge loads and fine-tunes")
    return Model(config).to(device)


def run_pretrain(cfg: PretrainConfig, resume: bool = False) -> dict:
    """Validate everything, then train; returns the summary (also written to summary.json)."""
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.kernels import resolve_device, resolve_precision
    from lmforge.models import Model, save_pretrained

    cfg.validate()
    out = Path(cfg.train.out_dir)
    run_file = out / "run.json"
    if resume and run_file.is_file():
        check_resume(run_file, cfg)
    started = time.perf_counter()
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.init or DEFAULT_TOKENIZER)
    device = distributed.init(resolve_device(cfg.train.device))   # a no-op in a single process
    world = distributed.world()
    precision = resolve_precision(cfg.train.precision, device)
    set_seed(cfg.train.seed)  # the initialisation is part of the run
    model = build_model(cfg, tokenizer, device)
    with distributed.main_first():   # rank 0 tokenizes into the shard cache, the others read it
        data = PretrainData(replace(cfg.data, batch_size=cfg.data.batch_size // world.world_size), tokenizer,
                            world.rank, world.world_size, progress=cfg.train.progress_bar and world.is_main)
    objective = pretraining_objective(cfg.objective)
    evaluate = None
    if cfg.valid:
        # the same packing and masking over the held-out files; masks of epoch 0, so every
        # evaluation scores the same predictions. Every rank reads them: under several processes
        # each evaluates its share of the batches (train/evaluation.py), or, sharded, all of them.
        with distributed.main_first():   # rank 0 tokenizes into the shard cache, the others read it
            valid = PretrainData(replace(cfg.data, corpus=tuple(cfg.valid)), tokenizer,
                                 progress=cfg.train.progress_bar and world.is_main)
        start = valid.state_dict()

        def valid_batches():
            valid.load_state_dict(start)
            return islice(valid.batches(0), cfg.eval_batches)
        evaluate = TalliesEvaluation(objective, valid_batches, device)
    steps = cfg.budget_steps()
    train = TrainConfig(**{**asdict(cfg.train), "max_steps": steps, "sparse_embedding_grads": False})
    resolved = {"device": str(device), "precision": precision.name, "precision_why": precision.why,
                "max_steps": steps, "model": model.config.to_dict()}
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(out)
        _write_json(run_file, {**asdict(cfg), "resolved": resolved})
    _say(f"device {device}, precision {precision}")
    _say(f"pretrain {objective.name}: {model.num_parameters():,} parameters, {data.n_examples:,} sequences "
         f"of <= {cfg.data.max_seq_len} tokens ({data.packing}), {len(data):,} batches an epoch"
         + (f", {steps:,} steps" if steps else "") + (f", {cfg.train.max_minutes:g} minutes" if cfg.train.max_minutes else ""))
    trainer = Trainer(model, train, data, None, objective, evaluate=evaluate, main_metric="loss",
                      greater_is_better=False)
    result = trainer.train(resume=resume)
    weights = distributed.full_state_dict(model) if distributed.is_sharded(model) else None  # all ranks gather
    if not world.is_main:
        return {"steps": result["steps"], "tokens": result["tokens"]}
    if weights is not None:   # the sharded model, whole again in an ordinary one
        model = Model(model.config)
        model.load_state_dict(weights)
    save_pretrained(model, out / "model", tokenizer)
    plot.plot_pretraining(out / "metrics.jsonl", out / "curves.png", f"{_describe(cfg, model)} · {objective.name}")
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last = next((r for r in reversed(logged) if "loss" in r), {})
    summary = {"objective": objective.name, "model": _describe(cfg, model), "parameters": model.num_parameters(),
               "steps": result["steps"], "tokens": result["tokens"], "skipped_steps": result["skipped_steps"],
               "last": {k: v for k, v in last.items() if k not in ("step", "epoch")},
               "valid": result["last_eval"] or None,
               "device": resolved["device"], "precision": resolved["precision"],
               "wall_time_s": round(time.perf_counter() - started + result.get("resumed_elapsed_s", 0.0), 1)}
    _write_json(out / "summary.json", summary)
    return summary


def _describe(cfg: PretrainConfig, model) -> str:
    if cfg.init:
        return f"{cfg.init} (continued)"
    return cfg.config_file or f"{cfg.arch}-{cfg.size}"


def _write_json(path: Path, obj) -> None:
    with atomic_file(path, "w") as f:
        strict_json.dump(obj, f, indent=1)
