"""The merged model as one GGUF file (`lorakit export --format gguf`).

When the base came from a GGUF file (the packaged default, a Q4_1 file), the merged file starts
from that file (its metadata, tokenizer and tensors) and replaces the adapted weights by
dequant(W) + ΔW. By default (`outtype="auto"`) every other tensor is copied as it is stored,
bit-identical to the base file, and an adapted one is written in the base tensor's type if that is
a float type, else in F16: lorakit never quantises a weight it was not asked to. `f32`, `f16` or
`bf16` re-encode the whole file: every tensor dequantised with the `gguf` package and written in
that type, except 1-D tensors (norms), which stay F32 as llama.cpp's converter keeps them. `q8_0`
quantises the adapted weights only; the base's tensors are never re-quantised. When the base came
from a transformers directory, the whole file is written: the config's hyper-parameters, the
directory's BPE vocabulary, merges, special tokens and chat template (through the `gguf` package's
readers), every merged tensor (`auto`: F16).

`general.file_type` says what the merged file holds, as llama.cpp labels a mixed file: the type
most of its matrices have ("mostly Q4_1", except 1-D tensors), llama.cpp's `LlamaFileType` for it.
A merge that adapts a few of the packaged base's projections stays mostly Q4_1; one that adapts all
of them is mostly F16.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.errors import ConfigError, ModelLoadError
from lorakit.export.gguf_layout import (
    architecture,
    encode,
    head_counts,
    llama_permute,
    lora_owner,
    tensor_names,
    write_gguf,
)
from lorakit.layers import LoraLinear
from lorakit.models import PACKAGED_NAMES, packaged_gguf
from lorakit.quantization import dequantized_weight
from lorakit.state import lora_layers

__all__ = ["base_gguf_of", "write_merged"]

_WHOLE_FILE_OUTTYPES = ("f32", "f16", "bf16")  # float types: re-encoding into them quantises nothing


def base_gguf_of(model: nn.Module) -> Path | None:
    """The GGUF file `model` was loaded from, when lorakit can tell: the packaged model's file, or a
    `.gguf` path the model records as its name."""
    name = str(getattr(getattr(model, "config", None), "name_or_path", "") or "")
    if name == PACKAGED_NAMES.get("smollm2-135m"):
        return packaged_gguf()
    if name.lower().endswith(".gguf") and Path(name).is_file():
        return Path(name)
    return None


def write_merged(model: nn.Module, path: Path, outtype: str, adapter_name: str, base_gguf: Path | None) -> Path:
    """Write `model` with its adapter `adapter_name` merged in to `path` as one GGUF file.

    From the base's GGUF file (`base_gguf`, else `base_gguf_of(model)`) when there is one, else
    whole from the transformers directory the model was loaded from (see the module docstring).
    The model is not changed.

    Args:
        model: a model carrying the adapter.
        path: the `.gguf` file (replaced atomically).
        outtype: `auto`, `f32`, `f16`, `bf16` or `q8_0` (checked by `export_gguf`).
        adapter_name: which adapter.
        base_gguf: the base's GGUF file, or None to find it from the model.

    Returns:
        `path`.

    Raises:
        ConfigError: an architecture lorakit does not map, a layer a merged GGUF does not cover, a
            base GGUF of another architecture or other weights, a non-finite merged weight, or no
            base GGUF and no transformers directory to start from. Nothing is written then.
        ModelLoadError: an unreadable base GGUF file.
    """
    owner = lora_owner(model, adapter_name)
    architecture(owner)  # an unmapped model is refused before its files are looked for
    source = Path(base_gguf) if base_gguf is not None else base_gguf_of(owner)
    if source is not None:
        return _write_merged_from_gguf(owner, path, outtype, adapter_name, source)
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


def _write_merged_from_gguf(owner: nn.Module, path: Path, outtype: str, adapter_name: str, source: Path) -> Path:
    """The base GGUF `source` with the adapted tensors replaced by dequant(W) + ΔW (its metadata kept,
    `general.file_type` recomputed)."""
    import gguf

    arch, _, _ = architecture(owner)
    try:
        reader = gguf.GGUFReader(source)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read the base GGUF file {source}: {err}") from None
    file_arch = reader.fields.get("general.architecture")
    file_arch = file_arch.contents() if file_arch is not None else None
    if file_arch != arch:
        raise ConfigError(f"{source} is a {file_arch!r} model; this model is {arch!r}")
    merged_weights = _merged_weights(owner, adapter_name, reader, source)
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

    return write_gguf(path, arch, metadata, tensors)


def _merged_weights(owner: nn.Module, adapter_name: str, reader: Any, source: Path) -> dict[str, torch.Tensor]:
    """GGUF name -> dequant(W) + ΔW (in the file's row order) for every layer carrying the adapter,
    each checked to start from the model's own base weight."""
    arch, permute, config = architecture(owner)
    names = tensor_names(arch, config)
    heads = head_counts(config)
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
    return merged_weights


def _merged_layers(owner: nn.Module, adapter_name: str) -> dict[str, Any]:
    """path -> LoRA layer for every layer carrying `adapter_name`, checked to be one a merged GGUF covers."""
    layers = {path: layer for path, layer in lora_layers(owner) if adapter_name in layer.adapters}
    for path, layer in layers.items():
        if not isinstance(layer, LoraLinear) or layer.is_conv1d or layer.adapters[adapter_name].slices is not None:
            raise ConfigError(f"{path}: merged GGUF export covers adapters on plain linear layers only")
    return layers


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
        return encode(value, "f32" if one_d else outtype)
    if merged is None:
        return stored.data, stored.tensor_type  # as stored: the same type and bytes
    if outtype == "auto":
        return encode(merged, _FLOAT_OUTTYPES.get(kind, "f16"))
    if merged.shape[-1] % 32:  # Q8_0 packs rows in blocks of 32
        return encode(merged, "f16")
    return encode(merged, outtype)


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

    arch, _, config = architecture(model)
    try:
        tokens, types = _vocabulary(tokenizer_dir)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"cannot read the tokenizer of {tokenizer_dir} for the GGUF vocabulary: {err}") from None
    heads = head_counts(config)
    tensors = _whole_model_tensors(model, outtype, adapter_name)
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

    return write_gguf(path, arch, metadata, tensors)


def _whole_model_tensors(model: nn.Module, outtype: str, adapter_name: str) -> list[tuple[str, Any, Any]]:
    """(GGUF name, data, raw type) of every weight of `model` with its adapter merged in, in
    llama.cpp's names and q/k row order; matrices in `outtype`, 1-D tensors in F32."""
    arch, permute, config = architecture(model)
    names = tensor_names(arch, config)
    heads = head_counts(config)
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
        tensors.append((gguf_name, *encode(value, kind)))
    return tensors


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", 10000.0))
