"""A transformers directory's safetensors weights, read one tensor at a time.

The weights are `model.safetensors`, or the shards `model.safetensors.index.json` lists (the order
transformers looks for them in). `SafetensorsFiles` opens every file once to read its header (the
names, shapes and dtypes; safetensors refuses a file whose data does not cover what the header
promises, so a truncated shard is found here, before anything loads), then `read` opens the file
again for each tensor: a mapping kept open for a whole shard would keep every page read from it
resident, so the process would hold the shard beside the tensors made from it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lorakit.errors import ModelLoadError

__all__ = ["INDEX_NAME", "SINGLE_NAME", "SafetensorsFiles", "has_safetensors"]

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def has_safetensors(directory: Path) -> bool:
    """Whether `directory` holds transformers' safetensors weights (one file or an index of shards)."""
    return (directory / SINGLE_NAME).is_file() or (directory / INDEX_NAME).is_file()


class SafetensorsFiles:
    """The safetensors weights of one transformers directory.

    Args:
        directory: the model directory.

    Raises:
        ModelLoadError: no weights, an unreadable index, a shard the index lists that is missing,
            truncated or unreadable (the file is named), or a tensor the index places in a shard
            that does not hold it.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._file_of: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        if (self.directory / SINGLE_NAME).is_file():
            files = {self.directory / SINGLE_NAME: None}
        elif (self.directory / INDEX_NAME).is_file():
            files = self._shards(self.directory / INDEX_NAME)
        else:
            raise ModelLoadError(f"{self.directory} has no {SINGLE_NAME} or {INDEX_NAME}")
        for file, listed in files.items():
            self._read_header(file, listed)

    def _shards(self, index: Path) -> dict[Path, set[str]]:
        """Shard file → the tensors the index places in it; every shard checked to exist."""
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"cannot read the shard index {index}: {exc}") from exc
        shards: dict[Path, set[str]] = {}
        for name, file in weight_map.items():
            shards.setdefault(self.directory / str(file), set()).add(name)
        missing = [str(file) for file in shards if not file.is_file()]
        if missing:
            raise ModelLoadError(
                f"{index} lists shards that are not in {self.directory}: {', '.join(sorted(missing))}; "
                "the model directory is incomplete (copy or download the missing files)"
            )
        return shards

    def _read_header(self, file: Path, listed: set[str] | None) -> None:
        from safetensors import safe_open

        try:
            with safe_open(file, framework="pt") as handle:
                names = list(handle.keys())
                shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in names}
        except Exception as exc:  # SafetensorError subclasses Exception only
            raise ModelLoadError(f"cannot read {file}; it is truncated or corrupt: {exc}") from exc
        if listed is not None:
            absent = sorted(listed - set(names))
            if absent:
                raise ModelLoadError(
                    f"{file} does not hold {', '.join(absent[:8])}{' ...' if len(absent) > 8 else ''}, which the "
                    f"shard index places there; the shard is not the one the index was written with"
                )
        for name in names if listed is None else sorted(listed):
            self._file_of[name] = file
            self._shapes[name] = shapes[name]

    def keys(self) -> set[str]:
        """Every tensor name in the weights."""
        return set(self._file_of)

    def describe(self, key: str) -> str:
        """`file: tensor` for messages."""
        return f"{self._file_of.get(key, self.directory)}: tensor {key}"

    def shape(self, key: str) -> tuple[int, ...]:
        """The stored tensor's shape."""
        return self._shapes[key]

    def read(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        """The tensor cast to `dtype` (as transformers' loader casts: `tensor.to(dtype)`), in memory of
        its own: the file's mapping is closed when this returns.

        Raises:
            ModelLoadError: the file cannot be read any more (it changed since the header was read).
        """
        from safetensors import safe_open

        file = self._file_of[key]
        try:
            with safe_open(file, framework="pt") as handle:
                stored = handle.get_tensor(key)
        except Exception as exc:
            raise ModelLoadError(f"cannot read tensor {key} from {file}: {exc}") from exc
        # `to` of the same dtype returns the mapped tensor itself; a copy lets the mapping go.
        return stored.to(dtype) if stored.dtype != dtype else stored.clone()
