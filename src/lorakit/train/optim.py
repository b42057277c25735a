"""AdamW over the trainable parameters (LoRA+ groups, no decay on biases/norms) and the LR schedule."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from lorakit.errors import TrainingError
from lorakit.layers import AdapterRecord
from lorakit.train.config import TrainConfig

__all__ = ["build_optimizer", "build_scheduler", "lr_factor"]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the parameters of `model` that require grad, in up to four groups.

    Groups (empty ones are left out), each named in its `"name"` key:

    - `"decay"`: weights with ≥ 2 dimensions (LoRA A, saved modules' weights) — `cfg.lr`,
      `cfg.weight_decay`;
    - `"no_decay"`: biases and norm weights (< 2 dimensions) — `cfg.lr`, weight decay 0;
    - `"lora_B"`, `"lora_B_no_decay"`: only with `cfg.loraplus_lr_ratio`: every LoRA B
      matrix (found as the `lora_B` of an `AdapterRecord`, not by name) at `cfg.lr × ratio`
      (LoRA+, Hayou et al. 2024, §3: B needs a larger step than A).

    Parameter order inside a group follows `model.named_parameters()`, so building the
    optimizer twice on the same model gives the same state layout (needed to resume).

    Args:
        model: the model (not a DDP wrapper) with its adapter injected.
        cfg: learning rate, weight decay, betas, eps, LoRA+ ratio.

    Returns:
        The optimizer (PyTorch's fused implementation when every parameter is a float tensor on
        CPU or CUDA); each group also carries `"param_names"` (the parameters' names).

    Raises:
        TrainingError: no parameter requires grad.
    """
    b_ids: set[int] = set()
    if cfg.loraplus_lr_ratio is not None:
        for module in model.modules():
            if isinstance(module, AdapterRecord):
                b_ids.add(id(module.lora_B))
    groups: dict[str, dict] = {}
    specs = {
        "decay": (cfg.lr, cfg.weight_decay),
        "no_decay": (cfg.lr, 0.0),
        "lora_B": (cfg.lr * (cfg.loraplus_lr_ratio or 1.0), cfg.weight_decay),
        "lora_B_no_decay": (cfg.lr * (cfg.loraplus_lr_ratio or 1.0), 0.0),
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_b, decays = id(param) in b_ids, param.ndim >= 2
        key = ("lora_B" if is_b else "decay") if decays else ("lora_B_no_decay" if is_b else "no_decay")
        group = groups.setdefault(key, {"params": [], "param_names": []})
        group["params"].append(param)
        group["param_names"].append(name)
    if not groups:
        raise TrainingError(
            "the model has no parameter that requires grad; inject an adapter (lorakit.inject) or load one "
            "with is_trainable=True before training"
        )
    param_groups = []
    for key, (lr, wd) in specs.items():
        if key in groups:
            param_groups.append({**groups[key], "name": key, "lr": lr, "weight_decay": wd})
    # PyTorch's fused AdamW (one kernel over all parameters) where it exists: on CPU it took
    # 30 ms instead of 76 ms per step for the 420 A/B tensors of SmolLM2 all-linear r=16.
    params = [p for group in param_groups for p in group["params"]]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(
        param_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, fused=fused or None
    )


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """The multiplier of the peak learning rate for optimizer step `step` (0-based).

    Warmup is linear, `step / warmup_steps`, so step 0 has factor 0 (as transformers'
    `get_*_schedule_with_warmup`). After it, with progress p = (step − warmup) / (total − warmup):
    cosine 0.5·(1 + cos(π·p)), linear 1 − p, constant 1; never below 0.

    Args:
        step: optimizer steps taken so far.
        warmup_steps: length of the warmup.
        total_steps: length of the run.
        schedule: `"cosine"`, `"linear"` or `"constant"`.

    Returns:
        The factor in [0, 1].
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup, then cosine/linear/constant (see `lr_factor`), as a `LambdaLR`.

    Every group is scaled by the same factor, so LoRA+'s ratio between groups is kept. Call
    `scheduler.step()` once after each `optimizer.step()`.

    Args:
        optimizer: from `build_optimizer` (any optimizer works).
        cfg: warmup_steps and schedule.
        total_steps: optimizer steps of the whole run.

    Returns:
        The scheduler (its state dict holds only numbers, so it is saved as JSON).
    """
    fn = functools.partial(lr_factor, warmup_steps=cfg.warmup_steps, total_steps=total_steps, schedule=cfg.schedule)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: fn(step))
