"""Pre-train a model on a corpus: masked LM (+ next-sentence prediction) or a causal LM.

  lmforge pretrain --arch cramming --size mini --objective mlm --corpus data/wiki --max-seq-len 128 \\
      --batch-size 64 --lr 1e-3 --warmup 0.1 --minutes 60 --out runs/cram
  lmforge pretrain --arch bert --size tiny --objective mlm,nsp --corpus books/ --tokens 2000000 --out runs/bert
  lmforge pretrain --arch gpt2 --size tiny --objective clm --tokenizer runs/tok --corpus input.txt \\
      --max-steps 2000 --out runs/gpt
  lmforge pretrain --init minilm --objective mlm --corpus mine/ --max-steps 500 --out runs/minilm-more

Architectures (--arch; --size tiny|mini|small|base, or --config FILE with ModelConfig fields):
  bert      post-LayerNorm, biases, GELU, learned positions (mlm, nsp, mlm,nsp)
  roberta   BERT's network with RoBERTa's conventions (mlm; give a byte-bpe --tokenizer)
  gpt2      a pre-LayerNorm decoder (clm; give a --tokenizer)
  llama     pre-RMSNorm, SwiGLU, rotary positions, no biases (clm; give a --tokenizer)
  cramming  pre-LayerNorm, no linear biases, gated FFN, scaled sinusoidal positions, no dropout,
            fully packed blocks (saved in lmforge's format: transformers has no such class);
            a triangular one-cycle schedule as Cramming's: --schedule linear --warmup 0.5 --lr 1e-3
Budgets: --tokens N (positions: batch x length per micro-batch), --minutes M (the learning rate
schedule then runs over the time), --max-steps N. The model is written to OUT/model (with its
tokenizer), ready for `lmforge finetune --model OUT/model`.
"""

from __future__ import annotations

from lmforge.cli.validate import field_type, ranged, writable_dir
from lmforge.data.pretrain import MASKINGS, PACKINGS
from lmforge.kernels.precision import DEVICES, PRECISIONS
from lmforge.train.trainer import SCHEDULES, TrainConfig
from lmforge.utils import checks

ARCHS = ("bert", "roberta", "gpt2", "llama", "cramming", "transformer")   # models/presets.py (not imported: the CLI starts fast)
SIZES = ("tiny", "mini", "small", "base")


def T(name: str):
    return field_type(TrainConfig, name)


def add_parser(p) -> None:
    model = p.add_argument_group("model")
    model.add_argument("--arch", choices=ARCHS, help="architecture preset (with --size)")
    model.add_argument("--size", choices=SIZES, help="tiny (2x128), mini (4x256), small (4x512), base (12x768)")
    model.add_argument("--config", dest="config_file", metavar="FILE",
                       help="a JSON file of ModelConfig fields (optionally \"arch\" and \"size\" to start from)")
    model.add_argument("--init", metavar="MODEL", help="continue pre-training this model (alias such as minilm, or a directory)")
    model.add_argument("--tokenizer", metavar="DIR",
                       help="tokenizer directory (default: the --init model's, else minilm's uncased WordPiece)")
    data = p.add_argument_group("data")
    data.add_argument("--objective", default="mlm", help="mlm | nsp | mlm,nsp | clm (default mlm)")
    data.add_argument("--corpus", required=True, nargs="+", metavar="PATH",
                      help=".txt, .txt.gz, .jsonl (text field) files or directories")
    data.add_argument("--valid", nargs="+", metavar="PATH", default=(),
                      help="held-out corpus files: the objective's loss and accuracies on them at each evaluation")
    data.add_argument("--eval-every", type=T("eval_every"), help="optimizer steps between evaluations "
                      "on --valid (default: at the end of each epoch and of the run)")
    data.add_argument("--eval-batches", type=ranged(int, checks.AT_LEAST_1), default=50,
                      help="batches of --valid per evaluation (default 50)")
    data.add_argument("--max-seq-len", type=ranged(int, checks.SEQ_LEN), default=128)
    data.add_argument("--packing", choices=PACKINGS,
                      help="default: segment-pair with nsp, clm with clm, blocks (fully packed, Cramming's) "
                           "for --arch cramming with mlm, else full-sentences")
    data.add_argument("--masking", choices=MASKINGS, default="dynamic")
    data.add_argument("--whole-word-masking", action="store_true")
    data.add_argument("--mlm-probability", type=ranged(float, checks.UNIT_INTERVAL), default=0.15)
    data.add_argument("--workers", type=ranged(int, checks.AT_LEAST_1), default=1,
                      help="processes that tokenize the corpus (once; the shards are cached)")
    data.add_argument("--cache-dir", help="where token shards are cached (default: ~/.cache/lmforge/shards)")
    train = p.add_argument_group("training")
    budget = train.add_mutually_exclusive_group(required=True)
    budget.add_argument("--tokens", type=ranged(int, checks.AT_LEAST_1), help="train on this many token positions")
    budget.add_argument("--minutes", type=T("max_minutes"), help="train for this much wall time")
    budget.add_argument("--max-steps", type=T("max_steps"), help="optimizer steps")
    d = TrainConfig(out_dir="")
    train.add_argument("--out", required=True, type=writable_dir, help="run directory")
    train.add_argument("--batch-size", type=T("batch_size"), default=32)
    train.add_argument("--grad-accum", type=T("grad_accum"), default=1)
    train.add_argument("--lr", type=T("lr"), default=5e-4)
    train.add_argument("--warmup", type=T("warmup_ratio"), default=0.06, help="warm-up as a fraction of the budget")
    train.add_argument("--schedule", choices=SCHEDULES, default="linear")
    train.add_argument("--weight-decay", type=T("weight_decay"), default=d.weight_decay)
    train.add_argument("--max-grad-norm", type=T("max_grad_norm"), default=d.max_grad_norm)
    train.add_argument("--save-every", type=T("save_every"), default=200, help="optimizer steps between checkpoints")
    train.add_argument("--log-every", type=T("log_every"), default=d.log_every)
    train.add_argument("--seed", type=T("seed"), default=d.seed)
    train.add_argument("--precision", choices=PRECISIONS, default="auto",
                       help="auto: bf16 compute (fp32 master weights) where the hardware has it, else fp32")
    train.add_argument("--device", choices=DEVICES, default="auto")
    train.add_argument("--skip-nonfinite", action="store_true")
    train.add_argument("--fsdp", action="store_true",
                       help="under torchrun: shard weights, gradients and optimizer state over the processes "
                            "(FSDP2) instead of replicating them; checkpoints are sharded (`lmforge export` "
                            "consolidates one)")
    train.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    train.add_argument("--no-progress", action="store_true")


def config_from_args(args):
    from lmforge.data.pretrain import PretrainDataConfig
    from lmforge.train.objectives import pretraining_objective
    from lmforge.train.pretrain import PretrainConfig

    objective = pretraining_objective(args.objective).name   # mlm | nsp | mlm,nsp | clm
    train = TrainConfig(
        out_dir=args.out, max_steps=args.max_steps, max_minutes=args.minutes, batch_size=args.batch_size,
        grad_accum=args.grad_accum, lr=args.lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup,
        schedule=args.schedule, max_grad_norm=args.max_grad_norm, save_every=args.save_every,
        log_every=args.log_every, eval_every=args.eval_every, seed=args.seed, precision=args.precision, device=args.device,
        progress_bar=not args.no_progress, skip_nonfinite=args.skip_nonfinite, fsdp=args.fsdp)
    packing = args.packing
    if packing is None and args.arch == "cramming" and objective == "mlm":
        packing = "blocks"   # Cramming trains on fully packed blocks
    data = PretrainDataConfig(
        corpus=tuple(args.corpus), objectives=tuple(objective.split(",")), packing=packing,
        max_seq_len=args.max_seq_len, batch_size=args.batch_size, masking=args.masking,
        whole_word=args.whole_word_masking, mlm_probability=args.mlm_probability, seed=args.seed,
        cache_dir=args.cache_dir, workers=args.workers)
    return PretrainConfig(data=data, train=train, arch=args.arch, size=args.size, config_file=args.config_file,
                          init=args.init, tokenizer=args.tokenizer, objective=objective, tokens=args.tokens,
                          valid=tuple(args.valid), eval_batches=args.eval_batches)


def run(args) -> int:
    from lmforge.train.distributed import world
    from lmforge.train.pretrain import run_pretrain
    from lmforge.utils import strict_json

    summary = run_pretrain(config_from_args(args), resume=args.resume)  # validates before writing
    if world().is_main:   # under torchrun, one summary line, not one per process
        print(strict_json.dumps(summary))
    return 0
