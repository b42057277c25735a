"""lorakit: LoRA (Hu et al., ICLR 2022) for any PyTorch model.

>>> import lorakit
>>> lorakit.inject(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
>>> lorakit.save_adapter(model, "out/")          # PEFT's format
>>> lorakit.quantize(model, "nf4")               # before inject: a frozen 4-bit base (QLoRA)
"""

# isort: off
import lorakit.threads  # noqa: F401  first, before torch loads: LORAKIT_SHARED_CPU=1 makes idle threads sleep
# isort: on

from lorakit.adapters import (
    active_adapters,
    adapter_per_row,
    delete_adapter,
    disable_adapters,
    list_adapters,
    set_adapter,
    trainable_parameters,
)
from lorakit.config import LoraConfig
from lorakit.errors import (
    AdapterFormatError,
    ConfigError,
    LorakitError,
    ShapeMismatchError,
    TargetNotFoundError,
    UnsupportedLayerError,
)
from lorakit.export.gguf import export_gguf
from lorakit.inject import inject, unload
from lorakit.io import load_adapter, read_adapter_config, save_adapter
from lorakit.layers import BASE
from lorakit.merge import add_weighted_adapter, merge, merge_and_unload, unmerge
from lorakit.quantization import dequantize, quantize

__version__ = "0.1.0"

__all__ = [
    "BASE",
    "AdapterFormatError",
    "ConfigError",
    "LoraConfig",
    "LorakitError",
    "ShapeMismatchError",
    "TargetNotFoundError",
    "UnsupportedLayerError",
    "active_adapters",
    "adapter_per_row",
    "add_weighted_adapter",
    "delete_adapter",
    "dequantize",
    "disable_adapters",
    "export_gguf",
    "inject",
    "list_adapters",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "quantize",
    "read_adapter_config",
    "save_adapter",
    "set_adapter",
    "trainable_parameters",
    "unload",
    "unmerge",
]
