"""The trainer across processes: one process per device under ``torchrun``, with DDP or FSDP2.

    one GPU       lmscale train --device cuda …
    8 GPUs        torchrun --standalone --nproc_per_node 8 -m lmscale train --device cuda --parallel fsdp …
    2 nodes × 8   torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
                      --rdzv-id RUN -m lmscale train --device cuda --parallel fsdp …   (on each node)

Every process draws the same global batch from ``(seed, step)`` and trains on its own slice of it, so a
config means the same run on any number of processes: ``batch_size`` counts the sequences of one
micro-step summed over processes. DDP keeps a full replica per process and all-reduces gradients;
FSDP2 (``fully_shard`` per block, then the root) shards parameters, gradients and optimiser state.
Checkpoints hold full (gathered) state dicts keyed by parameter name, so a run saved under one layout
resumes under any other, a single process included.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lmscale.config import ConfigError


@dataclass(frozen=True)
class World:
    """This process's place among the training processes; a lone process is rank 0 of 1."""

    size: int = 1
    rank: int = 0
    local_rank: int = 0
    parallel: str = "none"  # "none" | "ddp" | "fsdp", never "auto"

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes logs, checkpoints and records."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.parallel != "none"


def world_from_env(parallel: str, env: Mapping[str, str] | None = None) -> World:
    """Read torchrun's ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` and settle ``parallel='auto'``.

    Touches no process group, so a config that cannot work fails on every rank before any collective.
    """
    env = os.environ if env is None else env
    size = int(env.get("WORLD_SIZE", "1"))
    if parallel == "auto":
        parallel = "ddp" if size > 1 else "none"
    if parallel == "none" and size > 1:
        raise ConfigError("parallel", parallel, f"WORLD_SIZE={size} processes would each train the whole model "
                                                "and write the same files; use 'ddp' or 'fsdp', or start one process")
    if parallel != "none" and "WORLD_SIZE" not in env:
        raise ConfigError("parallel", parallel, "needs processes started by torchrun (WORLD_SIZE is unset): "
                                                "torchrun --standalone --nproc_per_node N -m lmscale train …")
    return World(size=size, rank=int(env.get("RANK", "0")), local_rank=int(env.get("LOCAL_RANK", "0")),
                 parallel=parallel)


def process_device(world: World, device: str) -> torch.device:
    """Under torchrun, ``device='cuda'`` means this process's GPU, ``cuda:LOCAL_RANK``."""
    if not (world.distributed and device.startswith("cuda")):
        return torch.device(device)
    if device != "cuda":
        raise ConfigError("device", device, "under torchrun each process takes the GPU cuda:LOCAL_RANK; pass 'cuda'")
    return torch.device("cuda", world.local_rank)


def init_process_group(world: World, device: torch.device) -> None:
    """Join the processes (NCCL between GPUs, gloo on CPU) once per process, and leave at exit.

    A group that exists already (set up by a script or notebook, or by an earlier run in this process)
    is used as it is: torchrun's rendezvous cannot be joined a second time, so the group outlives ``train``.
    """
    if not world.distributed or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    atexit.register(_leave_process_group)


def _leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def parallelize(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """DDP wrapper or FSDP2 sharding; returns the module to call for training.

    FSDP2 shards each block as one unit (all-gathered just before it runs) and puts the rest, including
    the tied embedding/head matrix, in the root unit. The sharded model stays the same object.
    """
    if world.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if world.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    return model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, world: World, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-step of an accumulation."""
    if world.parallel == "ddp" and not enabled:
        with model.no_sync():
            yield
        return
    if world.parallel == "fsdp":
        model.set_requires_gradient_sync(enabled)
    yield


def all_reduce(values: torch.Tensor, world: World, op: str = "sum") -> torch.Tensor:
    """Sum (or max) a tensor over the processes, in place; a lone process returns it unchanged."""
    if world.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return values


def broadcast(obj: Any, world: World) -> Any:
    """Rank 0's ``obj`` on every rank (pickled; for small metadata, not tensors of weights)."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Model and optimiser state keyed by parameter name, gathered on rank 0's CPU (empty elsewhere).

    A collective under FSDP: every rank must call it. The same format for every layout is what lets a
    checkpoint move between one process, DDP and FSDP.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def load_full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                          optimizer_state: dict, world: World) -> None:
    """Inverse of ``full_state_dicts``: under several processes rank 0's dicts are broadcast and sharded."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=world.distributed)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
