"""`lorakit inspect`: a model's adaptable layers, and what a LoRA config would adapt. Flags: `LoraConfig`."""

from __future__ import annotations

from collections.abc import Callable

from lorakit.cli.command import Command
from lorakit.cli.flags import FlagSpec
from lorakit.config import LoraConfig
from lorakit.inject import preview
from lorakit.models import ModelSource, load_model
from lorakit.targeting import adaptable_modules


def _run(source: ModelSource, config: LoraConfig, echo: Callable[[str], None]) -> dict:
    model, _, name = load_model(source.model, task=source.task, num_labels=source.num_labels)
    layers = adaptable_modules(model)
    shapes: dict[str, list] = {}
    for path, module in layers.items():
        entry = shapes.setdefault(path.rsplit(".", 1)[-1], [type(module).__name__, list(module.weight.shape), 0])
        entry[2] += 1
    echo(f"{name}: {len(layers)} adaptable layers")
    for leaf, (kind, shape, count) in shapes.items():
        echo(f"  {leaf:<24} {kind:<10} weight {shape} ×{count}")
    sizes = preview(model, config)
    total = sum(p.numel() for p in model.parameters())
    params = sum(sizes.values())
    target = config.target_modules if config.target_modules is not None else "default (q, v)"
    echo(
        f"config r={config.r}, target={target}: adapts {len(sizes)} layers, "
        f"{params:,} trainable parameters ({100 * params / total:.3f}% of {total:,})"
    )
    return {"layers": len(layers), "adapted": len(sizes), "trainable": params, "total": total}


COMMAND = Command(
    name="inspect",
    summary="List a model's adaptable layers and what a LoRA config would adapt.",
    specs=(
        FlagSpec(ModelSource, "model", exclude=frozenset({"adapter", "quantize"})),
        FlagSpec(LoraConfig, "LoRA (lorakit.LoraConfig)", aliases={"r": ("-r",), "target_modules": ("--target",)}),
    ),
    run=_run,
)
