"""A model's decoder blocks: the units FSDP shards (`sharding.shard`) and gradient checkpointing
recomputes (`checkpointing.enable_grad_checkpointing`), found once, the same way for both."""

from __future__ import annotations

from torch import nn

__all__ = ["decoder_blocks"]


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of `model`, outermost first, in the order `modules()` visits them.

    A transformers model names its block classes in `_no_split_modules` (`LlamaDecoderLayer`,
    `GPT2Block`, ...): every module of such a class (or of a subclass, such as the `FSDP<Block>`
    class `fully_shard` gives a sharded block) not inside another one found. Without that, the
    children of the longest `nn.ModuleList`. Empty when neither exists.
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    if names:
        blocks: list[nn.Module] = []
        for module in model.modules():
            if _named(module, names) and not any(_contains(b, module) for b in blocks):
                blocks.append(module)
        if blocks:
            return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def _named(module: nn.Module, names: set[str]) -> bool:
    return any(cls.__name__ in names for cls in type(module).__mro__)


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())
