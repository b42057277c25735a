"""What the GGUF writers share: llama.cpp's layout of a transformers model, and writing the file.

llama.cpp names tensors by architecture (through the `gguf` package's tensor-name map) and stores
LLaMA's q and k weights with the rows of each head permuted for its rotary layout
(`llama_permute`; it and its inverse live with the GGUF reader, `lorakit.models.gguf_tensors`,
which undoes it when it streams a LLaMA file, and are re-exported here). A tensor is encoded as
F32, F16, BF16 or Q8_0 with the `gguf` package, and a file is written atomically (a temporary file
beside the target, fsynced, renamed).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit import atomic
from lorakit.errors import ConfigError
from lorakit.models.gguf_tensors import llama_permute, llama_unpermute
from lorakit.state import adapter_owner, state_of

__all__ = [
    "ARCHITECTURES",
    "architecture",
    "encode",
    "head_counts",
    "llama_permute",
    "llama_unpermute",
    "lora_owner",
    "tensor_names",
    "write_gguf",
]

ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
}
"""transformers class → (GGUF architecture, whether q/k rows are permuted as llama.cpp's LLaMA converter does)."""


def architecture(model: nn.Module) -> tuple[str, bool, Any]:
    """llama.cpp's architecture for `model` (by its config's `architectures`, else its class).

    Returns:
        `(GGUF architecture, whether q/k rows are permuted, the model's config)`.

    Raises:
        ConfigError: a model lorakit does not map to llama.cpp's tensor names (see `ARCHITECTURES`).
    """
    config = getattr(model, "config", None)
    names = list(getattr(config, "architectures", None) or []) or [type(model).__name__]
    for name in names:
        if name in ARCHITECTURES:
            arch, permute = ARCHITECTURES[name]
            return arch, permute, config
    raise ConfigError(
        f"GGUF export supports {', '.join(sorted(ARCHITECTURES))}; this model is {', '.join(names)}, which lorakit "
        "does not map to llama.cpp's tensor names"
    )


def tensor_names(arch: str, config: Any) -> Any:
    """The `gguf` package's map from transformers tensor names to GGUF ones for `arch` (`get_name`)."""
    import gguf

    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    return gguf.get_tensor_name_map(arch_id, int(config.num_hidden_layers))


def lora_owner(model: nn.Module, adapter_name: str) -> nn.Module:
    """The module carrying lorakit's adapters, checked to have `adapter_name`.

    Raises:
        ConfigError: the model carries no lorakit adapter of that name.
    """
    owner = adapter_owner(model)
    if owner is None or adapter_name not in state_of(owner).configs:
        raise ConfigError(f"the model carries no lorakit adapter named {adapter_name!r}")
    return owner


def head_counts(config: Any) -> dict[str, int]:
    """Heads of the q and k projections (`q_proj`, `k_proj`: k has the key-value heads), for `llama_permute`."""
    heads = int(config.num_attention_heads)
    return {"q_proj": heads, "k_proj": int(getattr(config, "num_key_value_heads", None) or heads)}


def encode(tensor: torch.Tensor, outtype: str) -> tuple[Any, Any]:
    """(numpy data, raw GGML type or None) of a float tensor in `outtype`."""
    import gguf
    import numpy as np

    array = tensor.detach().float().cpu().numpy()
    if outtype == "f32":
        return array.astype(np.float32), None
    if outtype == "f16":
        return array.astype(np.float16), None
    kind = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]
    return gguf.quants.quantize(array, kind), kind


def write_gguf(path: Path, arch: str, metadata: Callable[[Any], None], tensors: list[tuple[str, Any, Any]]) -> Path:
    """Write a GGUF file: `metadata(writer)` adds the key-values, then `tensors` ((name, numpy data,
    raw GGML type or None), in file order) are written, through `lorakit.atomic.write_path`."""
    import gguf

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        metadata(writer)
        for name, data, raw in tensors:
            writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, data, _ in tensors:
            writer.write_tensor_data(data)
        writer.close()

    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic.write_path(path, write)
