"""Multi-process training with ``torch.distributed`` (DDP): gloo on CPU, NCCL on GPUs.

Launch any weightlab command under ``torchrun`` and the one training loop shards each global batch across
the ranks, wraps the model in :class:`~torch.nn.parallel.DistributedDataParallel`, reduces evaluation counts
across ranks, and lets only rank 0 write files:

    torchrun --nproc_per_node 2 -m weightlab run forgetting --out runs/ddp

The global batch size stays ``TrainConfig.batch_size`` (each rank takes ``batch_size / world_size``), so a
run with N processes follows the same optimisation path as one process, up to floating-point summation order.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from weightlab.errors import WeightlabError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env() -> bool:
    """Join the process group that ``torchrun`` describes in the environment (no-op for one process)."""
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_distributed()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def check_batch(batch_size: int) -> int:
    """The per-rank batch size; the world size must divide the global batch size."""
    w = world_size()
    if batch_size % w:
        raise WeightlabError(f"the torchrun world size {w} does not divide the batch size {batch_size}; "
                             f"use a batch size that is a multiple of {w}")
    return batch_size // w


def shard(index: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous part of ``index``."""
    return index.tensor_split(world_size())[rank()] if is_distributed() else index


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()
