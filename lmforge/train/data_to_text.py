"""Fine-tune a decoder on a data-to-text task (E2E, WebNLG, DART; data/nlg.py) and evaluate it the
way the LoRA paper does: one generated output per unique input, scored against all its references.

Training runs the one loop (train/trainer.py) with the DataToText objective (train/objectives.py):
prompt = source + " ||", target = " " + reference + the end token, the loss on the target tokens
only, optional label smoothing and GPT's auxiliary LM term over the prompt tokens. Each evaluation
during training is the teacher-forced loss on the dev references (the best step's model is kept in
best/). After training, best/ is loaded as `lmforge evaluate --run` loads it, every unique dev input
is decoded (beam search by default: the paper's beam 10, length penalty 0.8, no-repeat-n-gram 4) in
batches, and the outputs are written one per line and scored (train/nlg_metrics.py):

  predictions-dev.txt   one output per unique dev input, in the split's order
  eval-dev.json         {"task", "split", "inputs", "references", "BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr", ...}

Decoding goes through models.generate.generate(). Its no-repeat-n-gram blocking covers the prompt
and the output together by default (no_repeat_ngram_scope="all", as transformers' does); the LoRA
repository's gpt2_beam.py blocks n-grams of the output alone ("output", --no-repeat-ngram-scope
output). The difference matters: 51.6% of E2E dev references (4,672, SmolLM2's tokenizer) contain a
4-token span of their own prompt (names, areas), which blocking over the prompt forbids, so with
no_repeat_ngram=4 the default is stricter than the paper's decoding; benchmarks/e2e.py decodes with
"output".
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lmforge.errors import ConfigError
from lmforge.models.beam_search import NGRAM_SCOPES
from lmforge.utils.checks import AT_LEAST_1, NON_NEGATIVE, Range, check_fields, rule

# Methods that cannot train a decoder for generation here, and why (one line each).
UNSUPPORTED = {
    "features": "fits a classifier probe on frozen features; a data-to-text model must generate",
}


@dataclass
class DecodingConfig:
    """How evaluation decodes: beam search with the LoRA paper's NLG settings by default."""
    beams: int = field(default=10, metadata=rule(AT_LEAST_1))
    length_penalty: float = field(default=0.8, metadata=rule(Range()))
    no_repeat_ngram: int = field(default=4, metadata=rule(NON_NEGATIVE))
    # "all": no n-gram of prompt + output repeats (transformers); "output": of the output alone (the paper's code)
    no_repeat_ngram_scope: str = "all"
    max_new_tokens: int = field(default=80, metadata=rule(AT_LEAST_1))
    batch_size: int = field(default=8, metadata=rule(AT_LEAST_1, "--gen-batch-size"))  # prompts per generate call

    def validate(self) -> None:
        check_fields(self)
        if self.no_repeat_ngram_scope not in NGRAM_SCOPES:
            raise ConfigError(f"--no-repeat-ngram-scope must be one of {', '.join(NGRAM_SCOPES)}, "
                              f"got {self.no_repeat_ngram_scope!r}")


def check_method(method: str) -> None:
    if method in UNSUPPORTED:
        raise ConfigError(f"--method {method} {UNSUPPORTED[method]}")


def capped(data, n: int | None):
    """The first n unique inputs of an EvalSet (all of them when n is None)."""
    if n is None or n >= len(data):
        return data
    return dataclasses.replace(data, sources=data.sources[:n], references=data.references[:n])


def end_token(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no end-of-text token: a data-to-text target must end with one")
    return int(eos)


def check_decoder(config, name: str) -> None:
    if not (config.causal or config.is_encoder_decoder):
        raise ConfigError(f"{name}: a {config.model_type} model is not a decoder (data-to-text tasks train a causal "
                          "LM, gpt2 or llama, or an encoder-decoder: --arch transformer)")


def new_model(cfg, tokenizer, device):
    """A new model of cfg.arch at cfg.size (from scratch) for `tokenizer`'s vocabulary, with a causal-LM head."""
    from lmforge.models.model import Model
    from lmforge.models.presets import preset

    eos = end_token(tokenizer)
    config = preset(cfg.arch, cfg.size, vocab_size=tokenizer.vocab_size, head="causal-lm",
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                    # an encoder-decoder's decoder starts from bos, else from the end token (as Marian from pad)
                    bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos)
    return Model(config).to(device)


def collate_for(config, pad: int):
    """The batch layout of a decoder (prompt then target in one sequence) or an encoder-decoder (the
    prompt as its source)."""
    from lmforge.data import nlg

    if config.is_encoder_decoder:
        return lambda items: nlg.collate_seq2seq(items, pad, config.decoder_start_token_id)
    return lambda items: nlg.collate(items, pad)


def one_line(text: str) -> str:
    return " ".join(text.split())


def generate_outputs(model, tokenizer, sources, decoding: DecodingConfig, eos_id: int,
                     adapter: str | None = None, precision=None, progress: bool = False) -> list[str]:
    """One output per source, in order: prompts of similar length decoded together in left-padded
    batches of decoding.batch_size, each output cut at the end token and made one line."""
    from tqdm import tqdm

    from lmforge.data import nlg
    from lmforge.models import routing
    from lmforge.models.generate import generate

    prompts = [nlg.prompt_ids(tokenizer, s) for s in sources]
    limit = model.config.max_position_embeddings
    for p, s in zip(prompts, sources):
        if len(p) + decoding.max_new_tokens > limit:
            raise ConfigError(f"input {s[:40]!r}...: its prompt of {len(p)} tokens + --max-new-tokens "
                              f"{decoding.max_new_tokens} exceed the model's {limit} positions")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[str | None] = [None] * len(prompts)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(prompts), desc="generate", unit="input", disable=not progress, dynamic_ncols=True)
    try:
        with routing.using(adapter), torch.no_grad(), \
                (precision.autocast(device) if precision is not None else contextlib.nullcontext()):
            for start in range(0, len(order), decoding.batch_size):
                chunk = order[start:start + decoding.batch_size]
                ids, mask = nlg.prompt_batch([prompts[i] for i in chunk], pad)
                out = generate(model, ids.to(device), mask.to(device), max_new_tokens=decoding.max_new_tokens,
                               num_beams=decoding.beams, length_penalty=decoding.length_penalty,
                               no_repeat_ngram_size=decoding.no_repeat_ngram,
                               no_repeat_ngram_scope=decoding.no_repeat_ngram_scope, eos_token_id=eos_id,
                               pad_token_id=pad)
                for i, row in zip(chunk, out[:, ids.shape[1]:].tolist()):
                    if eos_id in row:
                        row = row[:row.index(eos_id)]
                    outputs[i] = one_line(tokenizer.decode(row))
                bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
    return outputs  # type: ignore[return-value]


def evaluate_generation(model, tokenizer, data, decoding: DecodingConfig, eos_id: int, predictions: Path,
                        adapter: str | None = None, precision=None, reference_set: str = "official",
                        progress: bool = False) -> dict:
    """Decode every unique input of `data` (an nlg.EvalSet), write the outputs one per line to
    `predictions` and score them: one JSON-able dict."""
    from lmforge.train.nlg_metrics import nlg_scores
    from lmforge.utils.atomic import atomic_file

    started = time.perf_counter()
    outputs = generate_outputs(model, tokenizer, data.sources, decoding, eos_id, adapter, precision, progress)
    seconds = time.perf_counter() - started
    predictions.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(predictions, "w") as f:
        f.write("".join(o + "\n" for o in outputs))
    scores = nlg_scores(outputs, data.references)
    return {"task": data.task, "split": data.split, "inputs": len(data), "references": data.n_references,
            "reference_set": reference_set, **scores, "predictions": str(predictions),
            "decoding": asdict(decoding), "generation_s": round(seconds, 1)}


def load_run_model(run_dir, device) -> tuple:
    """(model, adapter, run settings) of a data-to-text run directory: best/ loaded as its method
    saved it, confined to the run directory (utils/confine.py), and run.json's settings."""
    from lmforge.adapters.methods import load_run
    from lmforge.utils.confine import Confined, private_run_copy

    run_dir = Path(run_dir)
    confined = Confined(run_dir)   # paths below it are relative to it (a relative run_dir would count twice)
    if not confined.is_file("run.json"):
        raise ConfigError(f"{run_dir}: no run.json (a data-to-text run directory written by lmforge finetune)")
    settings = confined.read_json("run.json")
    if settings.get("task") not in ("e2e", "webnlg", "dart"):
        raise ConfigError(f"{run_dir / 'run.json'}: task {settings.get('task')!r} is not a data-to-text task")
    with private_run_copy(run_dir) as (_, files):
        model, adapter = load_run(files, str(device))
    if model.config.head != "causal-lm":
        raise ConfigError(f"{run_dir}: best/ holds a {model.config.head} model, not a causal LM")
    return model.to(device).eval(), adapter, settings


def run_data_to_text(cfg, resume: bool = False) -> dict:
    """`lmforge finetune --task e2e|webnlg|dart`: train, keep the best dev-loss model, generate, score."""
    from lmforge.adapters.methods import apply_method, describe_parameters, parameter_counts
    from lmforge.data import nlg
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.kernels import resolve_device, resolve_precision
    from lmforge.models import from_pretrained, routing
    from lmforge.train import distributed
    from lmforge.train.finetune import _write_json, best_saver, budget_plan, check_resume
    from lmforge.train.evaluation import TalliesEvaluation
    from lmforge.train.objectives import DataToText
    from lmforge.train.plot import plot_metrics
    from lmforge.train.state import set_seed
    from lmforge.train.trainer import Trainer
    from lmforge.utils.atomic import clean_stale_temps

    cfg.validate()
    if cfg.train_file or cfg.dev_file:
        raise ConfigError(f"--task {cfg.task} reads its own files; drop --train/--dev")
    check_method(cfg.adapt.method)
    objective = DataToText(label_smoothing=cfg.label_smoothing, lm_aux_weight=cfg.lm_aux_weight, packed=cfg.packed)
    if cfg.arch is None:
        from lmforge.models.checkpoint import load_config
        check_decoder(load_config(cfg.model, "auto"), cfg.model)
    out = Path(cfg.train.out_dir)
    run_file = out / "run.json"
    if resume and run_file.is_file():
        check_resume(run_file, cfg)
    started = time.perf_counter()
    train = nlg.train_examples(cfg.task, cfg.data_dir)
    if cfg.max_train_samples is not None:
        train = train[:cfg.max_train_samples]
    dev = capped(nlg.eval_set(cfg.task, "dev", cfg.data_dir), cfg.max_eval_samples)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    eos = end_token(tokenizer)
    device = distributed.init(resolve_device(cfg.train.device))
    main = distributed.world().is_main
    precision = resolve_precision(cfg.train.precision, device)
    set_seed(cfg.train.seed)
    model = (new_model(cfg, tokenizer, device) if cfg.arch is not None
             else from_pretrained(cfg.model, head="causal-lm", device=device))
    if model.config.is_encoder_decoder and cfg.lm_aux_weight:
        raise ConfigError("--lm-aux-weight scores a decoder's prompt tokens; an encoder-decoder reads its "
                          "prompt in the encoder (drop --lm-aux-weight)")
    max_len = min(cfg.max_seq_len, model.config.max_position_embeddings)
    train_enc, cut = nlg.encode_examples(tokenizer, train, max_len, eos)
    dev_enc, _ = nlg.encode_examples(tokenizer, dev.examples(), max_len, eos)
    spec = apply_method(model, cfg.adapt)
    trainable, total = parameter_counts(model)
    resolved = {"device": str(device), "precision": precision.name, "precision_why": precision.why}
    method = cfg.adapt.method
    if main:
        out.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(out)
        _write_json(run_file, {**asdict(cfg), "resolved": resolved})
        print(f"device {device}, precision {precision}", flush=True)
        print(f"{method}: {describe_parameters(model)}", flush=True)
        print(f"{cfg.task}: {len(train_enc):,} training examples ({cut:,} cut to --max-seq-len {max_len}), "
              f"{len(dev):,} dev inputs with {dev.n_references:,} references", flush=True)
    pad = tokenizer.pad_token_id
    collate = collate_for(model.config, pad)
    dev_batches = [collate(dev_enc[i:i + cfg.eval_batch_size]) for i in range(0, len(dev_enc), cfg.eval_batch_size)]
    plain = DataToText(packed=cfg.packed)   # dev loss: the target tokens' plain cross-entropy

    trainer = Trainer(model, cfg.train, train_enc, collate=collate,
                      objective=objective, evaluate=TalliesEvaluation(plain, dev_batches, device),
                      main_metric="target_loss", greater_is_better=False, on_best=best_saver(spec, out, cfg, tokenizer),
                      batch_plan=budget_plan(train_enc, cfg))
    with routing.using(spec.adapter):
        result = trainer.train(resume=resume)
    train_s = result["elapsed_s"]   # the training loop's wall time (its dev-loss evaluations included)
    generation = None
    if main:
        plot_metrics(out / "metrics.jsonl", out / "curves.png", f"{cfg.task} · {method}")
        del model   # the best model is evaluated as `lmforge evaluate --run` would load it
        best_model, adapter, _ = load_run_model(out, device)
        generation = evaluate_generation(best_model, tokenizer, dev, cfg.decoding, eos, out / "predictions-dev.txt",
                                         adapter, precision, progress=cfg.train.progress_bar)
        _write_json(out / "eval-dev.json", generation)
        print(json.dumps(generation), flush=True)
    best = json.loads((out / "best" / "metrics.json").read_text()) if (out / "best" / "metrics.json").is_file() \
        else result["last_eval"]
    summary = {"task": cfg.task, "model": cfg.model, "method": method, "seed": cfg.train.seed,
               "trainable_params": trainable, "total_params": total, "main_metric": "target_loss",
               "best": best, "best_step": result.get("best_step"), "steps": result["steps"],
               "skipped_steps": result.get("skipped_steps", 0), **resolved, "epochs": cfg.train.epochs,
               "max_steps": cfg.train.max_steps, "train_examples": len(train_enc), "dev_inputs": len(dev),
               "generation": generation, "train_time_s": round(train_s, 1),
               "wall_time_s": round(time.perf_counter() - started + result.get("resumed_elapsed_s", 0.0), 1)}
    if main:
        _write_json(out / "summary.json", summary)
    return summary
