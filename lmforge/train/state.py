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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lmforge.errors import CheckpointError
from lmforge.utils import strict_json
from lmforge.utils.atomic import atomic_dir


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


def save_state(path: str | Path, model, optimizer, scheduler, progress: Progress,
               ranks: list[dict] | None = None) -> None:
    """`ranks`: every rank's rank_state() in rank order, for a run of several processes; without
    it, this process's RNG states (a run of one)."""
    ranks = ranks or [rank_state(progress.extra.get("data"))]
    rng = dict(ranks[0]["rng"])
    for r, s in enumerate(ranks[1:], start=1):
        rng.update({f"rank{r}.{k}": v for k, v in s["rng"].items()})
    with atomic_dir(path) as tmp:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        save_file(rng, str(tmp / "rng.safetensors"))
        state = {"progress": asdict(progress), "scheduler": scheduler.state_dict(),
                 "python_rng": ranks[0]["python_rng"], "world_size": len(ranks)}
        if len(ranks) > 1:
            state["ranks"] = [{"python_rng": s["python_rng"], "data": s["data"]} for s in ranks]
        (tmp / "trainer_state.json").write_text(strict_json.dumps(state, indent=1))


def load_state(path: str | Path, model, optimizer, scheduler, rank: int = 0, world_size: int = 1) -> Progress:
    path = Path(path)
    for name in ("trainable.safetensors", "optimizer.pt", "rng.safetensors", "trainer_state.json"):
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: incomplete training checkpoint, {name} is missing")
    try:
        weights = load_file(str(path / "trainable.safetensors"))
        rng = load_file(str(path / "rng.safetensors"))
        opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        state = json.loads((path / "trainer_state.json").read_text())
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read training checkpoint ({str(e).splitlines()[0]})") from None
    saved_world = int(state.get("world_size", 1))
    if saved_world != world_size:
        raise CheckpointError(f"{path}: the checkpoint was written by a run of {saved_world} process(es), this "
                              f"run has {world_size}: resume with the same number of processes")
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
