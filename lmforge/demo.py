"""`make demo`: the main job, end to end on the bundled all-MiniLM-L6-v2 weights, offline.

LoRA-fine-tune MiniLM on SST-2 for a few minutes (r=8 on W_q and W_v; 0.3% of the weights train),
evaluate it on the dev set with the official metric, print a row in the layout of the LoRA paper's
Table 2 and a few predictions, and show how to serve the adapter.

Data: $LMFORGE_DATA/glue/SST-2 (or ../shared/data beside the repo), else the `datasets` hub, else a
small embedded set so the demo still runs anywhere. LMFORGE_DEMO_SAMPLES sets the number of training
sentences (default 20000; SST-2 has 67,349).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

from lmforge.adapters.methods import MethodConfig
from lmforge.data.tables import Example
from lmforge.train.finetune import FinetuneConfig, run_finetune
from lmforge.train.glue_table import render_table
from lmforge.train.trainer import TrainConfig

OUT = Path("runs/demo-sst2-lora")
SAMPLES = [
    "a gorgeous , witty , seductive movie .",
    "the plot is thin and the jokes fall flat .",
    "not nearly as bad as i had feared , and often very funny .",
    "an ugly , joyless film that wastes a talented cast .",
    "the cinematography alone is worth the price of admission .",
]
EMBEDDED = [  # the fallback when no SST-2 copy can be found: tiny, so only a smoke run
    ("a gorgeous , witty , seductive movie .", "positive"), ("the plot is thin and the jokes fall flat .", "negative"),
    ("one of the most delightful films of the year .", "positive"), ("a tedious , overlong mess .", "negative"),
    ("a warm , funny and deeply moving portrait .", "positive"), ("i was bored from start to finish .", "negative"),
    ("the acting is superb .", "positive"), ("the dialogue is clumsy and the characters thin .", "negative"),
]


def find_glue() -> str | None:
    for base in [os.environ.get("LMFORGE_DATA"), Path(__file__).resolve().parents[2] / "shared" / "data"]:
        if base and (Path(base) / "glue" / "SST-2" / "train.tsv").is_file():
            return str(Path(base) / "glue")
    return None


def config() -> FinetuneConfig:
    samples = int(os.environ.get("LMFORGE_DEMO_SAMPLES", "20000"))
    train = TrainConfig(out_dir=str(OUT), epochs=1, batch_size=32, lr=1e-3, warmup_ratio=0.06, seed=1,
                        log_every=50, progress_bar=sys.stderr.isatty())
    adapt = MethodConfig(method="lora", lora_r=8, lora_alpha=16, lora_dropout=0.1, lora_targets="query,value")
    glue = find_glue()
    if glue is None:
        try:
            import datasets  # noqa: F401  (the GLUE reader falls back to the hub)
        except ImportError:
            return _embedded_config(train, adapt)
    return FinetuneConfig(model="minilm", task="glue/sst2", data_dir=glue, adapt=adapt, max_seq_len=128,
                          max_train_samples=samples, train=train)


def _embedded_config(train: TrainConfig, adapt: MethodConfig) -> FinetuneConfig:
    d = OUT.parent / "demo-data"
    d.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": t, "label": y}) + "\n" for t, y in EMBEDDED * 8]
    (d / "train.jsonl").write_text("".join(lines))
    (d / "dev.jsonl").write_text("".join(lines[:8]))
    print("no SST-2 copy found (set LMFORGE_DATA): training on a tiny embedded set instead\n")
    train.epochs = 3
    return FinetuneConfig(model="minilm", task=None, train_file=str(d / "train.jsonl"),
                          dev_file=str(d / "dev.jsonl"), adapt=adapt, train=train)


def main() -> int:
    cfg = config()
    print(f"lmforge demo: LoRA (r=8, alpha=16, W_q + W_v) on all-MiniLM-L6-v2, "
          f"{cfg.task or 'embedded examples'}, {cfg.max_train_samples or 'all'} training sentences, "
          f"1 epoch, packed (unpadded) batches of 32 -> {OUT}\n", flush=True)
    t0 = time.perf_counter()
    saved = OUT / "run.json"
    same = saved.is_file() and json.loads(saved.read_text()) == asdict(cfg)
    if saved.is_file() and not same:
        shutil.rmtree(OUT)  # an earlier demo with other settings: start over
    summary = run_finetune(cfg, resume=same and (OUT / "checkpoint").is_dir())
    print(f"\ntrained and evaluated in {time.perf_counter() - t0:.0f}s; best dev {summary['main_metric']} "
          f"{summary['best'][summary['main_metric']]:.4f} at step {summary['best_step']}\n")

    print(render_table([{"model": "minilm", "method": "lora", "seeds": [cfg.train.seed], "runs": [summary]}]))

    from lmforge.infer.classify import Classifier
    clf = Classifier(OUT / "best")
    print("predictions of the saved adapter (best/ holds it with its head, in PEFT's format):")
    for text, p in zip(SAMPLES, clf.predict([Example(t) for t in SAMPLES])):
        print(f"  {p['label']:>8}  {max(p['probabilities'].values()):.3f}  {text}")
    print(f"""
next:
  lmforge evaluate --run {OUT} --task glue/sst2 --split dev
  lmforge predict  --run {OUT} --input texts.jsonl
  lmforge serve    --model minilm --adapter sst2={OUT}      # then open http://127.0.0.1:8000/
  curl -s localhost:8000/v1/classify -H 'content-type: application/json' \\
       -d '{{"adapter": "sst2", "inputs": ["a charming film", "a dull film"]}}'""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
