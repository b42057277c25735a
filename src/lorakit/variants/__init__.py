"""LoRA variants: an adapter that differs from plain LoRA (h = W0·x + s·B·A·x) says how, in one module.

A variant (a `Variant` subclass, one instance registered here) owns everything that makes it
different, as PEFT's `LoraVariant` does: which config selects it, the layers it supports, the
parameters it adds to an adapter record (their initial values and their keys in PEFT's file),
its forward contribution, and its ΔW for merge and unmerge. `lorakit.layers` calls these hooks
wherever a record has a `variant`; nothing else names a variant. The speed paths in
`lorakit.kernels` compute plain LoRA only and refuse any record with a variant
(`kernels.guards.computes`), except where a variant declares the form a path handles
(`rescales_sum`: its output is a rescaling of the plain LoRA output, which the fused node computes).

Adding a variant: a module here with the subclass, `register(...)` of its instance below, the
config field that selects it (`lorakit.config.LoraConfig`), and its tests (hand computation, PEFT
parity where PEFT has it, and `tests/unit/test_variants.py`'s speed-path checks run on it).
"""

from lorakit.variants.base import VARIANTS, Variant, register, unregister, variant_for
from lorakit.variants.dora import DORA, Dora

__all__ = ["DORA", "VARIANTS", "Dora", "Variant", "register", "unregister", "variant_for"]

register(DORA)
