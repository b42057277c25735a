"""torch.distributed plumbing for `fit`: process-group start, batch sharding, reductions, barriers."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "dist_info", "init_distributed", "select_rows", "shard_batch"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job.

    Attributes:
        rank: global rank (0 in a single process).
        world_size: number of processes (1 in a single process).
        local_rank: rank on this machine (selects the GPU).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes files."""
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Start the default process group from torchrun's environment, if there is one to start.

    With `WORLD_SIZE > 1` (set by `torchrun`, with `RANK`, `LOCAL_RANK`, `MASTER_ADDR`,
    `MASTER_PORT`) and no group yet, this initialises one: NCCL when CUDA is available (and makes
    `cuda:LOCAL_RANK` the current device), gloo on CPU. An existing group is left as it is.

    Returns:
        This process's rank, world size and local rank (0, 1, 0 when not distributed).
    """
    if not dist.is_available():
        return DistInfo()
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return dist_info()


def dist_info() -> DistInfo:
    """Rank, world size and local rank of the running process group (or a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())),
    )


def shard_batch(batch: dict, info: DistInfo) -> tuple[dict, bool]:
    """Rows `rank::world_size` of every tensor in `batch` whose first dimension is the batch's rows.

    A rank whose share is empty (a batch with fewer rows than ranks) gets the batch's first row
    and `False`, so it still runs forward and backward (DDP needs every rank to) but must give
    that row zero weight.

    Args:
        batch: tensors keyed by name; `labels` (or else `input_ids`) fixes the row count.
        info: this rank and the world size.

    Returns:
        (this rank's batch, whether its rows count).
    """
    if not info.enabled:
        return batch, True
    key = "labels" if "labels" in batch else "input_ids"
    rows = batch[key].shape[0]
    index = torch.arange(info.rank, rows, info.world_size)
    counts = index.numel() > 0
    if not counts:
        index = torch.zeros(1, dtype=torch.long)
    return select_rows(batch, rows, index), counts


def select_rows(batch: dict, rows: int, index: torch.Tensor) -> dict:
    """`batch` with rows `index` of every tensor whose first dimension is `rows`; the rest as it is."""
    out = {}
    for name, value in batch.items():
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == rows:
            out[name] = value.index_select(0, index.to(value.device))
        else:
            out[name] = value
    return out


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a small float64 tensor over all ranks (a no-op in one process)."""
    if not info.enabled:
        return values
    device = _comm_device()
    reduced = values.to(device)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.to(values.device)


def all_gather_bytes(tensor: torch.Tensor, info: DistInfo) -> list[torch.Tensor]:
    """Every rank's copy of a uint8 tensor of the same length on all ranks (one process: [tensor])."""
    if not info.enabled:
        return [tensor]
    device = _comm_device()
    local = tensor.to(device)
    out = [torch.empty_like(local) for _ in range(info.world_size)]
    dist.all_gather(out, local)
    return [t.cpu() for t in out]


def barrier(info: DistInfo) -> None:
    """Wait for every rank (a no-op in one process)."""
    if info.enabled:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
