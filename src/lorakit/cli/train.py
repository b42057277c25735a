"""`lorakit train`: fine-tune with LoRA. Flags: `TrainRun`, `LoraConfig` and `TrainConfig` fields."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lorakit.cli.command import Command
from lorakit.cli.flags import FlagSpec
from lorakit.config import LoraConfig
from lorakit.train.config import TrainConfig
from lorakit.train.run import TrainRun, recorded_settings, train_run


def _recorded(given: Mapping[str, Any]) -> tuple[dict[str, Any], str] | None:
    """With --resume: the run's recorded settings (its run_config.json), beneath the flags given."""
    if not given.get("resume"):
        return None
    out = Path(given.get("out") or TrainRun.out)
    settings = recorded_settings(out)
    return (settings, str(out / "run_config.json")) if settings is not None else None


COMMAND = Command(
    name="train",
    summary="Fine-tune a model with LoRA (default: the packaged SmolLM2-135M-Instruct on the bundled E2E "
    "sample, one epoch; `--config quickstart`: 60 steps).",
    specs=(
        FlagSpec(TrainRun, "run: model, data, output", aliases={"out": ("-o",)}),
        FlagSpec(
            LoraConfig,
            "LoRA (lorakit.LoraConfig)",
            aliases={"r": ("-r",), "target_modules": ("--target",), "use_rslora": ("--rslora",)},
        ),
        FlagSpec(TrainConfig, "training (lorakit.train.TrainConfig)"),
    ),
    run=train_run,
    recorded=_recorded,
)
