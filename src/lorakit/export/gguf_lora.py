"""A llama.cpp LoRA adapter as GGUF (`lorakit export --format gguf-lora`).

llama.cpp's adapter format, as its own `convert_lora_to_gguf.py` writes it: `general.type =
adapter`, `adapter.type = lora`, `adapter.lora.alpha` (float32), and for each adapted weight
`<gguf tensor name>.lora_a` (A, r × in) and `.lora_b` (B, out × r), named through the `gguf`
package's tensor-name map. llama.cpp stores LLaMA's q and k weights with the rows of each head
permuted (for its rotary layout); it applies that permutation to ΔW's rows, which for ΔW = B·A
means to B only. llama.cpp scales each adapter by alpha / r (r read from the tensor), so any other
scale — rsLoRA's alpha/√r, a per-module `alpha_pattern` or `rank_pattern` — is folded into B, and
ΔW is the same. DoRA, modules trained in full and biases have no such form: the merged model
(`gguf_merged`) carries them. Its import list from `gguf_layout` is `gguf_merged`'s: both writers
name and lay out tensors as llama.cpp does, through those shared helpers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.export.gguf_layout import (
    architecture,
    encode,
    head_counts,
    llama_permute,
    lora_owner,
    tensor_names,
    write_gguf,
)
from lorakit.extras import require
from lorakit.layers import LoraLinear
from lorakit.state import lora_layers, state_of
from lorakit.variants import variant_for

__all__ = ["check_lora_config", "gguf_lora_tensors", "write_lora"]

_MERGED_INSTEAD = "export the merged model instead (--format gguf), which carries any adapter"


def check_lora_config(config: Any) -> None:
    """Refuse an adapter whose config (a `LoraConfig`) says it has no llama.cpp LoRA form.

    Needs no model, so `export_gguf` calls it on an adapter directory's config before loading one.

    Raises:
        ConfigError: a LoRA variant (DoRA: llama.cpp applies only s·B·A), `modules_to_save` or
            trained biases (the merged model carries them).
    """
    variant = variant_for(config)
    if variant is not None:
        raise ConfigError(
            f"a {variant.title} adapter has no llama.cpp LoRA form (llama.cpp adds s·B·A alone; "
            f"{', '.join(variant.param_names)} would be lost); {_MERGED_INSTEAD}"
        )
    if config.modules_to_save:
        raise ConfigError(
            f"modules_to_save {list(config.modules_to_save)} are trained in full, which a llama.cpp LoRA adapter "
            f"cannot carry; {_MERGED_INSTEAD}"
        )
    if config.bias != "none":
        raise ConfigError(
            f"bias={config.bias!r} trains biases, which a llama.cpp LoRA adapter cannot carry; {_MERGED_INSTEAD}"
        )


def gguf_lora_tensors(model: nn.Module, adapter_name: str = "default") -> tuple[float, dict[str, torch.Tensor]]:
    """The tensors of a llama.cpp LoRA adapter for `model`'s adapter `adapter_name`.

    Returns:
        `(alpha, tensors)`: the `adapter.lora.alpha` to write, and `{"<gguf name>.lora_a": A,
        "<gguf name>.lora_b": B'}` in float32, B' with the scale folded in and the rows permuted
        where llama.cpp permutes the base weight, so that (alpha / r) · B'·A is the permuted ΔW.

    Raises:
        ConfigError: an architecture lorakit does not map, DoRA, modules trained in full (or
            biases), a layer type llama.cpp's adapters do not cover, an output head tied to the
            embeddings (llama.cpp ignores its adapter), or no adapter of that name.
    """
    require("gguf", "cli", "exporting GGUF files")
    owner = lora_owner(model, adapter_name)
    config = state_of(owner).configs[adapter_name]
    arch, permute, hf_config = architecture(owner)
    check_lora_config(config)
    names = tensor_names(arch, hf_config)
    heads = head_counts(hf_config)
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    alpha = float(config.lora_alpha)
    tensors: dict[str, torch.Tensor] = {}
    for path, layer in lora_layers(owner):
        if adapter_name not in layer.adapters:
            continue
        if not isinstance(layer, LoraLinear) or layer.is_conv1d:
            kind = type(layer.base_layer).__name__
            raise ConfigError(f"{path}: a {kind} adapter has no llama.cpp LoRA form; {_MERGED_INSTEAD}")
        record = layer.adapters[adapter_name]
        if record.slices is not None:
            raise ConfigError(
                f"{path}: adapters on slices of a fused layer are not exported to GGUF; {_MERGED_INSTEAD}"
            )
        leaf = path.rsplit(".", 1)[-1]
        if leaf == "lm_head" and tied:
            raise ConfigError(
                f"{path}: the output head is tied to the embeddings, and llama.cpp ignores an adapter on it; "
                f"train without lm_head, or {_MERGED_INSTEAD}"
            )
        gguf_name = names.get_name(f"{path}.weight", try_suffixes=(".weight",))
        if gguf_name is None:
            raise ConfigError(f"{path}: no GGUF tensor name for it in the {arch} architecture; {_MERGED_INSTEAD}")
        A = record.lora_A.detach().float().cpu()
        B = record.lora_B.detach().float().cpu()
        r = A.shape[0]
        fold = float(record.scaling) / (alpha / r)  # llama.cpp scales by alpha / r
        if fold != 1.0:
            B = B * fold
        if permute and leaf in heads:
            B = llama_permute(B, heads[leaf])
        tensors[f"{gguf_name}.lora_a"] = A.contiguous()
        tensors[f"{gguf_name}.lora_b"] = B.contiguous()
    if not tensors:
        raise ConfigError(f"adapter {adapter_name!r} adapts no layer")
    return alpha, tensors


def write_lora(model: nn.Module, path: Path, outtype: str, adapter_name: str) -> Path:
    """Write `model`'s adapter `adapter_name` to `path` as a llama.cpp LoRA adapter.

    Args:
        model: a model carrying the adapter.
        path: the `.gguf` file (replaced atomically).
        outtype: `f32`, `f16` or `bf16` (checked by `export_gguf`).
        adapter_name: which adapter.

    Returns:
        `path`.

    Raises:
        ConfigError: see `gguf_lora_tensors`.
    """
    import gguf

    alpha, tensors = gguf_lora_tensors(model, adapter_name)
    arch, _, config = architecture(model)
    encoded = [(name, *encode(t, outtype)) for name, t in tensors.items()]

    def metadata(writer: Any) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        name = getattr(config, "name_or_path", None)
        if name:
            writer.add_string(gguf.Keys.General.NAME, f"LoRA adapter for {name}")

    return write_gguf(path, arch, metadata, encoded)
