"""Training: `train_step` (one optimizer step) and `fit()` — a plain loop a test can call — with durable
checkpoints, exact resume, DDP and FSDP (`shard`); `run` is the whole `lorakit train` job around them.

>>> from lorakit.train import TrainConfig, fit
>>> result = fit(model, batches_fn, TrainConfig(lr=1e-3, max_steps=100), "runs/x", batches_per_epoch=50)
>>> result.adapter_dir                      # runs/x/adapter: PEFT-format adapter
"""

from lorakit.train.checkpoint import latest_checkpoint, list_checkpoints, resumable, verify
from lorakit.train.checkpointing import disable_grad_checkpointing, enable_grad_checkpointing, is_grad_checkpointing
from lorakit.train.config import TrainConfig
from lorakit.train.distributed import DistInfo, init_distributed
from lorakit.train.lock import run_lock
from lorakit.train.loop import FitResult, fit
from lorakit.train.loss import count_targets, loss_sum
from lorakit.train.optim import build_optimizer, build_scheduler, lr_factor
from lorakit.train.sharding import gathered, is_sharded, shard
from lorakit.train.step import StepResult, train_step

__all__ = [
    "DistInfo",
    "FitResult",
    "StepResult",
    "TrainConfig",
    "build_optimizer",
    "build_scheduler",
    "count_targets",
    "disable_grad_checkpointing",
    "enable_grad_checkpointing",
    "fit",
    "gathered",
    "init_distributed",
    "is_grad_checkpointing",
    "is_sharded",
    "latest_checkpoint",
    "list_checkpoints",
    "loss_sum",
    "lr_factor",
    "resumable",
    "run_lock",
    "shard",
    "train_step",
    "verify",
]
