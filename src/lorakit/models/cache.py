"""Where a model's transformers files are on disk; a GGUF file is dequantised once into a cache.

A spec is a packaged alias, a local transformers directory or a `.gguf` file (`resolve`). GGUF
files are dequantised once by transformers' GGUF support (about 20 s for the packaged
SmolLM2-135M) and cached as a plain transformers directory (safetensors, config, tokenizer files)
under the cache directory (`$LORAKIT_CACHE`, else `~/.cache/lorakit`). The cache is built by
`lorakit.atomic.build_directory`, so a reader never sees half a cache and two concurrent writers
both end up using one complete copy.

`load_model` reads the weights of a `.gguf` file it can stream (`models.gguf_tensors`) from the file
itself; it caches only the file's config and tokenizer (`gguf_header`: what transformers makes of
the GGUF metadata, about 20 s for a 49k-token vocabulary, then read back in a second), never a
dequantised copy of the weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lorakit.atomic import build_directory
from lorakit.errors import ModelLoadError
from lorakit.extras import require
from lorakit.models.packaged import (
    DEFAULT_MODEL,
    ENCODER_MODEL,
    PACKAGED_MODELS,
    PACKAGED_NAMES,
    packaged_encoder_dir,
    packaged_gguf,
)
from lorakit.models.pretrained import dtype_kwargs

__all__ = ["cache_dir", "ensure_cached", "gguf_header", "resolve", "stable_name"]

_CACHE_FORMAT = 1
_MARKER = "lorakit-cache.json"
_GGUF_MAGIC = b"GGUF"
# `SmolLM2-135M-Instruct.Q4_1` -> `SmolLM2-135M-Instruct`: drop llama.cpp's quantisation suffix.
_QUANT_SUFFIX = re.compile(r"[.\-_](?:I?Q\d\w*|F16|F32|BF16)$", re.IGNORECASE)


def cache_dir() -> Path:
    """Return the directory lorakit caches dequantised models in.

    Returns:
        `$LORAKIT_CACHE` if set and non-empty, else `~/.cache/lorakit`. It may not exist yet.
    """
    env = os.environ.get("LORAKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lorakit"


def ensure_cached(alias: str | os.PathLike[str] = DEFAULT_MODEL) -> Path:
    """Make sure a model is available as a plain local transformers directory and return it.

    For GGUF models (the packaged `"smollm2-135m"` or a `.gguf` path) this dequantises the file into
    the cache on first use (about 20 s) and returns the cache directory; later calls only check the
    cache's marker file. For `"minilm-l6"` it returns the packaged directory, which needs no
    conversion. CI calls `python -c "import lorakit.models as m; m.ensure_cached('smollm2-135m')"`
    to warm the cache.

    Args:
        alias: A packaged alias (see `PACKAGED_MODELS`), a `.gguf` file or a model directory.

    Returns:
        The directory `transformers.AutoModel*.from_pretrained` can load.

    Raises:
        ModelLoadError: As for `load_model`.
    """
    return resolve(alias)[0]


def resolve(spec: str | os.PathLike[str] | None) -> tuple[Path, str, bool]:
    """Map a spec to (local transformers directory, stable name, is the packaged encoder).

    Args:
        spec: As for `load_model` (None: the packaged default).

    Returns:
        The directory (converting a GGUF file into the cache first), the name `load_model`
        returns, and whether it is the packaged encoder (which has no LM head).

    Raises:
        ModelLoadError: As for `load_model`.
    """
    if spec is None:
        spec = DEFAULT_MODEL
    text = os.fspath(spec)
    if text in PACKAGED_MODELS:
        if text == ENCODER_MODEL:
            return packaged_encoder_dir(), PACKAGED_NAMES[text], True
        return _cached_gguf(packaged_gguf(), cache_name="smollm2-135m-instruct", fallback_name=PACKAGED_NAMES[text])
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} is a directory without config.json, so not a transformers model. {_accepted()}"
            )
        return path.resolve(), str(path.resolve()), False
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf file. {_accepted()}")
        path = path.resolve()
        return _cached_gguf(path, cache_name=_cache_name(path), fallback_name=str(path), check_mtime=True)
    hint = ""
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text):
        hint = " lorakit never downloads from a hub: download the model yourself and pass its directory."
    raise ModelLoadError(
        f"unknown model {text!r}: not a packaged alias and no such file or directory.{hint} {_accepted()}"
    )


def gguf_header(
    gguf_path: Path, config: Any | None = None, name: str | None = None, *, build: bool = True
) -> tuple[Path, str] | None:
    """The cached config and tokenizer of a GGUF file (no weights), and the model's stable name.

    Built on first use from what transformers reads in the file's metadata (`config`, when given,
    is saved instead of reading it again), beside the weight caches under `cache_dir()`, with the
    same freshness rules (the file's size and modification time).

    Args:
        gguf_path: the `.gguf` file.
        config: its transformers config, already read (saved as the cache's `config.json`).
        name: its stable name (`stable_name`), recorded in the cache; None: read from the file.
        build: False: only look; return None when there is no fresh cache.

    Returns:
        `(directory with config.json and the tokenizer files, stable name)`, or None (`build=False`).

    Raises:
        ModelLoadError: transformers cannot read the file's metadata.
    """
    path = Path(gguf_path).resolve()

    def convert(source: Path, out: Path) -> str | None:
        _convert_gguf_header(source, out, config)
        return name if name is not None else stable_name(source, _gguf_string(source, "general.organization"))

    found = _cached_gguf(
        path,
        cache_name=_cache_name(path) + "-header",
        fallback_name=str(path),
        check_mtime=True,
        convert=convert,
        build=build,
    )
    return None if found is None else found[:2]


def stable_name(gguf_path: Path, organization: str | None) -> str:
    """The name `load_model` gives a model read from a user's `.gguf` file: `organization/stem`
    (`organization` from its metadata, `general.organization`), else its absolute path."""
    path = Path(gguf_path).resolve()
    return _stable_from(path, organization) or str(path)


def _cache_name(path: Path) -> str:
    """One cache per path; a changed file (size or mtime) replaces it rather than piling up copies."""
    key = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem)
    return f"gguf-{stem}-{key}"


def _accepted() -> str:
    aliases = ", ".join(f"{alias!r}" for alias in PACKAGED_MODELS)
    return (
        f"Accepted: a packaged alias ({aliases}; None means {DEFAULT_MODEL!r}), a local transformers "
        "model directory containing config.json, or a .gguf file."
    )


# ----------------------------------------------------------------------------- GGUF cache


def _cached_gguf(
    gguf_path: Path,
    *,
    cache_name: str,
    fallback_name: str,
    check_mtime: bool = False,
    convert: Callable[[Path, Path], str | None] | None = None,
    build: bool = True,
) -> tuple[Path, str, bool] | None:
    """Return the cache directory for a GGUF file, converting it first if the cache is missing or stale.

    The cache is stale when its marker is missing or records another format or file size (and, for
    user files, another modification time: a reinstalled package keeps its file but not its mtime).
    `convert(gguf_path, directory)` fills a new cache (default: `_convert_gguf`, the whole model);
    with `build=False` a missing or stale cache gives None instead.
    """
    target = cache_dir() / cache_name
    stat = gguf_path.stat()
    source = {"format": _CACHE_FORMAT, "source_size": stat.st_size}
    if check_mtime:
        source["source_mtime_ns"] = stat.st_mtime_ns

    def fresh() -> dict[str, Any] | None:
        marker = _read_marker(target)
        if marker is not None and all(marker.get(key) == value for key, value in source.items()):
            return marker
        return None

    marker = fresh()
    if marker is not None:
        return target, str(marker.get("name") or fallback_name), False
    if not build:
        return None
    _check_gguf_magic(gguf_path)
    # Re-check just before discarding: a concurrent writer may have renamed a fresh copy in meanwhile.
    if target.exists() and fresh() is None:
        _discard(target)

    def build(tmp: Path) -> None:
        name = (convert or _convert_gguf)(gguf_path, tmp) or fallback_name
        info = {**source, "source": gguf_path.name, "name": name}
        (tmp / _MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")

    if fresh() is None:
        build_directory(target, build, keep_existing=lambda path: _read_marker(path) is not None)
    marker = _read_marker(target) or {}
    return target, str(marker.get("name") or fallback_name), False


def _read_marker(directory: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((directory / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _discard(path: Path) -> None:
    """Move a stale cache aside (atomic, so readers never see it half-deleted), then delete it."""
    aside = path.with_name(f".{path.name}.stale-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another process already moved it
    shutil.rmtree(aside, ignore_errors=True)


def _check_gguf_magic(path: Path) -> None:
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise ModelLoadError(f"cannot read GGUF file {path}: {exc}") from exc
    if magic != _GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (it does not start with b'GGUF'); the file is corrupt")


# ----------------------------------------------------------------------------- conversion


def _convert_gguf(gguf_path: Path, out: Path) -> str | None:
    """Dequantise a GGUF file into `out` as a transformers directory; return its stable name if known."""
    require("gguf", "cli", f"reading the GGUF file {gguf_path.name}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, local_files_only=True, **dtype_kwargs(torch.float32)
        )
    except Exception as exc:  # the GGUF reader raises many types (ValueError, KeyError, struct.error ...)
        raise ModelLoadError(f"cannot read GGUF file {gguf_path}; it is corrupt or unsupported: {exc}") from exc
    # The weights are already dequantised; drop the "gguf" quantisation record so the model saves as
    # a plain checkpoint (transformers refuses to serialise a model that still carries it).
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    stable = _gguf_stable_name(gguf_path)
    if stable is not None:
        model.config.name_or_path = stable
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return stable


def _convert_gguf_header(gguf_path: Path, out: Path, config: Any | None) -> None:
    """Write a GGUF file's config and tokenizer (as transformers reads them from its metadata) into `out`."""
    require("gguf", "cli", f"reading the GGUF file {gguf_path.name}")
    from transformers import AutoConfig, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        if config is None:
            config = AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True)
    except Exception as exc:  # the GGUF reader raises many types (ValueError, KeyError, struct.error ...)
        raise ModelLoadError(f"cannot read GGUF file {gguf_path}; it is corrupt or unsupported: {exc}") from exc
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _gguf_stable_name(gguf_path: Path) -> str | None:
    """`organization/file-stem` from GGUF metadata and file name, e.g. HuggingFaceTB/SmolLM2-135M-Instruct."""
    return _stable_from(gguf_path, _gguf_string(gguf_path, "general.organization"))


def _stable_from(gguf_path: Path, organization: str | None) -> str | None:
    if not organization:
        return None
    stem = _QUANT_SUFFIX.sub("", gguf_path.stem)
    return f"{organization}/{stem}" if stem else None


def _gguf_string(gguf_path: Path, key: str) -> str | None:
    try:
        import gguf

        field = gguf.GGUFReader(str(gguf_path)).fields.get(key)
        value = field.contents() if field is not None else None
    except Exception:  # metadata is a nicety: any failure just means "unknown"
        return None
    return value if isinstance(value, str) and value else None
