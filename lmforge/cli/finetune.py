"""Fine-tune a pretrained encoder on a GLUE task or your own labelled CSV/TSV/JSONL files, or a decoder
on a data-to-text task (e2e, webnlg, dart), evaluated by generation.

  lmforge finetune --model minilm --task glue/sst2 --method full --out runs/sst2-full
  lmforge finetune --train train.csv --dev dev.csv --text-col review --label-col stars --out runs/mine
  lmforge finetune --model smollm2-135m --task e2e --method lora --lora-r 4 --lora-alpha 32 --out runs/e2e
"""

from __future__ import annotations

from lmforge.cli.validate import field_type, ranged, writable_dir
from lmforge.train.finetune import LABEL_TYPES, METHOD_RULES, FinetuneConfig
from lmforge.kernels.precision import DEVICES, PRECISIONS
from lmforge.models.beam_search import NGRAM_SCOPES
from lmforge.train.data_to_text import DecodingConfig
from lmforge.train.trainer import SCHEDULES, TrainConfig


# Option types from the config fields' rules (lmforge/utils/checks.py): one rule, two entry points.
def T(name: str):
    return field_type(TrainConfig, name)


def F(name: str):
    return field_type(FinetuneConfig, name)


def M(name: str, base: type = int):
    return ranged(base, METHOD_RULES[name])


def D(name: str):
    return field_type(DecodingConfig, name)


def add_decoding_args(p) -> None:
    """How data-to-text evaluation decodes (defaults: the LoRA paper's beam 10, length penalty 0.8,
    no-repeat-n-gram 4; its n-grams over prompt and output, where the paper's code blocks the output's
    alone: --no-repeat-ngram-scope output)."""
    d = DecodingConfig()
    p.add_argument("--beams", type=D("beams"), default=d.beams, help="e2e/webnlg/dart: beam search width")
    p.add_argument("--length-penalty", type=D("length_penalty"), default=d.length_penalty,
                   help="beam search: a hypothesis scores log p / length ** this")
    p.add_argument("--no-repeat-ngram", type=D("no_repeat_ngram"), default=d.no_repeat_ngram,
                   help="never repeat an n-gram of this size (0: off)")
    p.add_argument("--no-repeat-ngram-scope", choices=NGRAM_SCOPES, default=d.no_repeat_ngram_scope,
                   help="the n-grams --no-repeat-ngram blocks: the prompt's and the output's (all, as transformers "
                        "does) or the output's alone (output, as the LoRA paper's gpt2_beam.py does)")
    p.add_argument("--max-new-tokens", type=D("max_new_tokens"), default=d.max_new_tokens,
                   help="longest output, in tokens")
    p.add_argument("--gen-batch-size", type=D("batch_size"), default=d.batch_size,
                   help="inputs decoded together (each with --beams rows)")


def decoding_from_args(args) -> DecodingConfig:
    d = DecodingConfig()   # commands without these options (lmforge glue) keep the defaults
    return DecodingConfig(beams=getattr(args, "beams", d.beams),
                          length_penalty=getattr(args, "length_penalty", d.length_penalty),
                          no_repeat_ngram=getattr(args, "no_repeat_ngram", d.no_repeat_ngram),
                          no_repeat_ngram_scope=getattr(args, "no_repeat_ngram_scope", d.no_repeat_ngram_scope),
                          max_new_tokens=getattr(args, "max_new_tokens", d.max_new_tokens),
                          batch_size=getattr(args, "gen_batch_size", d.batch_size))


def add_data_args(p) -> None:
    p.add_argument("--model", default="minilm", help="model directory, alias or hub id (default: minilm)")
    p.add_argument("--arch", help="e2e/webnlg/dart: train a new model of this preset from scratch instead "
                                  "(transformer: the original encoder-decoder; gpt2, llama)")
    p.add_argument("--size", default="small", help="with --arch: tiny | mini | small | base")
    p.add_argument("--tokenizer", metavar="DIR", help="with --arch: its vocabulary (default: --model's tokenizer)")
    p.add_argument("--task", help="GLUE task, e.g. glue/sst2 (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli), "
                                  "or a data-to-text task for a decoder: e2e, webnlg, dart")
    p.add_argument("--data-dir", help="GLUE-layout directory (default: $LMFORGE_DATA/glue, else the datasets hub)")
    p.add_argument("--train", dest="train_file", help="your training file (.csv, .tsv, .jsonl)")
    p.add_argument("--dev", dest="dev_file", help="your dev file, same columns")
    p.add_argument("--text-col", default="text")
    p.add_argument("--text-pair-col", dest="pair_col")
    p.add_argument("--label-col", default="label")
    p.add_argument("--label-type", choices=LABEL_TYPES, default="auto",
                   help="float = regression; auto = float when every label parses as a number with a fraction")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip and count bad rows instead of stopping")
    p.add_argument("--max-train-samples", type=F("max_train_samples"))
    p.add_argument("--max-eval-samples", type=F("max_eval_samples"),
                   help="evaluate on the first N dev examples (e2e/webnlg/dart: the first N unique inputs)")


def add_parser(p) -> None:
    add_data_args(p)
    add_train_args(p)
    add_decoding_args(p)
    p.add_argument("--label-smoothing", type=F("label_smoothing"), default=0.0,
                   help="e2e/webnlg/dart: label smoothing of the reference tokens' loss (the LoRA paper: 0.1)")
    p.add_argument("--lm-aux-weight", type=F("lm_aux_weight"), default=0.0,
                   help="e2e/webnlg/dart: lambda of GPT's auxiliary LM loss over the prompt tokens (L2 + lambda L1)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")


def add_train_args(p) -> None:
    d = TrainConfig(out_dir="")
    p.add_argument("--method", default="full",
                   help="full | freeze | features | bitfit | lora | adapter-houlsby | adapter-pfeiffer | "
                        "adapter-l | prefix-embedding | prefix-layer")
    p.add_argument("--freeze-layers", type=M("freeze_layers"), default=0, help="with --method freeze: bottom layers to freeze")
    p.add_argument("--feature-pooling", choices=["mean", "cls"], default="mean")
    p.add_argument("--feature-pairs", choices=["separate", "joint"], default="separate",
                   help="with --method features on text pairs: encode each text alone and combine "
                        "[u, v, |u-v|, u*v] (separate), or encode the pair as one input (joint)")
    p.add_argument("--lora-r", type=M("lora_r"), default=8)
    p.add_argument("--lora-alpha", type=M("lora_alpha", float), default=16.0, help="scaling is alpha / r")
    p.add_argument("--lora-dropout", type=M("lora_dropout", float), default=0.1)
    p.add_argument("--lora-targets", default="query,value",
                   help="paths inside a layer: query,key,value,attention.output,intermediate,output")
    p.add_argument("--adapter-size", type=M("adapter_size"), default=64, help="bottleneck size of Houlsby/Pfeiffer adapters")
    p.add_argument("--prefix-length", type=M("prefix_length"), default=16, help="virtual tokens of prefix-embedding/-layer tuning")
    p.add_argument("--out", type=writable_dir, help="run directory")
    p.add_argument("--epochs", type=T("epochs"), default=d.epochs)
    p.add_argument("--max-steps", type=T("max_steps"), help="optimizer steps (overrides --epochs)")
    p.add_argument("--lr", type=T("lr"), default=d.lr)
    p.add_argument("--batch-size", type=T("batch_size"), default=d.batch_size)
    p.add_argument("--batch-tokens", type=F("batch_tokens"),
                   help="form batches of similar-length examples up to this many (padded) tokens "
                        "instead of --batch-size examples")
    p.add_argument("--padded", action="store_true",
                   help="run padded batches (the default packs each batch into one unpadded stream)")
    p.add_argument("--grad-accum", type=T("grad_accum"), default=d.grad_accum)
    p.add_argument("--max-seq-len", type=F("max_seq_len"), default=128)
    p.add_argument("--warmup-ratio", type=T("warmup_ratio"), default=d.warmup_ratio)
    p.add_argument("--weight-decay", type=T("weight_decay"), default=d.weight_decay)
    p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule)
    p.add_argument("--max-grad-norm", type=T("max_grad_norm"), default=d.max_grad_norm,
                   help="clip the gradient norm to this (0: no clipping)")
    p.add_argument("--eval-every", type=T("eval_every"), help="optimizer steps between dev evaluations (default: each epoch)")
    p.add_argument("--save-every", type=T("save_every"), help="optimizer steps between checkpoints (default: at evaluations)")
    p.add_argument("--log-every", type=T("log_every"), default=d.log_every)
    p.add_argument("--seed", type=T("seed"), default=d.seed)
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 compute (fp32 master weights) where the hardware has it (AMX, AVX512_BF16, "
                        "CUDA), else fp32; `lmforge env` says which")
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto: cuda when available, else cpu")
    p.add_argument("--classifier-dropout", type=F("classifier_dropout"))
    p.add_argument("--skip-nonfinite", action="store_true",
                   help="skip (and count) an optimizer step whose loss or gradient norm is NaN/Inf "
                        "instead of stopping the run")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard weights, gradients and optimizer state over the processes (FSDP2) "
                        "instead of replicating them; checkpoints are sharded, the best model is gathered whole")
    p.add_argument("--no-progress", action="store_true")


def config_from_args(args):
    from lmforge.adapters.methods import MethodConfig

    train = TrainConfig(
        out_dir=args.out, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
        grad_accum=args.grad_accum, lr=args.lr, weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio, schedule=args.schedule, max_grad_norm=args.max_grad_norm,
        eval_every=args.eval_every, save_every=args.save_every, log_every=args.log_every, seed=args.seed,
        precision=args.precision, device=args.device, progress_bar=not args.no_progress,
        skip_nonfinite=args.skip_nonfinite, fsdp=args.fsdp)
    return FinetuneConfig(
        model=args.model, arch=args.arch, size=args.size, tokenizer=args.tokenizer, task=args.task, data_dir=args.data_dir, train_file=args.train_file,
        dev_file=args.dev_file, text_col=args.text_col, pair_col=args.pair_col, label_col=args.label_col,
        label_type=args.label_type, skip_bad_rows=args.skip_bad_rows, max_seq_len=args.max_seq_len,
        adapt=MethodConfig(method=args.method, freeze_layers=args.freeze_layers,
                           feature_pooling=args.feature_pooling,
                           feature_pairs=args.feature_pairs, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                           lora_dropout=args.lora_dropout, lora_targets=args.lora_targets,
                           adapter_size=args.adapter_size, prefix_length=args.prefix_length),
        packed=not args.padded, batch_tokens=args.batch_tokens,
        max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
        classifier_dropout=args.classifier_dropout, label_smoothing=getattr(args, "label_smoothing", 0.0),
        lm_aux_weight=getattr(args, "lm_aux_weight", 0.0), decoding=decoding_from_args(args), train=train)


def run(args) -> int:
    from lmforge.train.distributed import world
    from lmforge.train.finetune import run_finetune
    from lmforge.utils import strict_json

    summary = run_finetune(config_from_args(args), resume=args.resume)  # validates before writing
    if world().is_main:   # under torchrun, one summary line, not one per process
        print(strict_json.dumps(summary))
    return 0
