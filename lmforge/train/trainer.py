"""The training loop shared by fine-tuning, pre-training and RLHF.

The trainer knows nothing of tasks: it gets examples, a collate function that turns a list of them
into a batch of tensors, and an objective `loss_fn(model, batch) -> scalar loss`. It owns the
optimizer, the schedule, gradient accumulation and clipping, periodic evaluation with best-model
keeping, logging, and checkpoints that resume bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from lmforge.train.optim import build_optimizer, build_scheduler
from lmforge.train.sparse_rows import RowSparseGrads
from lmforge.train.state import Progress, load_state, save_state, set_seed


@dataclass
class TrainConfig:
    out_dir: str
    epochs: float = 3.0
    max_steps: int | None = None       # optimizer steps; overrides epochs
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    schedule: str = "linear"           # linear | cosine | constant
    max_grad_norm: float | None = 1.0
    eval_every: int | None = None      # optimizer steps; None = at the end of every epoch
    save_every: int | None = None      # optimizer steps; None = whenever it evaluates
    log_every: int = 20
    seed: int = 42
    precision: str = "auto"            # auto = bf16 autocast where the device supports it, else fp32
    progress_bar: bool = True
    sparse_embedding_grads: bool = True  # big trainable embedding tables: row-sparse grads (sparse_rows.py)


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast on CUDA devices that support it; fp32 everywhere else (this CPU has no bf16)."""
    use_bf16 = precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    if use_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def random_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """A fresh shuffle per epoch, fixed by (seed, epoch) alone, so a resumed run sees the same order."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


class MetricsLog:
    """metrics.jsonl: one JSON object per log or evaluation event. On resume, events after the
    checkpoint's step (written by the interrupted run) are dropped so the file reads as one run."""

    def __init__(self, path: Path, keep_until_step: int | None = None):
        self.path = path
        if keep_until_step is not None and path.is_file():
            kept = [ln for ln in path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= keep_until_step]
            path.write_text("".join(ln + "\n" for ln in kept))
        elif keep_until_step is None:
            path.write_text("")

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class Trainer:
    def __init__(
        self,
        model: torch.nn.Module,
        config: TrainConfig,
        train_set: Sequence,
        collate: Callable[[list], dict],
        loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor],
        evaluate: Callable[[torch.nn.Module], dict] | None = None,
        main_metric: str | None = None,
        greater_is_better: bool = True,
        on_best: Callable[[torch.nn.Module, dict], None] | None = None,
        batch_plan: Callable[[int], list[list[int]]] | None = None,
    ):
        self.model, self.config = model, config
        self.train_set, self.collate, self.loss_fn = train_set, collate, loss_fn
        self.evaluate, self.main_metric = evaluate, main_metric
        self.greater_is_better, self.on_best = greater_is_better, on_best
        self.batch_plan = batch_plan or (
            lambda epoch: random_batches(len(train_set), config.batch_size, config.seed, epoch)
        )
        self.out = Path(config.out_dir)
        self.checkpoint_dir = self.out / "checkpoint"

    # -- bookkeeping --------------------------------------------------------------------------
    def total_steps(self) -> int:
        if self.config.max_steps:
            return self.config.max_steps
        per_epoch = math.ceil(len(self.batch_plan(0)) / self.config.grad_accum)
        return max(1, math.ceil(self.config.epochs * per_epoch))

    def _is_better(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value > best if self.greater_is_better else value < best

    def _evaluate(self, progress: Progress, log: MetricsLog) -> dict:
        self.model.eval()
        with torch.no_grad():
            metrics = self.evaluate(self.model)
        self.model.train()
        log.write({"step": progress.step, "epoch": progress.epoch, "eval": metrics})
        key = self.main_metric or next(iter(metrics))
        if self._is_better(metrics[key], progress.best_metric):
            progress.best_metric, progress.best_step = metrics[key], progress.step
            if self.on_best is not None:
                self.on_best(self.model, metrics)
        return metrics

    # -- the loop -----------------------------------------------------------------------------
    def train(self, resume: bool = False) -> dict:
        cfg, model = self.config, self.model
        self.out.mkdir(parents=True, exist_ok=True)
        set_seed(cfg.seed)
        total = self.total_steps()
        optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
        scheduler = build_scheduler(optimizer, cfg.schedule, round(cfg.warmup_ratio * total), total)
        progress = Progress()
        if resume and self.checkpoint_dir.is_dir():
            progress = load_state(self.checkpoint_dir, model, optimizer, scheduler)
        resumed_elapsed, segment_start = progress.elapsed_s, time.perf_counter()
        log = MetricsLog(self.out / "metrics.jsonl", progress.step if resume else None)
        sparse_rows = RowSparseGrads(model) if cfg.sparse_embedding_grads else None
        (self.out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=1))
        device = next(model.parameters()).device
        trainable = [p for p in model.parameters() if p.requires_grad]
        model.train()
        bar = tqdm(total=total, initial=progress.step, desc="train", unit="step",
                   disable=not cfg.progress_bar, dynamic_ncols=True)
        window_loss, window_n, window_samples, t0 = 0.0, 0, 0, time.perf_counter()
        last_eval: dict = {}
        evaluated_at = -1
        while progress.step < total:
            plan = self.batch_plan(progress.epoch)
            micro = 0  # micro-batches accumulated into the pending step
            while progress.batch < len(plan) and progress.step < total:
                indices = plan[progress.batch]
                batch = {k: v.to(device) if torch.is_tensor(v) else v
                         for k, v in self.collate([self.train_set[i] for i in indices]).items()}
                with autocast_context(device, cfg.precision):
                    loss = self.loss_fn(model, batch)
                (loss / cfg.grad_accum).backward()
                progress.batch += 1
                progress.samples += len(indices)
                window_loss += loss.detach().item()
                window_n += 1
                window_samples += len(indices)
                micro += 1
                if micro < cfg.grad_accum and progress.batch < len(plan):
                    continue
                micro = 0
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
                lr = scheduler.get_last_lr()[0]  # the rate this step used
                optimizer.step()
                scheduler.step()
                if sparse_rows is not None:
                    sparse_rows.zero_grad(optimizer)
                else:
                    optimizer.zero_grad(set_to_none=True)
                progress.step += 1
                bar.update(1)
                if progress.step % cfg.log_every == 0 or progress.step == total:
                    elapsed = time.perf_counter() - t0
                    record = {"step": progress.step, "epoch": progress.epoch,
                              "loss": window_loss / window_n, "lr": lr,
                              "samples_per_s": window_samples / max(elapsed, 1e-9)}
                    log.write(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                    sps=f"{record['samples_per_s']:.0f}")
                    window_loss, window_n, window_samples, t0 = 0.0, 0, 0, time.perf_counter()
                end_of_epoch = progress.batch == len(plan)
                do_eval = self.evaluate is not None and (
                    (cfg.eval_every and progress.step % cfg.eval_every == 0)
                    or (not cfg.eval_every and end_of_epoch) or progress.step == total
                )
                if end_of_epoch:
                    progress.epoch, progress.batch = progress.epoch + 1, 0
                paused = time.perf_counter()  # evaluation and saving do not count as training time
                if do_eval:
                    last_eval, evaluated_at = self._evaluate(progress, log), progress.step
                save_now = (cfg.save_every and progress.step % cfg.save_every == 0) or (
                    not cfg.save_every and evaluated_at == progress.step) or progress.step == total
                if save_now:
                    progress.elapsed_s = resumed_elapsed + time.perf_counter() - segment_start
                    save_state(self.checkpoint_dir, model, optimizer, scheduler, progress)
                t0 += time.perf_counter() - paused
                if end_of_epoch:
                    break
        bar.close()
        if sparse_rows is not None:
            sparse_rows.close()
        return {"steps": progress.step, "samples": progress.samples, "best_metric": progress.best_metric,
                "best_step": progress.best_step, "last_eval": last_eval,
                "resumed_elapsed_s": resumed_elapsed}
