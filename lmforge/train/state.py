"""Training checkpoints that resume exactly, written atomically.

A checkpoint directory holds the trainable weights (all of them for full fine-tuning, only the
adapter for LoRA), the optimizer and scheduler state, every RNG state (Python, NumPy, torch CPU and
CUDA) and the position in the data order. Restoring all of it makes the resumed run compute the
same bits as a run that was never interrupted.

A run of several processes (train/distributed.py) has one set of weights and optimizer state (DDP
keeps them equal on every rank) but one RNG state and data position per rank: rank 0 writes them
all (rng.safetensors keys `rankR.NAME` beside rank 0's plain names, trainer_state.json "ranks"), and
each rank restores its own. A checkpoint resumes only with the number of processes that wrote it.
"""

from __future__ import annotations

import json
import random
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lmforge.errors import CheckpointError
from lmforge.utils import strict_json
from lmforge.utils.atomic import atomic_dir, commit_dir, temp_dir_for


@dataclass
class Progress:
    step: int = 0              # optimizer steps taken
    epoch: int = 0             # current epoch
    batch: int = 0             # micro-batches of the current epoch already consumed
    samples: int = 0           # training examples seen
    best_metric: float | None = None
    best_step: int | None = None
    elapsed_s: float = 0.0     # wall time of the run up to this checkpoint (resumed runs add to it)
    skipped_steps: int = 0     # optimizer steps skipped for a NaN/Inf loss or gradient (skip_nonfinite)
    extra: dict = field(default_factory=dict)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda{i}"] = s
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    out["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    out["numpy_rest"] = torch.tensor([pos, has_gauss], dtype=torch.int64)
    out["numpy_gauss"] = torch.tensor([gauss], dtype=torch.float64)
    return out


def _restore_rng(t: dict[str, torch.Tensor], py_state: list) -> None:
    torch.set_rng_state(t["torch"])
    cuda = [t[k] for k in sorted(t) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    keys = t["numpy_keys"].numpy().astype(np.uint32)
    pos, has_gauss = (int(x) for x in t["numpy_rest"])
    np.random.set_state(("MT19937", keys, pos, has_gauss, float(t["numpy_gauss"][0])))
    version, internal, gauss_next = py_state
    random.setstate((version, tuple(internal), gauss_next))


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def rank_state(data: dict | None) -> dict:
    """What one rank contributes to a checkpoint: its RNG states and its data position."""
    return {"rng": _rng_tensors(), "python_rng": list(random.getstate()), "data": data}


def _common_files(tmp: Path, progress: Progress, scheduler, ranks: list[dict], sharded: bool = False) -> None:
    """The RNG states and trainer_state.json, the same for every kind of checkpoint."""
    rng = dict(ranks[0]["rng"])
    for r, s in enumerate(ranks[1:], start=1):
        rng.update({f"rank{r}.{k}": v for k, v in s["rng"].items()})
    save_file(rng, str(tmp / "rng.safetensors"))
    state = {"progress": asdict(progress), "scheduler": scheduler.state_dict(),
             "python_rng": ranks[0]["python_rng"], "world_size": len(ranks)}
    if len(ranks) > 1:
        state["ranks"] = [{"python_rng": s["python_rng"], "data": s["data"]} for s in ranks]
    if sharded:
        state["sharded"] = True
    (tmp / "trainer_state.json").write_text(strict_json.dumps(state, indent=1))


def save_state(path: str | Path, model, optimizer, scheduler, progress: Progress,
               ranks: list[dict] | None = None) -> None:
    """`ranks`: every rank's rank_state() in rank order, for a run of several processes; without
    it, this process's RNG states (a run of one)."""
    ranks = ranks or [rank_state(progress.extra.get("data"))]
    with atomic_dir(path) as tmp:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        _common_files(tmp, progress, scheduler, ranks)


def save_sharded_state(path: str | Path, model, optimizer, scheduler, progress: Progress,
                       ranks: list[dict] | None) -> None:
    """A checkpoint of a sharded (FSDP) run; every rank calls this. Each rank writes its own shards of
    the weights and optimizer state (torch.distributed.checkpoint, `shards/`) into a temporary
    directory rank 0 made, rank 0 adds the model's config.json and the files every checkpoint has,
    then puts the directory in place (several machines need a shared file system for this).
    `lmforge export` consolidates one into an ordinary model directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from lmforge.train import distributed

    main = distributed.world().is_main
    tmp = Path(distributed.from_main(str(temp_dir_for(path)) if main else None))
    try:
        weights, opt = get_state_dict(model, optimizer)
        dcp.save({"model": weights, "optimizer": opt}, checkpoint_id=str(tmp / "shards"))
        if main:
            (tmp / "config.json").write_text(strict_json.dumps(model.config.to_dict(), indent=1))
            _common_files(tmp, progress, scheduler, ranks, sharded=True)
            commit_dir(tmp, path)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    distributed.barrier()   # no rank goes on (and may write the next checkpoint) before it is in place


def _read_common(path: Path, names: tuple[str, ...], world_size: int, sharded: bool) -> tuple[dict, dict]:
    """(RNG states, trainer_state.json) of a checkpoint written as this run would write it: the same
    number of processes, sharded or not; its other files (`names`) present."""
    def read(name, how):
        try:
            return how(path / name)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: incomplete training checkpoint, {name} is missing") from None
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read training checkpoint ({str(e).splitlines()[0]})") from None

    state = read("trainer_state.json", lambda f: json.loads(f.read_text()))
    saved_world = int(state.get("world_size", 1))
    if saved_world != world_size:
        raise CheckpointError(f"{path}: the checkpoint was written by a run of {saved_world} process(es), this "
                              f"run has {world_size}: resume with the same number of processes")
    if bool(state.get("sharded")) != sharded:
        was, now = ("with", "without") if state.get("sharded") else ("without", "with")
        raise CheckpointError(f"{path}: the checkpoint was written {was} --fsdp, this run is {now} it: "
                              "resume as the run was started")
    for name in names:
        if not (path / name).exists():
            raise CheckpointError(f"{path}: incomplete training checkpoint, {name} is missing")
    return read("rng.safetensors", lambda f: load_file(str(f))), state


def _restored(path: Path, state: dict, rng: dict, scheduler, rank: int, world_size: int) -> Progress:
    """Scheduler, RNG states and progress (with this rank's data position) from a checkpoint."""
    scheduler.load_state_dict(state["scheduler"])
    progress = Progress(**state["progress"])
    if rank == 0:
        _restore_rng(rng, state["python_rng"])
    else:
        prefix = f"rank{rank}."
        _restore_rng({k[len(prefix):]: v for k, v in rng.items() if k.startswith(prefix)},
                     state["ranks"][rank]["python_rng"])
    if world_size > 1:
        progress.extra["data"] = state["ranks"][rank]["data"]
    return progress


def load_state(path: str | Path, model, optimizer, scheduler, rank: int = 0, world_size: int = 1) -> Progress:
    path = Path(path)
    rng, state = _read_common(path, ("trainable.safetensors", "optimizer.pt"), world_size, sharded=False)
    try:
        weights = load_file(str(path / "trainable.safetensors"))
        opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read training checkpoint ({str(e).splitlines()[0]})") from None
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != expected:
        diff = sorted(set(weights) ^ expected)[:3]
        raise CheckpointError(f"{path}: the checkpoint's trainable tensors differ from this run's: {diff}")
    with torch.no_grad():
        for n, t in weights.items():
            if params[n].shape != t.shape:
                raise CheckpointError(f"{path}: tensor {n!r} has shape {list(t.shape)}, "
                                      f"the model has {list(params[n].shape)}")
            params[n].copy_(t)
    optimizer.load_state_dict(opt)
    return _restored(path, state, rng, scheduler, rank, world_size)


def _unreadable_shards(path: Path, e: BaseException) -> CheckpointError:
    """A one-line CheckpointError for what torch.distributed.checkpoint raised reading `path`: its
    CheckpointException (a BaseException, so `except Exception` misses it) wraps each rank's own
    error with a traceback; the first one's first line says what is wrong."""
    failures = getattr(e, "failures", None)
    if failures:
        e = next(iter(failures.values()))[0]
    first = (str(e).splitlines() or [type(e).__name__])[0]
    return CheckpointError(f"{path}: cannot read the sharded checkpoint ({first})")


def load_sharded_state(path: str | Path, model, optimizer, scheduler, rank: int, world_size: int) -> Progress:
    """Resume a sharded run (every rank calls this with the same number of processes that wrote it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    rng, state = _read_common(path, ("shards",), world_size, sharded=True)
    weights, opt = get_state_dict(model, optimizer)
    try:
        dcp.load({"model": weights, "optimizer": opt}, checkpoint_id=str(path / "shards"))
    except (Exception, CheckpointException) as e:
        raise _unreadable_shards(path, e) from None
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=opt)
    return _restored(path, state, rng, scheduler, rank, world_size)


def consolidate(path: str | Path, model) -> None:
    """Load a sharded checkpoint's weights whole into `model` (a plain, unsharded one), in one
    process: torch.distributed.checkpoint reassembles the shards into the model's own tensors."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    path = Path(path)
    weights = model.state_dict()
    try:
        with warnings.catch_warnings():   # "no process group: loading in one process" is the point here
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"model": weights}, checkpoint_id=str(path / "shards"), no_dist=True)
    except (Exception, CheckpointException) as e:
        raise _unreadable_shards(path, e) from None
    model.load_state_dict(weights)
