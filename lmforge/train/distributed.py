"""Several processes on one training run: torch.distributed, as launched by torchrun.

`torchrun --nproc-per-node N -m lmforge finetune ...` starts N copies of the command with RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in their environment. `World.from_env()` reads
them (a plain `lmforge` process is rank 0 of a world of 1, and nothing here does anything for it);
`init()` joins the process group: gloo on CPU, NCCL on CUDA (one GPU per process, cuda:LOCAL_RANK).

What the rest of the code relies on:
  - every rank computes the same data order from the seed and takes its own share of each global
    batch (trainer.py), so N processes with batch B/N each reproduce one process with batch B;
  - only rank 0 writes files (`World.is_main`); the others must never touch the run directory;
  - every collective below is called by all ranks at the same point of the loop, or they hang: so
    every decision that ends in a collective (a step, a log line, an evaluation, a checkpoint, a
    NaN) is made from values every rank has or has received from the others;
  - a rank that fails raises: torchrun then stops the other workers, and the process group's
    timeout (LMFORGE_DIST_TIMEOUT seconds, default 600) ends a collective that would wait forever.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lmforge.errors import ConfigError

DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "World":
        """torchrun's RANK, WORLD_SIZE and LOCAL_RANK; a world of one without them."""
        try:
            world = cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                        int(os.environ.get("LOCAL_RANK", 0)))
        except ValueError:
            raise ConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None
        if world.world_size < 1 or not 0 <= world.rank < world.world_size:
            raise ConfigError(f"RANK={world.rank} is outside WORLD_SIZE={world.world_size}")
        return world

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: list) -> list:
        """This rank's part of a global batch: items rank, rank + N, ... (round-robin, as the
        pre-training data deals its examples), so the shares of a batch differ by at most one."""
        return items[self.rank::self.world_size]


def world() -> World:
    return World.from_env()


def check_batch_size(batch_size: int, option: str = "--batch-size") -> None:
    """The global batch is split evenly over the processes: refuse a size that does not divide."""
    w = world()
    if w.active and batch_size % w.world_size:
        raise ConfigError(f"{option} {batch_size} is not divisible by the {w.world_size} processes "
                          f"(WORLD_SIZE): the global batch is split evenly across them")


def timeout_s() -> float:
    try:
        return float(os.environ.get("LMFORGE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    except ValueError:
        raise ConfigError("LMFORGE_DIST_TIMEOUT must be a number of seconds") from None


def say(message: str) -> None:
    """A line on stderr from rank 0 only (the others would repeat it N times)."""
    if world().is_main:
        print(message, file=sys.stderr, flush=True)


def init(device: torch.device) -> torch.device:
    """Join the process group when launched as several processes; returns the device this rank
    computes on (cuda:LOCAL_RANK for a CUDA run). Safe to call twice (glue runs several trainings)."""
    w = world()
    if not w.active:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", w.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s()),
                                **({"device_id": device} if device.type == "cuda" else {}))
        _plain_kernels()
        say(f"distributed: {w.world_size} processes ({backend}), this is rank {w.rank}; --batch-size is "
            f"the global batch, each process takes 1/{w.world_size} of every batch")
    return device


def _plain_kernels() -> None:
    # The fast CPU kernels are chosen by timing them in each process (kernels/calibrate.py): ranks
    # could choose differently, and every rank would write the kernel cache. Plain PyTorch kernels
    # instead, unless the user forced a choice.
    if os.environ.get("LMFORGE_KERNELS", "").strip() in ("", "auto"):
        from lmforge.kernels.calibrate import CHOICES

        os.environ["LMFORGE_KERNELS"] = "plain"
        CHOICES.reset()
        say("distributed: measured CPU kernels off (LMFORGE_KERNELS=plain) so every rank computes alike")


def wrap(model: torch.nn.Module, device: torch.device, fsdp: bool = False) -> torch.nn.Module:
    """DistributedDataParallel around the model in a world of several processes, else the model.
    DDP registers its all-reduce hooks on parameters with requires_grad only, so LoRA and the other
    adapter methods all-reduce just the adapter.

    fsdp: shard instead (FSDP2's fully_shard on every Transformer block, then on the rest): each rank
    keeps 1/N of every parameter, its gradient and its optimizer state, and gathers a block's
    parameters only while that block runs. The model is sharded in place and returned; build the
    optimizer after this call (its parameters are the shards)."""
    if not world().active:
        return model
    if fsdp:
        return _shard(model)
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    # buffers (position ids) are equal on every rank: no broadcast before each forward pass
    quiet = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters \
        else "broadcast_buffers"
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=False, **{quiet: False})


def _shard(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for block in model.transformer.layers:
        fully_shard(block)
    fully_shard(model)   # embeddings, final norm and heads: one more unit, gathered for the whole pass
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    if "torch.distributed.tensor" not in sys.modules:
        return False   # nothing made a DTensor, and importing the module costs a second per process
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def accumulating(net: torch.nn.Module, model: torch.nn.Module, syncs: bool, sharded: bool):
    """The context of one micro-batch's forward and backward: gradients are reduced across ranks only
    on the step's last micro-batch (`syncs`); the others accumulate locally. sharded: is_sharded(model),
    decided once per run by the caller."""
    if sharded:   # FSDP2: a flag on the module, not a context
        model.set_requires_gradient_sync(syncs)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if syncs or net is model else net.no_sync()


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly sharded) tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """A sharded model's whole state dict on rank 0 (None on the others; every rank must call this).
    An unsharded model's own state dict."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if world().is_main else None


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """The sum over ranks of each value (float64; the values as given in a world of one)."""
    if not world().active:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def from_main(obj):
    """Rank 0's `obj` on every rank."""
    if not world().active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj) -> list | None:
    """Every rank's `obj`, in rank order, on rank 0 (None on the others)."""
    w = world()
    if not w.active:
        return [obj]
    out = [None] * w.world_size if w.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier() -> None:
    if world().active and dist.is_initialized():
        dist.barrier()


class main_first:
    """`with main_first():` rank 0 runs the block (building a cache) before the others read it."""

    def __enter__(self):
        if not world().is_main:
            barrier()

    def __exit__(self, kind, value, tb):
        if world().is_main and kind is None:
            barrier()
        return False


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
