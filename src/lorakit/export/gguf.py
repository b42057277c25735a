"""GGUF files for llama.cpp, Ollama and LM Studio: a LoRA adapter, or the merged model.

Written with the maintained `gguf` package (the extra `lorakit[cli]`), no llama.cpp build needed.

- `gguf-lora`: llama.cpp's adapter format, as its own `convert_lora_to_gguf.py` writes it:
  `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha` (float32), and for each
  adapted weight `<gguf tensor name>.lora_a` (A, r × in) and `.lora_b` (B, out × r), named through
  the `gguf` package's tensor-name map. llama.cpp stores LLaMA's q and k weights with the rows of
  each head permuted (for its rotary layout); it applies that permutation to ΔW's rows, which for
  ΔW = B·A means to B only. llama.cpp scales each adapter by alpha / r (r read from the tensor),
  so any other scale — rsLoRA's alpha/√r, a per-module `alpha_pattern` or `rank_pattern` — is
  folded into B, and ΔW is the same.
- `gguf`: one file with the merged model. When the base came from a GGUF file (the packaged default,
  a Q4_1 file), it starts from that file (its metadata, tokenizer and tensors) and replaces the
  adapted weights by dequant(W) + ΔW. By default (`outtype="auto"`) every other tensor is copied
  as it is stored, bit-identical to the base file, and an adapted one is written in the base
  tensor's type if that is a float type, else in F16: lorakit never quantises a weight it was not
  asked to. `f32`, `f16` or `bf16` re-encode the whole file: every tensor dequantised with the
  `gguf` package and written in that type, except 1-D tensors (norms), which stay F32 as llama.cpp's
  converter keeps them. `q8_0` quantises the adapted weights only; the base's tensors are never
  re-quantised. When the base came from a transformers directory, the whole file is written: the
  config's hyper-parameters, the directory's BPE vocabulary, merges, special tokens and chat
  template (through the `gguf` package's readers), every merged tensor (`auto`: F16).

  `general.file_type` says what the merged file holds, as llama.cpp labels a mixed file: the type
  most of its matrices have ("mostly Q4_1", except 1-D tensors), llama.cpp's `LlamaFileType` for it.
  A merge that adapts a few of the packaged base's projections stays mostly Q4_1; one that adapts
  all of them is mostly F16.

Both are written atomically (a temporary file beside the target, fsynced, renamed).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lorakit.errors import ConfigError, ModelLoadError
from lorakit.extras import require

__all__ = ["ARCHITECTURES", "GgufExport", "describe_gguf", "export_gguf", "gguf_lora_tensors", "llama_permute"]

Format = Literal["gguf-lora", "gguf"]
OutType = Literal["auto", "f32", "f16", "bf16", "q8_0"]

ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
}
"""transformers class → (GGUF architecture, whether q/k rows are permuted as llama.cpp's LLaMA converter does)."""

_LORA_OUTTYPES = ("f32", "f16", "bf16")
_MERGED_OUTTYPES = ("auto", "f16", "bf16", "f32", "q8_0")
_WHOLE_FILE_OUTTYPES = ("f32", "f16", "bf16")  # float types: re-encoding into them quantises nothing


@dataclass
class GgufExport:
    """What `lorakit export` writes.

    Args:
        format: `gguf-lora` (a llama.cpp LoRA adapter: load it beside the base GGUF with
            `--lora`) or `gguf` (the merged model as one GGUF file, from the base's own GGUF).
        out: the `.gguf` file to write (replaced atomically if it exists); required.
        outtype: an adapter's tensor type: `f32` (`auto`), `f16` or `bf16`. A merged model's: `auto`
            keeps the base GGUF's tensors as stored and writes the adapted ones in the base's float
            type, or F16 where the base is quantised (the packaged base is Q4_1); `f32`, `f16` or
            `bf16` re-encode the whole file (base tensors dequantised; 1-D ones stay F32, as in
            llama.cpp); `q8_0` quantises only the adapted tensors (the base's are never
            re-quantised). From a transformers directory, `auto` is f16.
        base_gguf: the base model's GGUF file, for `gguf` (default: the packaged model's file, or
            the `.gguf` the model was loaded from).
    """

    format: Format = "gguf-lora"
    out: str | None = None
    outtype: OutType = "auto"
    base_gguf: str | None = None


def llama_permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """Permute the rows of a LLaMA q or k projection (or of its B) the way llama.cpp's converter does.

    Within each of the `n_head` heads, rows [0, 2, 4, ..., 1, 3, 5, ...] of the head's half-split
    rotary layout become interleaved pairs (`reshape(n_head, 2, d/2, ...).swapaxes(1, 2)`).
    """
    rows = weights.shape[0]
    return weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def llama_unpermute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `llama_permute`."""
    rows = weights.shape[0]
    return weights.reshape(n_head, rows // n_head // 2, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _architecture(model: nn.Module) -> tuple[str, bool, Any]:
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


def _name_map(arch: str, config: Any) -> Any:
    import gguf

    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    return gguf.get_tensor_name_map(arch_id, int(config.num_hidden_layers))


def _owner(model: nn.Module, adapter_name: str) -> nn.Module:
    """The module carrying lorakit's adapters, checked to have `adapter_name`."""
    from lorakit.state import adapter_owner, state_of

    owner = adapter_owner(model)
    if owner is None or adapter_name not in state_of(owner).configs:
        raise ConfigError(f"the model carries no lorakit adapter named {adapter_name!r}")
    return owner


def _merged_layers(owner: nn.Module, adapter_name: str) -> dict[str, Any]:
    """path -> LoRA layer for every layer carrying `adapter_name`, checked to be one a merged GGUF covers."""
    from lorakit.layers import LoraLinear
    from lorakit.state import lora_layers

    layers = {path: layer for path, layer in lora_layers(owner) if adapter_name in layer.adapters}
    for path, layer in layers.items():
        if not isinstance(layer, LoraLinear) or layer.is_conv1d or layer.adapters[adapter_name].slices is not None:
            raise ConfigError(f"{path}: merged GGUF export covers adapters on plain linear layers only")
    return layers


def _head_counts(config: Any) -> dict[str, int]:
    heads = int(config.num_attention_heads)
    return {"q_proj": heads, "k_proj": int(getattr(config, "num_key_value_heads", None) or heads)}


_MERGED_INSTEAD = "export the merged model instead (--format gguf), which carries any adapter"


def _check_lora_config(config: Any) -> None:
    """Refuse an adapter whose config (a `LoraConfig`) says it has no llama.cpp LoRA form."""
    if config.use_dora:
        raise ConfigError(
            f"a DoRA adapter has no llama.cpp LoRA form (its magnitude vector rescales W); {_MERGED_INSTEAD}"
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
    from lorakit.layers import LoraLinear
    from lorakit.state import lora_layers, state_of

    owner = _owner(model, adapter_name)
    config = state_of(owner).configs[adapter_name]
    arch, permute, hf_config = _architecture(owner)
    _check_lora_config(config)
    names = _name_map(arch, hf_config)
    heads = _head_counts(hf_config)
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


# ----------------------------------------------------------------------------- writing


def _encoded(tensor: torch.Tensor, outtype: str) -> tuple[Any, Any]:
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


def _write_atomically(
    path: Path, arch: str, metadata: Callable[[Any], None], tensors: list[tuple[str, Any, Any]]
) -> Path:
    """Write a GGUF file: `metadata(writer)` adds the key-values, then `tensors` ((name, numpy data,
    raw GGML type or None), in file order) are written, through `lorakit.atomic.write_path`."""
    import gguf

    from lorakit import atomic

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


def _write_lora(model: nn.Module, path: Path, outtype: str, adapter_name: str) -> Path:
    import gguf

    alpha, tensors = gguf_lora_tensors(model, adapter_name)
    arch, _, config = _architecture(model)
    encoded = [(name, *_encoded(t, outtype)) for name, t in tensors.items()]

    def metadata(writer: Any) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        name = getattr(config, "name_or_path", None)
        if name:
            writer.add_string(gguf.Keys.General.NAME, f"LoRA adapter for {name}")

    return _write_atomically(path, arch, metadata, encoded)


def base_gguf_of(model: nn.Module) -> Path | None:
    """The GGUF file `model` was loaded from, when lorakit can tell: the packaged model's file, or a
    `.gguf` path the model records as its name."""
    from lorakit.models import PACKAGED_NAMES, _packaged_gguf

    name = str(getattr(getattr(model, "config", None), "name_or_path", "") or "")
    if name == PACKAGED_NAMES.get("smollm2-135m"):
        return _packaged_gguf()
    if name.lower().endswith(".gguf") and Path(name).is_file():
        return Path(name)
    return None


def _write_merged(model: nn.Module, path: Path, outtype: str, adapter_name: str, base_gguf: Path | None) -> Path:
    import gguf

    from lorakit.quantization import dequantized_weight

    owner = _owner(model, adapter_name)
    arch, permute, config = _architecture(owner)
    source = Path(base_gguf) if base_gguf is not None else base_gguf_of(owner)
    if source is None:
        tokenizer_dir = _tokenizer_dir_of(owner)
        if tokenizer_dir is None:
            raise ConfigError(
                "a merged GGUF needs the base's GGUF file or its transformers directory (for the tokenizer), and "
                "this model records neither: pass base_gguf (--base-gguf FILE.gguf) or load the base from its "
                "directory (--model DIR); or write the merged transformers directory (`lorakit merge`) and convert "
                "it with llama.cpp's convert_hf_to_gguf.py"
            )
        whole = "f16" if outtype == "auto" else outtype
        return _write_merged_from_directory(owner, path, whole, adapter_name, tokenizer_dir)
    try:
        reader = gguf.GGUFReader(source)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read the base GGUF file {source}: {err}") from None
    file_arch = reader.fields.get("general.architecture")
    file_arch = file_arch.contents() if file_arch is not None else None
    if file_arch != arch:
        raise ConfigError(f"{source} is a {file_arch!r} model; this model is {arch!r}")
    names = _name_map(arch, config)
    heads = _head_counts(config)
    by_name = {t.name: t for t in reader.tensors}
    merged_weights: dict[str, torch.Tensor] = {}
    for module_path, layer in _merged_layers(owner, adapter_name).items():
        gguf_name = names.get_name(f"{module_path}.weight", try_suffixes=(".weight",))
        if gguf_name is None or gguf_name not in by_name:
            raise ConfigError(f"{module_path}: {source} has no tensor {gguf_name!r} for it")
        base = _dequantized(by_name[gguf_name], source)
        leaf = module_path.rsplit(".", 1)[-1]
        weight = dequantized_weight(layer.base_layer.weight.detach()).float().cpu()
        if base.shape != weight.shape:
            raise ConfigError(
                f"{module_path}: {source}'s {gguf_name} is {list(base.shape)}, the model's weight "
                f"{list(weight.shape)}: the GGUF file is not this model's base"
            )
        in_file_order = llama_permute(weight, heads[leaf]) if permute and leaf in heads else weight
        gap = float((in_file_order - base).abs().max())
        if gap > 1e-5:
            raise ConfigError(
                f"{module_path}: the model's base weight differs from {source}'s {gguf_name} by up to {gap:.3g}: "
                "the adapter's model was not loaded from this GGUF file (or its base was quantized again)"
            )
        delta = layer.delta_weight(adapter_name).detach().float().cpu()
        if permute and leaf in heads:
            delta = llama_permute(delta, heads[leaf])
        merged = base + delta
        if not torch.isfinite(merged).all():
            raise ConfigError(f"{module_path}: the merged weight is not finite; nothing was written")
        merged_weights[gguf_name] = merged

    tensors = [(t.name, *_merged_encoding(t, merged_weights.get(t.name), outtype, source)) for t in reader.tensors]
    file_type = _file_type(tensors)

    def metadata(writer: Any) -> None:
        for field in reader.fields.values():
            if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
                continue
            if field.name == gguf.Keys.General.FILE_TYPE:  # the base's: this file's instead, in its place
                if file_type is not None:  # else llama.cpp guesses it from the tensors, as _file_type does
                    writer.add_file_type(file_type)
                continue
            value_type = field.types[0]
            sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
        if file_type is not None and gguf.Keys.General.FILE_TYPE not in reader.fields:
            writer.add_file_type(file_type)

    return _write_atomically(path, arch, metadata, tensors)


def _dequantized(tensor: Any, source: Path) -> torch.Tensor:
    """A GGUF tensor's values in float32, shaped as torch orders them (the file lists dims reversed)."""
    import gguf

    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        kind = tensor.tensor_type.name
        raise ConfigError(
            f"{source}: the gguf package cannot dequantise {tensor.name} ({kind}); nothing was written"
        ) from None
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    return torch.from_numpy(values.copy()).float().reshape(shape)


_FLOAT_OUTTYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16"}  # GGML float type -> outtype
_INTEGER_TYPES = ("I8", "I16", "I32", "I64")  # not weights: copied as stored


def _merged_encoding(stored: Any, merged: torch.Tensor | None, outtype: str, source: Path) -> tuple[Any, Any]:
    """(data, raw GGML type or None) for one tensor of the base GGUF in a merged file; `merged` is its
    merged weight if the adapter changes it (see the module docstring for what each outtype keeps)."""
    kind = stored.tensor_type.name
    if outtype in _WHOLE_FILE_OUTTYPES and kind not in _INTEGER_TYPES:
        value = merged if merged is not None else _dequantized(stored, source)
        # llama.cpp's converter keeps 1-D tensors and norms in F32 ("most of the codebase that takes
        # in 1D tensors or norms only handles F32 tensors").
        one_d = value.ndim <= 1 or stored.name.endswith("_norm.weight")
        return _encoded(value, "f32" if one_d else outtype)
    if merged is None:
        return stored.data, stored.tensor_type  # as stored: the same type and bytes
    if outtype == "auto":
        return _encoded(merged, _FLOAT_OUTTYPES.get(kind, "f16"))
    if merged.shape[-1] % 32:  # Q8_0 packs rows in blocks of 32
        return _encoded(merged, "f16")
    return _encoded(merged, outtype)


# GGML type -> llama.cpp's LlamaFileType name where it is not MOSTLY_<type> (llama-model-loader.cpp
# names a file by its most common tensor type with this table when general.file_type is missing).
_FILE_TYPE_NAMES = {"F32": "ALL_F32", "Q3_K": "MOSTLY_Q3_K_M", "Q4_K": "MOSTLY_Q4_K_M", "Q5_K": "MOSTLY_Q5_K_M"}


def _file_type(tensors: Sequence[tuple[str, Any, Any]]) -> int | None:
    """llama.cpp's `general.file_type` for these (name, data, raw type) tensors: the type most of the
    matrices have — its file types read "mostly X, except 1-D tensors" — or None if llama.cpp has no
    file type for it. Ties go to the type that comes first in the file."""
    import gguf

    def ggml_type(data: Any, raw: Any) -> str:
        if raw is not None:
            return gguf.GGMLQuantizationType(raw).name
        return {"float32": "F32", "float16": "F16"}.get(str(data.dtype), str(data.dtype))

    counts = Counter(
        ggml_type(data, raw) for name, data, raw in tensors if data.ndim >= 2 and not name.endswith("_norm.weight")
    )
    if not counts:
        return None
    most = counts.most_common(1)[0][0]
    member = getattr(gguf.LlamaFileType, _FILE_TYPE_NAMES.get(most, f"MOSTLY_{most}"), None)
    return int(member) if member is not None else None


def _tokenizer_dir_of(model: nn.Module) -> Path | None:
    """The transformers directory `model` was loaded from (lorakit records it as the model's name)."""
    name = str(getattr(getattr(model, "config", None), "name_or_path", "") or "")
    folder = Path(name) if name else None
    if folder is not None and folder.is_dir() and (folder / "tokenizer.json").is_file():
        return folder
    return None


def _merged_tensors(model: nn.Module, layers: dict[str, Any], adapter_name: str) -> dict[str, torch.Tensor]:
    """The model's weights by transformers name with the adapter of `layers` merged in (the model is
    not changed)."""
    from lorakit.quantization import dequantized_weight

    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict(keep_vars=False).items():
        if ".adapters." in name:
            continue
        plain = name.replace(".base_layer.", ".")
        value = dequantized_weight(tensor.detach()).float().cpu()
        owner = plain.rsplit(".", 1)[0]
        if owner in layers and plain.endswith(".weight"):
            value = value + layers[owner].delta_weight(adapter_name).detach().float().cpu()
        out[plain] = value
    return out


def _vocabulary(tokenizer_dir: Path) -> tuple[list[str], list[int]]:
    """Token strings and types as llama.cpp's converter writes a BPE vocabulary (special tokens CONTROL)."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    vocab = tokenizer.get_vocab()
    by_id = {i: token for token, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(len(vocab)):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.USER_DEFINED)
            continue
        token = by_id[i]
        if token in added:
            special = decoder[i].special if i in decoder else False
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def _write_merged_from_directory(
    model: nn.Module, path: Path, outtype: str, adapter_name: str, tokenizer_dir: Path
) -> Path:
    """A whole GGUF (llama.cpp's LLaMA layout) from a model loaded from a transformers directory.

    The hyper-parameters come from the model's config, the BPE vocabulary, merges, special tokens
    and chat template from the directory's tokenizer files (through the `gguf` package's readers).
    The pre-tokenizer is written as `default`: llama.cpp names pre-tokenizers by hashing their
    output, which this path does not reproduce.
    """
    import gguf

    arch, permute, config = _architecture(model)
    try:
        tokens, types = _vocabulary(tokenizer_dir)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"cannot read the tokenizer of {tokenizer_dir} for the GGUF vocabulary: {err}") from None
    names = _name_map(arch, config)
    heads = _head_counts(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    layers = _merged_layers(model, adapter_name)
    weights = _merged_tensors(model, layers, adapter_name)
    if tied:
        if any(p.startswith("lm_head") for p in layers):
            raise ConfigError("the output head is tied to the embeddings and was adapted: merging would untie them")
        weights.pop("lm_head.weight", None)
    tensors: list[tuple[str, Any, Any]] = []
    for name, value in weights.items():
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConfigError(f"{name}: no GGUF tensor name for it in the {arch} architecture")
        leaf = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
        if permute and leaf in heads and value.ndim == 2:
            value = llama_permute(value, heads[leaf])
        if not torch.isfinite(value).all():
            raise ConfigError(f"{name}: the merged weight is not finite; nothing was written")
        kind = outtype if value.ndim == 2 else "f32"
        if kind == "q8_0" and value.shape[-1] % 32:
            kind = "f16"  # Q8_0 packs rows in blocks of 32
        tensors.append((gguf_name, *_encoded(value, kind)))
    file_type = _file_type(tensors)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=len(tokens))

    def metadata(writer: Any) -> None:
        writer.add_name(str(getattr(config, "name_or_path", "") or "model") + " (merged with lorakit)")
        writer.add_vocab_size(len(tokens))
        writer.add_context_length(int(config.max_position_embeddings))
        writer.add_embedding_length(int(config.hidden_size))
        writer.add_block_count(int(config.num_hidden_layers))
        writer.add_feed_forward_length(int(config.intermediate_size))
        writer.add_head_count(int(config.num_attention_heads))
        writer.add_head_count_kv(heads["k_proj"])
        writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or _rope_theta(config)))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_rope_dimension_count(int(head_dim))
        if file_type is not None:
            writer.add_file_type(file_type)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special.add_to_gguf(writer, quiet=True)

    return _write_atomically(path, arch, metadata, tensors)


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", 10000.0))


def export_gguf(
    model_or_adapter: nn.Module | str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    format: Format = "gguf-lora",
    outtype: OutType = "auto",
    adapter_name: str = "default",
    base_gguf: str | os.PathLike[str] | None = None,
    model: str | None = None,
) -> Path:
    """Write an adapter as a llama.cpp LoRA GGUF, or its model merged as one GGUF file.

    Args:
        model_or_adapter: a model carrying the lorakit adapter, or an adapter directory (or a
            training run's output directory), loaded onto its base first.
        path: the `.gguf` file to write (replaced atomically).
        format: `gguf-lora` or `gguf` (merged); see the module docstring.
        outtype: see `GgufExport.outtype`.
        adapter_name: which adapter of the model.
        base_gguf: for `gguf`, the base's GGUF file (default: found from the model).
        model: with an adapter directory, its base model (default: the one the adapter records).

    Returns:
        The written file. The model is not changed.

    Raises:
        ConfigError: see `gguf_lora_tensors`; an outtype the format does not take; an `path` that
            cannot be written (`lorakit.atomic.check_target`); a base GGUF of another architecture
            or other weights; no base GGUF for a merged export. Nothing is written then; what the
            files alone show (the request, `path`, `base_gguf`, the adapter's files and config) is
            refused before an adapter directory's model is loaded.
        AdapterFormatError: an unreadable adapter directory.
        ModelLoadError: a `base_gguf` that is not a file.
        MissingExtraError: the `gguf` package is not installed.
    """
    from lorakit import atomic

    require("gguf", "cli", "exporting GGUF files")
    if format not in ("gguf-lora", "gguf"):
        raise ConfigError(f"format must be 'gguf-lora' or 'gguf', got {format!r}")
    if format == "gguf-lora":
        outtype = "f32" if outtype == "auto" else outtype
        if outtype not in _LORA_OUTTYPES:
            raise ConfigError(f"a llama.cpp LoRA adapter is written as f32, f16 or bf16, not {outtype}")
    elif outtype not in _MERGED_OUTTYPES:
        raise ConfigError(f"a merged GGUF model is written as {', '.join(_MERGED_OUTTYPES)}, not {outtype}")
    out = atomic.check_target(path)
    if base_gguf is None and model is not None and str(model).lower().endswith(".gguf"):
        base_gguf = model
    if format == "gguf" and base_gguf is not None and not Path(base_gguf).is_file():
        raise ModelLoadError(f"cannot read the base GGUF file {base_gguf}: no such file")
    if isinstance(model_or_adapter, nn.Module):
        module = model_or_adapter
    else:
        from lorakit.io import check_adapter_files
        from lorakit.models import ModelSource, adapter_directory, load_source

        adapter = os.fspath(model_or_adapter)
        config = check_adapter_files(adapter_directory(adapter))
        if format == "gguf-lora":
            _check_lora_config(config)  # the rest needs the model
        module, _, _ = load_source(ModelSource(adapter=adapter, model=model, quantize="none"))
    if format == "gguf-lora":
        return _write_lora(module, out, outtype, adapter_name)
    return _write_merged(module, out, outtype, adapter_name, Path(base_gguf) if base_gguf else None)


def describe_gguf(path: str | os.PathLike[str]) -> str:
    """What a GGUF file holds, in one line: its `general.file_type` (if any) and its tensor types.

    Args:
        path: a GGUF file.

    Returns:
        E.g. `general.file_type MOSTLY_Q4_1; tensors: 150 Q4_1, 61 F32, 60 F16, 1 Q8_0` (most
        common type first).
    """
    import gguf

    reader = gguf.GGUFReader(path)
    counts = Counter(t.tensor_type.name for t in reader.tensors)
    tensors = "tensors: " + ", ".join(f"{n} {kind}" for kind, n in counts.most_common())
    field = reader.fields.get(gguf.Keys.General.FILE_TYPE)
    if field is None:
        return tensors
    value = int(field.contents())
    try:
        name = gguf.LlamaFileType(value).name
    except ValueError:  # a file type this gguf package does not know
        name = str(value)
    return f"general.file_type {name}; {tensors}"
