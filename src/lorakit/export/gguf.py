"""GGUF files for llama.cpp, Ollama and LM Studio: `export_gguf` checks the request and calls a writer.

Written with the maintained `gguf` package (the extra `lorakit[cli]`), no llama.cpp build needed:
`gguf_lora` writes a llama.cpp LoRA adapter (`gguf-lora`), `gguf_merged` the merged model as one
file (`gguf`); `gguf_layout` holds what they share (llama.cpp's tensor names and q/k row order, the
atomic write). Both files are written atomically (a temporary file beside the target, fsynced,
renamed).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from torch import nn

from lorakit import atomic
from lorakit.errors import ConfigError, ModelLoadError
from lorakit.export.gguf_lora import check_lora_config, write_lora
from lorakit.export.gguf_merged import write_merged
from lorakit.extras import require
from lorakit.io import check_adapter_files
from lorakit.models import ModelSource, adapter_directory, load_source

__all__ = ["GgufExport", "describe_gguf", "export_gguf"]

Format = Literal["gguf-lora", "gguf"]
OutType = Literal["auto", "f32", "f16", "bf16", "q8_0"]

_LORA_OUTTYPES = ("f32", "f16", "bf16")
_MERGED_OUTTYPES = ("auto", "f16", "bf16", "f32", "q8_0")


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
        format: `gguf-lora` (`lorakit.export.gguf_lora`) or `gguf` (merged; `lorakit.export.gguf_merged`).
        outtype: see `GgufExport.outtype`.
        adapter_name: which adapter of the model.
        base_gguf: for `gguf`, the base's GGUF file (default: found from the model).
        model: with an adapter directory, its base model (default: the one the adapter records).

    Returns:
        The written file. The model is not changed.

    Raises:
        ConfigError: see `gguf_lora.gguf_lora_tensors`; an outtype the format does not take; an `path` that
            cannot be written (`lorakit.atomic.check_target`); a base GGUF of another architecture
            or other weights; no base GGUF for a merged export. Nothing is written then; what the
            files alone show (the request, `path`, `base_gguf`, the adapter's files and config) is
            refused before an adapter directory's model is loaded.
        AdapterFormatError: an unreadable adapter directory.
        ModelLoadError: a `base_gguf` that is not a file.
        MissingExtraError: the `gguf` package is not installed.
        FileWriteError: the file could not be written (a full disk); an existing `path` is kept.
    """
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
        adapter = os.fspath(model_or_adapter)
        config = check_adapter_files(adapter_directory(adapter))
        if format == "gguf-lora":
            check_lora_config(config)  # the rest needs the model
        module, _, _ = load_source(ModelSource(adapter=adapter, model=model, quantize="none"))
    if format == "gguf-lora":
        return write_lora(module, out, outtype, adapter_name)
    return write_merged(module, out, outtype, adapter_name, Path(base_gguf) if base_gguf else None)


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
