"""`lorakit inspect`: a model's adaptable layers, what a LoRA config would adapt, and the memory
training it would take. Flags: `ModelSource`, `LoraConfig`, `Preflight`.

Nothing but the model's config is read: the model is built on the meta device (`memory.model_skeleton`).
"""

from __future__ import annotations

from collections.abc import Callable

from lorakit.cli.command import Command
from lorakit.cli.flags import FlagSpec
from lorakit.config import LoraConfig
from lorakit.inject import preview
from lorakit.memory import Preflight, available_memory, estimate, model_skeleton, report
from lorakit.models import ModelSource
from lorakit.targeting import adaptable_modules


def _run(source: ModelSource, config: LoraConfig, preflight: Preflight, echo: Callable[[str], None]) -> dict:
    model, name = model_skeleton(source.model, task=source.task, num_labels=source.num_labels)
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
    memory = estimate(
        model,
        quantize=preflight.quantize,
        lora=config,
        batch_size=preflight.batch_size,
        seq_len=preflight.seq_len,
        task=source.task,
        num_labels=source.num_labels,
        device=preflight.device,
    )
    available = available_memory(preflight.device)
    for line in report(memory, available):
        echo(line)
    return {
        "layers": len(layers),
        "adapted": len(sizes),
        "trainable": params,
        "total": total,
        "memory": memory,
        "available": available,
    }


COMMAND = Command(
    name="inspect",
    summary="List a model's adaptable layers, what a LoRA config would adapt, and the memory training would take.",
    specs=(
        FlagSpec(ModelSource, "model", exclude=frozenset({"adapter", "quantize"})),
        FlagSpec(LoraConfig, "LoRA (lorakit.LoraConfig)", aliases={"r": ("-r",), "target_modules": ("--target",)}),
        FlagSpec(Preflight, "memory estimate (lorakit.memory.Preflight)"),
    ),
    run=_run,
)
