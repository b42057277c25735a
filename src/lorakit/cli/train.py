"""`lorakit train`: fine-tune with LoRA. Flags: `TrainRun`, `LoraConfig` and `TrainConfig` fields."""

from __future__ import annotations

from lorakit.cli.command import Command
from lorakit.cli.flags import FlagSpec
from lorakit.config import LoraConfig
from lorakit.train.config import TrainConfig
from lorakit.train.run import TrainRun, train_run

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
)
