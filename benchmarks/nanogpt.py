"""Causal-LM training against nanoGPT, side by side in one run, on the same token ids (issue #14).

  python -m benchmarks.nanogpt             # nanoGPT's README CPU recipe: 2,000 iterations
  python -m benchmarks.nanogpt --quick     # 300 iterations (a smoke run; not the target)

nanoGPT (../shared/anchors/nanogpt, MIT, run unchanged from a scratch copy) trains its CPU recipe:
4 layers, 4 heads, 128 wide, block 64, batch 12, no dropout, --compile=False, lr 1e-3 with 100
warm-up iterations and cosine decay. lmforge trains the same network shape (`--arch gpt2` with those
sizes, no linear biases and the exact (erf) GELU, as nanoGPT's default model) with `lmforge pretrain
--objective clm`, and may pick its own batch size, learning rate and schedule length (--fraction of
nanoGPT's tokens): the target is the validation loss nanoGPT ends at, reached in at most half
nanoGPT's wall time.

The same ids: tinyshakespeare ($LMFORGE_DATA/tinyshakespeare) is split 90/10 at a line boundary
into train.txt and valid.txt; lmforge's corpus pipeline reads them (sentences, whitespace collapsed,
an end-of-text token after each document) with a byte-level tokenizer trained here at the smallest
vocabulary (every byte, the specials and one merge: near character level, as nanoGPT's recipe).
The token stream lmforge trains on (its clm blocks, in corpus order) is written as nanoGPT's
train.bin / val.bin, with meta.pkl giving the vocabulary size.

Times: nanoGPT's is the sum of its per-iteration times (its evaluations included; process start-up
and data loading not); lmforge's is the training time (`elapsed_s`, evaluations included) at the
first evaluation whose loss is at most nanoGPT's final validation loss. Both evaluate on random
(nanoGPT) or leading (lmforge) 64-token windows of the validation stream: nanoGPT 20 batches of 12,
lmforge --eval-batches of its batch size. Both run with torch's default thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.report import ROOT, trainer_precision, write_section

BLOCK, LAYERS, HEADS, WIDTH = 64, 4, 4, 128
NANOGPT_ARGS = ["--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1", f"--block_size={BLOCK}",
                "--batch_size=12", f"--n_layer={LAYERS}", f"--n_head={HEADS}", f"--n_embd={WIDTH}", "--dropout=0.0"]
STEP = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)")
ITER = re.compile(r"^iter (\d+): loss ([\d.]+), time ([\d.]+)ms")


def data_root() -> Path:
    for base in (os.environ.get("LMFORGE_DATA"), ROOT.parent / "shared" / "data"):
        if base and (Path(base) / "tinyshakespeare" / "input.txt").is_file():
            return Path(base)
    raise SystemExit("benchmarks.nanogpt: tinyshakespeare/input.txt not found (set LMFORGE_DATA)")


def anchor_dir() -> Path:
    d = data_root().parent / "anchors" / "nanogpt"
    if not (d / "train.py").is_file():
        raise SystemExit(f"benchmarks.nanogpt: nanoGPT not found at {d}")
    return d


def split_corpus(tmp: Path) -> tuple[Path, Path]:
    """train.txt / valid.txt: the first 90% of tinyshakespeare's lines and the rest (as nanoGPT splits)."""
    text = (data_root() / "tinyshakespeare" / "input.txt").read_text()
    cut = text.index("\n", int(len(text) * 0.9)) + 1
    train, valid = tmp / "train.txt", tmp / "valid.txt"
    train.write_text(text[:cut])
    valid.write_text(text[cut:])
    return train, valid


def lmforge(*args: str, log: Path) -> None:
    with open(log, "a") as f:
        subprocess.run([sys.executable, "-m", "lmforge", *args], check=True, stdout=f, stderr=subprocess.STDOUT,
                       cwd=ROOT)


def token_stream(corpus: Path, tokenizer_dir: Path, cache: Path):
    """The ids lmforge trains on for `corpus`: its clm blocks in corpus order, as one array."""
    import numpy as np

    from lmforge.data.pretrain import PretrainData, PretrainDataConfig
    from lmforge.data.tokenizer import load_tokenizer

    data = PretrainData(PretrainDataConfig(corpus=(str(corpus),), objectives=("clm",), max_seq_len=BLOCK,
                                           batch_size=1, cache_dir=str(cache)), load_tokenizer(tokenizer_dir))
    return np.concatenate([data.sequence(i)["input_ids"] for i in range(data.n_examples)])


def prepare(tmp: Path, log: Path) -> dict:
    import numpy as np

    train, valid = split_corpus(tmp)
    tok = tmp / "tokenizer"
    lmforge("tokenizer", "train", "--kind", "byte-bpe", "--vocab-size", "262", "--corpus", str(train),
            "--out", str(tok), log=log)
    ids = {name: token_stream(path, tok, tmp / "shards") for name, path in (("train", train), ("val", valid))}
    vocab = json.loads((tok / "tokenizer.json").read_text())["model"]["vocab"]
    vocab_size = max(vocab.values()) + 1
    data = tmp / "nanogpt" / "data" / "lmforge_ids"
    data.mkdir(parents=True)
    for name, arr in ids.items():
        assert arr.max() < 2 ** 16
        arr.astype(np.uint16).tofile(data / f"{name}.bin")
    with open(data / "meta.pkl", "wb") as f:   # nanoGPT reads the vocabulary size from here
        pickle.dump({"vocab_size": vocab_size}, f)
    return {"train": train, "valid": valid, "tokenizer": tok, "vocab_size": vocab_size,
            "train_tokens": int(len(ids["train"])), "val_tokens": int(len(ids["val"]))}


def run_nanogpt(tmp: Path, iters: int, log: Path) -> dict:
    work = tmp / "nanogpt"
    for name in ("train.py", "model.py", "configurator.py"):
        shutil.copy(anchor_dir() / name, work / name)
    shutil.copytree(anchor_dir() / "config", work / "config")
    cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", *NANOGPT_ARGS,
           f"--max_iters={iters}", f"--lr_decay_iters={iters}", "--dataset=lmforge_ids", "--out_dir=out",
           f"--eval_interval={max(50, iters // 8)}"]
    out = subprocess.run(cmd, cwd=work, capture_output=True, text=True, check=False)
    log.write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        raise SystemExit(f"benchmarks.nanogpt: nanoGPT failed (log {log})")
    evals, ms = [], 0.0
    for line in out.stdout.splitlines():
        if m := ITER.match(line):
            ms += float(m.group(3))
        if m := STEP.match(line):
            evals.append({"step": int(m.group(1)), "val_loss": float(m.group(3)), "seconds": ms / 1000})
    return {"command": " ".join(cmd[1:]), "evals": evals, "seconds": ms / 1000, "val_loss": evals[-1]["val_loss"]}


def run_lmforge(tmp: Path, prep: dict, steps: int, batch: int, lr: float, eval_every: int, log: Path,
                precision: str = "auto") -> dict:
    config = tmp / "gpt.json"
    config.write_text(json.dumps({"arch": "gpt2", "size": "tiny", "num_layers": LAYERS, "num_heads": HEADS,
                                  "hidden_size": WIDTH, "intermediate_size": 4 * WIDTH,
                                  "max_position_embeddings": BLOCK, "linear_bias": False, "hidden_dropout": 0.0,
                                  # nanoGPT's MLP is nn.GELU() (erf), not GPT-2's tanh form, which
                                  # torch 2.13 computes about 4x slower on a CPU
                                  "hidden_act": "gelu",
                                  "attention_dropout": 0.0, "embedding_dropout": 0.0}))
    out = tmp / f"lmforge-b{batch}-{precision}"
    args = ["pretrain", "--config", str(config), "--objective", "clm", "--tokenizer", str(prep["tokenizer"]),
            "--corpus", str(prep["train"]), "--valid", str(prep["valid"]), "--max-seq-len", str(BLOCK),
            "--batch-size", str(batch), "--lr", str(lr), "--schedule", "cosine", "--warmup", "0.05",
            "--weight-decay", "0.1", "--max-grad-norm", "1.0", "--max-steps", str(steps),
            "--eval-every", str(eval_every), "--eval-batches", str(max(1, 240 // batch)),
            "--save-every", str(steps), "--cache-dir", str(tmp / "shards"), "--no-progress", "--out", str(out),
            "--precision", precision]
    lmforge(*args, log=log)
    evals = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "eval" in r:
            evals.append({"step": r["step"], "val_loss": r["eval"]["loss"], "seconds": r.get("elapsed_s")})
    return {"command": "lmforge " + " ".join(a if not a.startswith(str(tmp)) else Path(a).name for a in args),
            "evals": evals, "batch": batch, "lr": lr}


def first_reaching(evals: list[dict], loss: float) -> dict | None:
    return next((e for e in evals if e["val_loss"] <= loss), None)


def render(prep: dict, ngpt: dict, ours: list[dict], iters: int) -> tuple[str, bool]:
    target = ngpt["val_loss"]
    lines = [f"Data: tinyshakespeare, {prep['train_tokens']:,} training and {prep['val_tokens']:,} validation "
             f"tokens (byte-level vocabulary of {prep['vocab_size']}; the same ids to both). Network: {LAYERS} "
             f"layers, {HEADS} heads, {WIDTH} wide, block {BLOCK}, no dropout, no linear biases.", "",
             "| run | batch | lr | validation loss | reached at step | time to reach (s) | vs nanoGPT's time |",
             "|---|---:|---:|---:|---:|---:|---:|",
             f"| nanoGPT ({iters} iterations) | 12 | 1e-3 | {target:.3f} (final) | {iters} | {ngpt['seconds']:.1f} | 1.00x |"]
    met = False
    for run in ours:
        hit = first_reaching(run["evals"], target)
        best = min(e["val_loss"] for e in run["evals"])
        if hit is None or hit["seconds"] is None:
            lines.append(f"| lmforge | {run['batch']} | {run['lr']:g} | {best:.3f} (best; not reached) | - | - | - |")
            continue
        frac = hit["seconds"] / ngpt["seconds"]
        met |= frac <= 0.5
        lines.append(f"| lmforge | {run['batch']} | {run['lr']:g} | {hit['val_loss']:.3f} | {hit['step']} | "
                     f"{hit['seconds']:.1f} | {frac:.2f}x |")
    lines += ["", f"Target: nanoGPT's final validation loss in at most half its time: **{'met' if met else 'missed'}**.",
              "", f"nanoGPT: `python train.py {ngpt['command'].split(' ', 1)[1]}`", ""]
    for run in ours:
        lines.append(f"lmforge: `{run['command']}`  ")
    return "\n".join(lines), met


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="300 nanoGPT iterations (a smoke run)")
    p.add_argument("--batches", default="12,16", help="lmforge batch sizes to try (comma-separated)")
    p.add_argument("--lr", type=float, default=3e-3, help="lmforge's peak learning rate")
    p.add_argument("--fraction", type=float, default=0.75,
                   help="lmforge's schedule length as a fraction of nanoGPT's tokens (default 0.75)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="lmforge's --precision")
    p.add_argument("--keep", type=Path, help="keep the working files here")
    args = p.parse_args(argv)
    iters = 300 if args.quick else 2000
    with tempfile.TemporaryDirectory() as t:
        tmp = args.keep or Path(t)
        tmp.mkdir(parents=True, exist_ok=True)
        logs = ROOT / "runs" / "bench"
        logs.mkdir(parents=True, exist_ok=True)
        prep = prepare(tmp, logs / "nanogpt-lmforge.log")
        print("nanoGPT ...", flush=True)
        ngpt = run_nanogpt(tmp, iters, logs / "nanogpt.log")
        print(f"nanoGPT: val loss {ngpt['val_loss']:.4f} in {ngpt['seconds']:.1f} s", flush=True)
        tokens = int(iters * 12 * BLOCK * args.fraction)
        ours = []
        for batch in (int(b) for b in args.batches.split(",")):
            steps = max(1, tokens // (batch * BLOCK))
            print(f"lmforge batch {batch}: {steps} steps ...", flush=True)
            ours.append(run_lmforge(tmp, prep, steps, batch, args.lr, max(1, steps // 15), logs / "nanogpt-lmforge.log",
                                    args.precision))
        body, _ = render(prep, ngpt, ours, iters)
    print(body)
    cmd = "python -m benchmarks.nanogpt" + (" --quick" if args.quick else "") + (
        f" --batches {args.batches}" if args.batches != "12,16" else "") + (
        f" --lr {args.lr:g}" if args.lr != 3e-3 else "") + (
        f" --fraction {args.fraction:g}" if args.fraction != 0.75 else "") + (
        f" --precision {args.precision}" if args.precision != "auto" else "")
    write_section("Causal LM against nanoGPT" + (" (quick)" if args.quick else ""), cmd, body,
                  precision=trainer_precision(args.precision) + "; nanoGPT runs fp32 on a CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
