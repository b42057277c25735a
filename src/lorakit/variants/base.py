"""The `Variant` protocol and the registry of variants (see `lorakit.variants`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch import nn

    from lorakit.config import LoraConfig
    from lorakit.records import AdapterRecord

__all__ = ["VARIANTS", "Variant", "register", "unregister", "variant_for"]


class Variant:
    """How one kind of adapter differs from plain LoRA. Subclass, set `name`, override the hooks.

    The hooks receive the LoRA layer (`lorakit.layers.LoraLayer`, duck-typed: its `base_layer`,
    `base_weight()`, `branch(record, x)`, `delta_weight(name)`) and the adapter's record.

    Attributes:
        name: the variant's key (registry, reprs, analysis reports).
        title: how messages name it (`DoRA`).
        param_names: the parameters the variant adds to a record, by the name PEFT's file uses
            after the module path (`<path>.<name>`), e.g. DoRA's `lora_magnitude_vector`.
        rescales_sum: the output is `rescale(base, record, t)` of t = the plain LoRA output
            (base output + branch): a speed path that computes t may then apply `rescale`.
    """

    name: str = ""
    title: str = ""
    param_names: tuple[str, ...] = ()
    rescales_sum: bool = False

    # -- selection and checks
    def selected(self, config: LoraConfig) -> bool:
        """Whether `config` asks for this variant."""
        raise NotImplementedError

    def config_problems(self, config: LoraConfig) -> list[str]:
        """What in `config` this variant cannot be combined with (one message each)."""
        return []

    def unsupported(self, layer: nn.Module, path: str) -> str | None:
        """Why this variant cannot adapt `layer` (a LoRA wrapper, at module `path`), or None when it can."""
        return None

    # -- parameters
    def init(self, layer: Any, record: AdapterRecord) -> None:
        """Add this variant's parameters to a fresh `record` of `layer` (a no-op adapter at start)."""

    def param_shape(self, layer: Any, record_r: int) -> dict[str, tuple[int, ...]]:
        """The shape each of `param_names` has on `layer` (to check a file before loading it)."""
        return {}

    # -- forward and merge
    def output(self, layer: Any, record: AdapterRecord, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """`result` (the layer's output so far) with this adapter applied: the reference forward."""
        t = result + layer.branch(record, x).to(result.dtype)
        return self.rescale(layer.base_layer, record, t) if self.rescales_sum else t

    def rescale(self, base: nn.Module, record: AdapterRecord, t: torch.Tensor) -> torch.Tensor:
        """For a `rescales_sum` variant: its output from t = base(x) + s·B·A·dropout(x)."""
        raise NotImplementedError

    def merged(self, layer: Any, name: str, weight: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """(`weight` (fp32, the base layer's layout) with adapter `name` merged in, what `unmerged`
        needs to restore it exactly); the layer keeps the second while the adapter is merged."""
        raise NotImplementedError

    def unmerged(self, layer: Any, name: str, weight: torch.Tensor, state: Any) -> torch.Tensor:
        """The inverse of `merged`, given what it returned beside the weight."""
        raise NotImplementedError

    # -- one instance per variant, also in copies of a model
    def __deepcopy__(self, memo: dict) -> Variant:
        return self

    def __reduce__(self):
        return (_registered, (self.name,))

    def __repr__(self) -> str:
        return f"<variant {self.name}>"


VARIANTS: dict[str, Variant] = {}
"""Every registered variant, by name."""


def register(variant: Variant) -> Variant:
    """Make `variant` selectable by configs (`variant_for`) and loadable from files.

    Raises:
        ValueError: a variant of that name is registered already.
    """
    if variant.name in VARIANTS and VARIANTS[variant.name] is not variant:
        raise ValueError(f"a variant named {variant.name!r} is registered already")
    VARIANTS[variant.name] = variant
    return variant


def unregister(name: str) -> None:
    """Remove a registered variant (for tests that register a toy one)."""
    VARIANTS.pop(name, None)


def variant_for(config: LoraConfig) -> Variant | None:
    """The variant `config` selects, or None for plain LoRA (configs selecting two are refused by
    `LoraConfig.problems`)."""
    return next((v for v in VARIANTS.values() if v.selected(config)), None)


def _registered(name: str) -> Variant:
    return VARIANTS[name]
