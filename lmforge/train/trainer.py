"""The training loop shared by fine-tuning, pre-training and RLHF.

The trainer knows nothing of tasks: it gets batches (examples plus a collate function that turns a
list of them into tensors, or a BatchStream such as the pre-training data) and an objective
(train/objectives.py: (model, batch) -> loss and tallies; a plain `fn(model, batch) -> loss` works
too). It owns the optimizer, the schedule, gradient accumulation and clipping, periodic evaluation
with best-model keeping, logging (the objective's metrics and tokens/s into metrics.jsonl), budgets
(steps, minutes) and checkpoints that resume bit for bit.

Launched as several processes (torchrun; train/distributed.py) the same loop runs on every rank:
the model is wrapped in DistributedDataParallel for the forward and backward passes only (the
objective gets the wrapper; the optimizer, checkpoints, evaluation and saving see the module
itself), each rank takes its share of every global batch, and each loss term is weighed by the
share of the global batch's count it covers (Objective.terms and weights), so that DDP's average of
the gradients is the gradient of the global batch's loss. Gradients are all-reduced on the last
micro-batch of an accumulation only (no_sync before). Rank 0 alone writes (metrics, progress bar,
checkpoints); an evaluation that splits (train/evaluation.py) runs on every rank, each on its share,
and rank 0 combines the parts into the metrics (sent to the others); any other runs on rank 0.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence, runtime_checkable

import torch
from tqdm import tqdm

from lmforge.errors import ConfigError, NonFiniteError
from lmforge.kernels.precision import DEVICES, PRECISIONS, resolve_precision
from lmforge.train import distributed
from lmforge.train.evaluation import ShardedEvaluation
from lmforge.train.objectives import Objective, as_objective
from lmforge.train.optim import SCHEDULES, build_optimizer, build_scheduler, lr_lambda
from lmforge.train.sparse_rows import RowSparseGrads
from lmforge.train.state import (Progress, load_sharded_state, load_state, rank_state, save_sharded_state,
                                 save_state, set_seed)
from lmforge.utils import strict_json
from lmforge.utils.atomic import atomic_file, clean_stale_temps
from lmforge.utils.checks import (AT_LEAST_1, NON_NEGATIVE, POSITIVE, SEED, UNIT_INTERVAL, check_fields,
                                  check_writable_dir, rule)


@dataclass
class TrainConfig:
    out_dir: str = field(metadata={"option": "--out"})
    epochs: float = field(default=3.0, metadata=rule(POSITIVE))
    max_steps: int | None = field(default=None, metadata=rule(AT_LEAST_1))  # optimizer steps; overrides epochs
    # a wall-time budget: stop when the run (resumed parts included) has taken this long; without
    # max_steps the learning-rate schedule runs over the budget's time instead of over steps
    max_minutes: float | None = field(default=None, metadata=rule(POSITIVE, "--minutes"))
    batch_size: int = field(default=32, metadata=rule(AT_LEAST_1))
    grad_accum: int = field(default=1, metadata=rule(AT_LEAST_1))
    lr: float = field(default=2e-5, metadata=rule(POSITIVE))
    weight_decay: float = field(default=0.01, metadata=rule(NON_NEGATIVE))
    warmup_ratio: float = field(default=0.06, metadata=rule(UNIT_INTERVAL))
    schedule: str = "linear"           # linear | cosine | constant | inverse-sqrt
    max_grad_norm: float | None = field(default=1.0, metadata=rule(NON_NEGATIVE))  # None or 0: no clipping
    # optimizer steps; None = at the end of every epoch
    eval_every: int | None = field(default=None, metadata=rule(AT_LEAST_1))
    # optimizer steps; None = whenever it evaluates
    save_every: int | None = field(default=None, metadata=rule(AT_LEAST_1))
    log_every: int = field(default=20, metadata=rule(AT_LEAST_1))
    seed: int = field(default=42, metadata=rule(SEED))
    precision: str = "auto"            # auto = bf16 where the hardware has it (AMX, AVX512_BF16, CUDA), else fp32
    device: str = "auto"               # auto = cuda when available, else cpu
    progress_bar: bool = True
    sparse_embedding_grads: bool = True  # big trainable embedding tables: row-sparse grads (sparse_rows.py)
    # A NaN/Inf loss or gradient norm skips that optimizer step (see Trainer.train) instead of
    # stopping the run with NonFiniteError.
    skip_nonfinite: bool = False
    # Several processes: shard the weights, gradients and optimizer state (FSDP2) instead of
    # replicating them (DDP); checkpoints are sharded too (`lmforge export` consolidates them).
    fsdp: bool = False

    def validate(self) -> None:
        """ConfigError naming the option when a setting is out of range or the run directory cannot
        be written; nothing is created."""
        check_fields(self)
        for name, allowed in (("schedule", SCHEDULES), ("precision", PRECISIONS), ("device", DEVICES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"--{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if not self.out_dir:
            raise ConfigError("--out DIR is required: the run directory")
        check_writable_dir(self.out_dir, "--out")


_GRID = 100_000  # a time-budget schedule is lr_lambda over this many virtual steps


@runtime_checkable
class BatchStream(Protocol):
    """Batches that arrive as a stream (pre-training shards) instead of examples the trainer indexes.

    `batches(epoch)` yields batch dicts; `state_dict()` is the position after the last batch yielded
    (JSON-able), and after `load_state_dict(state)` the next `batches(epoch)` continues from there:
    that is how a checkpoint resumes mid-epoch. Batches must not draw from the global RNGs (masks
    from the stream's own seeded generators), since the trainer looks one batch ahead."""

    def batches(self, epoch: int) -> Iterator[dict]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class _Planned:
    """Examples in index batches (a shuffle per epoch, or the caller's batch plan), collated."""

    def __init__(self, examples: Sequence, collate: Callable, plan: Callable[[int], list[list[int]]]):
        self.examples, self.collate, self.plan = examples, collate, plan

    def checked_plan(self, epoch: int) -> list[list[int]]:
        """The epoch's batches; an empty plan would make the loop spin without ever taking a step."""
        plan = self.plan(epoch)
        if not plan or not all(plan):
            raise ConfigError(f"the batch plan of epoch {epoch} has no batches or an empty batch "
                              f"({len(self.examples)} training examples)")
        return plan

    def epoch(self, epoch: int, start: int) -> Iterator[tuple[dict, int, bool, int]]:
        """(batch, examples in the global batch, last of the epoch, examples of it this rank
        computes) from micro-batch `start` on. Each rank collates its share of the global batch; a
        rank whose share is empty (a batch smaller than the world) runs the batch's first example
        with weight 0, since every rank must take part in each backward pass."""
        plan = self.checked_plan(epoch)
        world = distributed.world()
        for i in range(start, len(plan)):
            share = world.share(plan[i]) if world.active else plan[i]
            mine = len(share)
            yield (self.collate([self.examples[j] for j in (share or plan[i][:1])]), len(plan[i]),
                   i == len(plan) - 1, mine)

    def position(self) -> dict | None:
        return None  # (epoch, batch) in Progress say it all

    def restore(self, state: dict | None) -> None:
        pass


class _Streamed:
    """A BatchStream, read one batch ahead so the loop knows which batch ends the epoch."""

    def __init__(self, stream: BatchStream):
        self.stream = stream
        self._position: dict | None = None

    def epoch(self, epoch: int, start: int) -> Iterator[tuple[dict, int, bool, int]]:
        # `start` is where a resumed run stands; restore() has put the stream there already. A
        # stream of several processes is this rank's already (data/pretrain.py deals examples to
        # ranks), every rank with as many examples: the global batch is world_size times this one.
        world_size = distributed.world().world_size
        it = iter(self.stream.batches(epoch))
        current = next(it, None)
        while current is not None:
            position = self.stream.state_dict()  # after `current`, before the look-ahead
            following = next(it, None)
            self._position = position
            rows = int(current["input_ids"].shape[0])
            yield current, rows * world_size, following is None, rows
            current = following

    def position(self) -> dict | None:
        return self._position

    def restore(self, state: dict | None) -> None:
        if state is not None:
            self.stream.load_state_dict(state)


def autocast_context(device: torch.device, precision: str):
    """The compute precision of every forward and backward: bf16 autocast (fp32 master weights and
    optimizer state) where `precision` resolves to bf16 on this device, fp32 otherwise
    (kernels/precision.py says what auto means)."""
    return resolve_precision(precision, device).autocast(device)


def random_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """A fresh shuffle per epoch, fixed by (seed, epoch) alone, so a resumed run sees the same order."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


class MetricsLog:
    """metrics.jsonl: one JSON object per log or evaluation event. On resume, events after the
    checkpoint's step (written by the interrupted run) are dropped so the file reads as one run.
    Lines are strict JSON: a non-finite number is written as null (utils/strict_json.py)."""

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
            f.write(strict_json.dumps(record) + "\n")


class _NoLog:
    """The metrics log of a rank other than 0: they write nothing."""

    def write(self, record: dict) -> None:
        pass


def nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the trainable tensors holding a NaN or an infinity."""
    with torch.no_grad():
        return [n for n, p in model.named_parameters()
                if p.requires_grad and not torch.isfinite(distributed.local(p)).all()]


class Trainer:
    def __init__(
        self,
        model: torch.nn.Module,
        config: TrainConfig,
        train_set: Sequence | BatchStream,
        collate: Callable[[list], dict] | None,
        objective: Objective | Callable[[torch.nn.Module, dict], torch.Tensor],
        evaluate: Callable[[torch.nn.Module], dict] | None = None,
        main_metric: str | None = None,
        greater_is_better: bool = True,
        on_best: Callable[[torch.nn.Module, dict], None] | None = None,
        batch_plan: Callable[[int], list[list[int]]] | None = None,
        clock: Callable[[], float] = time.perf_counter,   # seconds; the --minutes budget reads it
    ):
        config.validate()
        self.clock = clock
        if isinstance(train_set, BatchStream):
            if not (config.max_steps or config.max_minutes):
                raise ConfigError("a streamed training set needs a budget: --max-steps or --minutes")
            self.source: _Planned | _Streamed = _Streamed(train_set)
        else:
            if len(train_set) == 0:
                raise ConfigError("the training set is empty: nothing to train on")
            self.source = _Planned(train_set, collate, batch_plan or (
                lambda epoch: random_batches(len(train_set), config.batch_size, config.seed, epoch)))
        self.model, self.config = model, config
        self.objective = as_objective(objective)
        self.evaluate, self.main_metric = evaluate, main_metric
        self.greater_is_better, self.on_best = greater_is_better, on_best
        self._whole = None   # a sharded run's unsharded twin for on_best (train() makes it)
        self.out = Path(config.out_dir)
        self.checkpoint_dir = self.out / "checkpoint"
        self.saved_step: int | None = None  # the step of the checkpoint on disk, once there is one

    # -- bookkeeping --------------------------------------------------------------------------
    def total_steps(self) -> int | None:
        """Optimizer steps of the run; None when only a time budget bounds it."""
        if self.config.max_steps:
            return self.config.max_steps
        if isinstance(self.source, _Streamed):
            return None
        per_epoch = math.ceil(len(self.source.checked_plan(0)) / self.config.grad_accum)
        return max(1, math.ceil(self.config.epochs * per_epoch))

    def _scheduler(self, optimizer, total: int | None, elapsed: Callable[[], float]):
        cfg = self.config
        if total is not None:
            return build_scheduler(optimizer, cfg.schedule, round(cfg.warmup_ratio * total), total)
        # a time budget: the schedule's position is the fraction of the budget spent
        f = lr_lambda(cfg.schedule, round(cfg.warmup_ratio * _GRID), _GRID)
        budget = cfg.max_minutes * 60.0
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda _: f(min(_GRID, int(_GRID * elapsed() / budget))))

    def _is_better(self, value: float, best: float | None) -> bool:
        if not math.isfinite(value):  # a NaN metric is never the best model
            return False
        if best is None:
            return True
        return value > best if self.greater_is_better else value < best

    def _last_good(self) -> str:
        if self.saved_step is None:
            return "no checkpoint was saved before it"
        return f"last good checkpoint: {self.checkpoint_dir} (step {self.saved_step})"

    def _nonfinite(self, step: int, what: str) -> None:
        """Stop the run, unless skip_nonfinite lets the caller skip the step."""
        if not self.config.skip_nonfinite:
            raise NonFiniteError(f"step {step}: {what}; {self._last_good()} "
                                 "(--skip-nonfinite skips such steps instead)")

    def _check_weights(self, step: int, where: Path) -> None:
        """Never write NaN/Inf weights over a good checkpoint or best model."""
        bad = nonfinite_parameters(self.model)
        if distributed.is_sharded(self.model):
            # each rank checks its own shards; all decide together, or one would raise and the others hang
            device = next(self.model.parameters()).device
            elsewhere = distributed.all_sum([float(len(bad))], device)[0] - len(bad)
            if elsewhere and not bad:
                bad = [f"(a shard on another rank; {int(elsewhere)} tensors)"]
        if bad:
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            raise NonFiniteError(f"step {step}: weights {bad[0]!r}{more} are not finite, not saved to "
                                 f"{where}; {self._last_good()}")

    def _evaluate(self, progress: Progress, log: MetricsLog, elapsed_s: float) -> dict:
        # With several processes an evaluation that splits (train/evaluation.py) runs on every rank,
        # each on its share, and rank 0 combines the gathered parts into the metrics one process
        # computes; any other runs on rank 0 alone. A sharded model's forward pass gathers weights
        # from every rank: all of them evaluate the whole set.
        world, sharded = distributed.world(), distributed.is_sharded(self.model)
        split = isinstance(self.evaluate, ShardedEvaluation) and world.active and not sharded
        metrics = part = None
        if split or world.is_main or sharded:
            self.model.eval()
            with torch.no_grad():
                with autocast_context(next(self.model.parameters()).device, self.config.precision):
                    if split:
                        part = self.evaluate.part(self.model, world.rank, world.world_size)
                    else:
                        metrics = self.evaluate(self.model)
            self.model.train()
        if split:
            parts = distributed.gather(part)
            metrics = self.evaluate.combine(parts) if world.is_main else None
        metrics = distributed.from_main(metrics)
        # elapsed_s: the run's wall time when the evaluation began (time-to-quality comparisons read it)
        log.write({"step": progress.step, "epoch": progress.epoch, "elapsed_s": round(elapsed_s, 3), "eval": metrics})
        key = self.main_metric or next(iter(metrics))
        if self._is_better(metrics[key], progress.best_metric):
            if self.on_best is not None:
                self._check_weights(progress.step, self.out / "best")
                model = self.model
                if distributed.is_sharded(model):   # gathered whole on rank 0 (every rank takes part)
                    weights = distributed.full_state_dict(model)
                    if weights is not None:
                        self._whole.load_state_dict(weights)
                        model = self._whole
                if distributed.world().is_main:
                    self.on_best(model, metrics)
            progress.best_metric, progress.best_step = metrics[key], progress.step
        return metrics

    @staticmethod
    def _grad_norm(trainable: list[torch.Tensor], max_norm: float | None) -> float:
        """The total gradient norm (clipping to max_norm first when it is set)."""
        if max_norm:
            norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm)
        else:
            grads = [p.grad for p in trainable if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        # sharded gradients give a sharded norm: its whole value (a collective; every rank asks)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    # -- the loop -----------------------------------------------------------------------------
    def train(self, resume: bool = False) -> dict:
        cfg, model, objective, clock = self.config, self.model, self.objective, self.clock
        world = distributed.world()
        main = world.is_main
        if main:  # the other ranks write nothing, anywhere
            self.out.mkdir(parents=True, exist_ok=True)
            clean_stale_temps(self.out)  # what a killed run's atomic writes left behind
        set_seed(cfg.seed + world.rank)  # ranks draw different dropout masks
        total = self.total_steps()
        progress = Progress()
        resumed_elapsed, segment_start = 0.0, clock()

        def elapsed() -> float:  # wall time of the run, resumed parts included
            return resumed_elapsed + clock() - segment_start

        def run_time() -> float:
            # what the time budget reads: rank 0's clock on every rank, so that all ranks stop at
            # the same step and a time-driven schedule gives them the same learning rate
            return distributed.from_main(elapsed()) if world.active else elapsed()

        device = next(model.parameters()).device
        if cfg.fsdp and not world.active:
            distributed.say("--fsdp: one process, nothing to shard; training as usual")
        # a sharded run hands on_best a whole copy: rank 0 keeps an unsharded twin to load it into
        self._whole = copy.deepcopy(model) if cfg.fsdp and world.active and main and self.on_best else None
        # what the objective calls: DDP with several processes, or the model sharded in place (FSDP);
        # before the optimizer, which must hold the shards
        net = distributed.wrap(model, device, fsdp=cfg.fsdp)
        sharded = distributed.is_sharded(model)
        if sharded:
            distributed.say(f"distributed: FSDP, each process holds 1/{world.world_size} of the weights, "
                            "gradients and optimizer state")
        optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
        scheduler = self._scheduler(optimizer, total, run_time)
        # rank 0's view of the run directory decides for all (the others may not see it)
        if resume and distributed.from_main(self.checkpoint_dir.is_dir()):
            load = load_sharded_state if sharded else load_state
            progress = load(self.checkpoint_dir, model, optimizer, scheduler, world.rank, world.world_size)
            self.source.restore(progress.extra.get("data"))
            self.saved_step = progress.step
        resumed_elapsed, segment_start = progress.elapsed_s, clock()
        budget_s = cfg.max_minutes * 60.0 if cfg.max_minutes else None

        def finished() -> bool:
            return (total is not None and progress.step >= total) or (
                budget_s is not None and run_time() >= budget_s)

        log = MetricsLog(self.out / "metrics.jsonl", progress.step if resume else None) if main else _NoLog()
        sparse = cfg.sparse_embedding_grads
        if sparse and world.active:
            # a sparse gradient would take DDP's sparse all-reduce and bypass the dense buffer the
            # row-zeroing keeps; dense embedding gradients are what DDP buckets
            distributed.say("distributed: row-sparse embedding gradients off (dense gradients under DDP)")
            sparse = False
        sparse_rows = RowSparseGrads(model) if sparse else None
        if main:
            with atomic_file(self.out / "train_config.json", "w") as f:
                strict_json.dump(asdict(cfg), f, indent=1)
        trainable = [p for p in model.parameters() if p.requires_grad]
        model.train()
        bar = tqdm(total=total, initial=progress.step, desc="train", unit="step",
                   disable=not (cfg.progress_bar and main), dynamic_ncols=True)
        window_loss, window_n, window_samples, t0 = 0.0, 0, 0, clock()
        window: dict[str, torch.Tensor] = {}  # the objective's tallies, summed over the log window
        last_norm = None   # the gradient norm of the window's last step taken (before clipping)
        last_eval: dict = {}
        evaluated_at = -1
        try:
            while not finished():
                micro = 0        # micro-batches accumulated into the pending step
                step_ok = True   # every one of them had a finite loss
                ended_epoch = False
                for cpu_batch, n_samples, last, n_mine in self.source.epoch(progress.epoch, progress.batch):
                    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in cpu_batch.items()}
                    # gradients are all-reduced when the step's last micro-batch goes backward
                    syncs = micro + 1 >= cfg.grad_accum or last
                    with distributed.accumulating(net, model, syncs, sharded):
                        with autocast_context(device, cfg.precision):
                            terms, tallies = objective.terms(net, batch)
                        loss = sum(terms.values())
                        value = loss.detach().item()
                        tokens = int(tallies["tokens"]) if "tokens" in tallies and n_mine else 0
                        finite = math.isfinite(value)
                        if world.active:
                            # each term weighed by its share of the global batch's count (its own:
                            # masked tokens, examples, target tokens), so the ranks' average is the mean
                            # one process would compute over the global batch
                            names = list(terms)
                            mine = objective.weights(tallies, n_mine) if n_mine else dict.fromkeys(names, 0.0)
                            *totals, bad, tokens = distributed.all_sum(
                                [*(mine[k] for k in names), 0.0 if finite else 1.0, float(tokens)], device)
                            finite, tokens = bad == 0, int(tokens)
                            if finite:
                                loss = sum(terms[k] * (mine[k] * world.world_size / total if total
                                                       else float(n_mine > 0)) for k, total in zip(names, totals))
                                value = loss.detach().item()
                        if finite:
                            (loss / cfg.grad_accum).backward()
                            window_loss += value
                            window_n += 1
                            if n_mine:
                                for k, v in tallies.items():
                                    window[k] = window[k] + v if k in window else v
                        else:  # no backward: its NaN gradients would poison the whole step
                            self._nonfinite(progress.step + 1, f"loss is {value}" if not math.isfinite(value)
                                            else "the loss is not finite on another rank")
                            step_ok = False
                            if world.active:
                                # every rank joins the gradients' reduction all the same; the step is skipped
                                # and its gradients cleared
                                (loss.nan_to_num(0.0, 0.0, 0.0) * 0.0).backward()
                    if "tokens" in tallies:
                        progress.extra["tokens"] = progress.extra.get("tokens", 0) + tokens
                    progress.batch += 1
                    progress.samples += n_samples
                    window_samples += n_samples
                    micro += 1
                    if micro < cfg.grad_accum and not last:
                        continue
                    micro = 0
                    if step_ok:
                        norm = self._grad_norm(trainable, cfg.max_grad_norm)
                        last_norm = norm
                        if not math.isfinite(norm):
                            self._nonfinite(progress.step + 1, f"gradient norm is {norm}")
                            step_ok = False
                    lr = scheduler.get_last_lr()[0]  # the rate this step used
                    # A skipped step leaves the weights and AdamW's moments as they were, but the
                    # step counter and the schedule still advance (as torch.amp.GradScaler does), so
                    # the run's length, data order and resume positions do not depend on skips.
                    if step_ok:
                        optimizer.step()
                    else:
                        progress.skipped_steps += 1
                    scheduler.step()
                    if sparse_rows is not None:
                        sparse_rows.zero_grad(optimizer)
                    else:
                        optimizer.zero_grad(set_to_none=True)
                    step_ok = True
                    progress.step += 1
                    bar.update(1)
                    done = finished()
                    if progress.step % cfg.log_every == 0 or done:
                        seconds = max(clock() - t0, 1e-9)
                        # the window summed over the ranks (the loss: their weighted losses add up
                        # to the global batch's, world_size times)
                        windows = distributed.gather((window_loss, {k: float(v) for k, v in window.items()}))
                        if main:
                            record = {"step": progress.step, "epoch": progress.epoch}
                            if window_n:  # a window of skipped steps only has no loss to report
                                record["loss"] = sum(w[0] for w in windows) / (window_n * world.world_size)
                            totals: dict[str, float] = {}
                            for _, t in windows:
                                for k, v in t.items():
                                    totals[k] = totals.get(k, 0.0) + v
                            record.update(objective.summarize(totals) if totals else {})
                            if last_norm is not None:
                                record["grad_norm"] = last_norm
                            record.update(lr=lr, samples_per_s=window_samples / seconds)
                            if "tokens" in totals:
                                record.update(tokens_per_s=totals["tokens"] / seconds, tokens=progress.extra["tokens"])
                            if cfg.skip_nonfinite:
                                record["skipped_steps"] = progress.skipped_steps
                            log.write(record)
                            bar.set_postfix(_postfix(record))
                        window_loss, window_n, window_samples, t0 = 0.0, 0, 0, clock()
                        window, last_norm = {}, None
                    ended_epoch = last
                    do_eval = self.evaluate is not None and (
                        (cfg.eval_every and progress.step % cfg.eval_every == 0)
                        or (not cfg.eval_every and last) or done
                    )
                    if last:
                        progress.epoch, progress.batch = progress.epoch + 1, 0
                    paused = clock()  # evaluation and saving do not count as training time
                    if do_eval:
                        last_eval, evaluated_at = self._evaluate(progress, log, elapsed()), progress.step
                    save_now = (cfg.save_every and progress.step % cfg.save_every == 0) or (
                        not cfg.save_every and evaluated_at == progress.step) or done
                    if save_now:
                        self._check_weights(progress.step, self.checkpoint_dir)
                        progress.elapsed_s = elapsed()
                        position = self.source.position()
                        if position is not None:
                            progress.extra["data"] = position
                        # every rank's RNG states and data position, written by rank 0
                        ranks = distributed.gather(rank_state(position)) if world.active else None
                        if sharded:   # every rank writes its shards
                            save_sharded_state(self.checkpoint_dir, model, optimizer, scheduler, progress, ranks)
                        elif main:
                            save_state(self.checkpoint_dir, model, optimizer, scheduler, progress, ranks)
                        self.saved_step = progress.step
                    t0 += clock() - paused
                    if last or done:
                        break
                if not ended_epoch and not finished():  # nothing (left) in this epoch: never loop on it
                    if progress.batch == 0:
                        raise ConfigError(f"epoch {progress.epoch} of the training data has no batches")
                    progress.epoch, progress.batch = progress.epoch + 1, 0
        finally:
            bar.close()
            if sparse_rows is not None:
                sparse_rows.close()
        return {"steps": progress.step, "samples": progress.samples, "best_metric": progress.best_metric,
                "best_step": progress.best_step, "last_eval": last_eval,
                "skipped_steps": progress.skipped_steps, "resumed_elapsed_s": resumed_elapsed,
                "tokens": progress.extra.get("tokens"), "elapsed_s": elapsed()}


def _postfix(record: dict) -> dict:
    """What the progress bar shows: loss, the objective's accuracies/perplexity, lr, throughput."""
    shown = {k: f"{v:.4f}" for k, v in record.items()
             if k in ("loss", "mlm_accuracy", "nsp_accuracy", "perplexity", "accuracy") and v is not None}
    shown["lr"] = f"{record['lr']:.2e}"
    if "tokens_per_s" in record:
        shown["tok/s"] = f"{record['tokens_per_s']:.0f}"
    else:
        shown["sps"] = f"{record['samples_per_s']:.0f}"
    return shown
