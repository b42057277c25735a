"""A GGUF file's tensors read one at a time, dequantised, under transformers' parameter names.

`GgufTensors` opens a file with the `gguf` package's reader (its header only: a tensor's bytes are
read with `os.pread` when it is asked for, so no memory map of the weights stays resident), checks
every tensor's bytes lie inside the file and its type can be dequantised, and maps llama.cpp's
names (`blk.0.attn_q.weight`) to the model's (`model.layers.0.self_attn.q_proj.weight`) through the
`gguf` package's name map, as transformers' GGUF loader does (`modeling_gguf_pytorch_utils`).

A tensor is dequantised to float32 with `gguf.quants.dequantize`, a few rows at a time into one
float32 buffer (the package's own call holds every row group's result at once, 2× the tensor), and
for LLaMA files the q and k rows are put back in transformers' order (`llama_unpermute`, the
inverse of llama.cpp's `llama_permute`). transformers' legacy loader computes the same values
(`gguf.dequantize` of the whole tensor, then its `LlamaTensorProcessor`), so both give the same bits.

Only the architectures in `STREAMED_ARCHITECTURES` are read this way: for them transformers changes
nothing but the q/k order. Any other architecture transformers reads (GPT-2's transposed fused
attention, Gemma's norm offsets, MoE experts, ...) is dequantised by transformers into the model
cache instead (`lorakit.models.cache`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import ModelLoadError

__all__ = ["STREAMED_ARCHITECTURES", "GgufTensors", "gguf_architecture", "llama_permute", "llama_unpermute", "streams"]

STREAMED_ARCHITECTURES: dict[str, bool] = {"llama": True, "qwen2": False, "qwen3": False}
"""GGUF architecture → whether llama.cpp's converter permuted its q and k rows (undone on reading)."""

_CHUNK_BYTES = 16 * 2**20
"""float32 bytes dequantised per step (rows of a tensor at a time): bounds the reader's scratch memory."""


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


def streams(architecture: str) -> bool:
    """Whether lorakit reads GGUF files of `architecture` itself (`STREAMED_ARCHITECTURES`)."""
    return architecture in STREAMED_ARCHITECTURES


def gguf_architecture(path: Path) -> str:
    """The `general.architecture` of a GGUF file (`llama`, `qwen2`, ...).

    Raises:
        ModelLoadError: the file is not a readable GGUF file.
    """
    return _open(path).fields["general.architecture"].contents()


def _open(path: Path) -> Any:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path), "r")
        reader.fields["general.architecture"].contents()
    except Exception as exc:  # the reader raises ValueError, KeyError, struct and numpy errors alike
        raise ModelLoadError(f"cannot read GGUF file {path}; it is corrupt or unsupported: {exc}") from exc
    return reader


class GgufTensors:
    """The tensors of one GGUF file, read one at a time under transformers' names.

    Args:
        path: the `.gguf` file.

    Raises:
        ModelLoadError: the file cannot be read, a tensor's bytes lie past the end of the file
            (truncated), or a tensor's type cannot be dequantised by the `gguf` package (the type
            and the tensor are named).
    """

    def __init__(self, path: Path) -> None:
        import gguf

        self.path = Path(path)
        reader = _open(self.path)
        self.architecture: str = reader.fields["general.architecture"].contents()
        single_string = [gguf.GGUFValueType.STRING]
        self._strings = {k: f.contents() for k, f in reader.fields.items() if list(f.types) == single_string}
        self._tensors = {t.name: t for t in reader.tensors}
        # The reader's metadata goes with it: a tokenizer's vocabulary and merges parsed into Python
        # objects (about 350 MB for Qwen2.5's 151,936 tokens) would stay resident through the load.
        del reader
        self._by_key: dict[str, str] = {}
        self._heads: dict[str, int] = {}
        self._check()

    def _check(self) -> None:
        """Every tensor inside the file and of a type the `gguf` package dequantises (one row of each tried)."""
        import gguf
        import numpy as np

        size = self.path.stat().st_size
        for tensor in self._tensors.values():
            if tensor.data_offset + tensor.n_bytes > size:
                raise ModelLoadError(
                    f"GGUF file {self.path} is truncated: tensor {tensor.name} needs bytes up to "
                    f"{tensor.data_offset + tensor.n_bytes:,} and the file has {size:,}; the file is corrupt"
                )
        tried: set[Any] = set()
        for tensor in self._tensors.values():
            if tensor.tensor_type in tried:
                continue
            first_row = np.zeros((1, tensor.data.shape[-1]), dtype=tensor.data.dtype)
            try:
                gguf.quants.dequantize(first_row, tensor.tensor_type)
            except NotImplementedError:
                raise ModelLoadError(
                    f"GGUF file {self.path}: tensor {tensor.name} is stored as {tensor.tensor_type.name}, a type the "
                    f"gguf package cannot dequantise (gguf {_gguf_version()}); convert the file with llama.cpp to a "
                    "type it reads (F32, F16, BF16, Q8_0, Q4_K, ...)"
                ) from None
            tried.add(tensor.tensor_type)

    def string(self, key: str) -> str | None:
        """A string of the file's metadata (`general.organization`, ...), None when absent."""
        value = self._strings.get(key)
        return value if isinstance(value, str) and value else None

    @property
    def streamed(self) -> bool:
        """Whether lorakit reads this architecture itself (`streams`)."""
        return streams(self.architecture)

    def bind(self, state_keys: list[str], config: Any) -> None:
        """Map the model's state-dict keys to this file's tensor names (`gguf.get_tensor_name_map`).

        Args:
            state_keys: the model's `state_dict()` keys.
            config: the model's transformers config (layers, heads).
        """
        import gguf

        arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == self.architecture)
        names = gguf.get_tensor_name_map(arch_id, int(config.num_hidden_layers))
        self._by_key = {}
        for key in state_keys:
            found = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if found is None and "." in key:  # a base-model key under the task head's prefix (`model.`)
                found = names.get_name(key.split(".", 1)[1], try_suffixes=(".weight", ".bias"))
            if found is not None and found in self._tensors:
                self._by_key[key] = found
        if STREAMED_ARCHITECTURES.get(self.architecture):
            heads = int(config.num_attention_heads)
            # transformers' LlamaTensorProcessor: q by the attention heads, k by the key-value heads.
            self._heads = {"attn_q": heads, "attn_k": int(getattr(config, "num_key_value_heads", None) or heads)}

    def keys(self) -> set[str]:
        """The model keys this file holds (after `bind`)."""
        return set(self._by_key)

    def describe(self, key: str) -> str:
        """`file: tensor` for messages."""
        return f"{self.path}: tensor {self._by_key.get(key, key)}"

    def shape(self, key: str) -> tuple[int, ...]:
        """The tensor's shape in torch's order (GGUF lists dimensions innermost first)."""
        return tuple(int(d) for d in reversed(self._tensors[self._by_key[key]].shape.tolist()))

    def read(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        """The tensor dequantised to float32 (q/k rows in transformers' order), then cast to `dtype`;
        memory of its own, no mapping of the file kept. A tensor whose rows stay in place (all but
        q and k) is cast a few rows at a time, so a bf16 read never holds a float32 copy."""
        import gguf
        import numpy as np

        tensor = self._tensors[self._by_key[key]]
        shape = self.shape(key)
        stored = tensor.data  # a view into the reader's map: only its shape and dtype are used
        row_items = int(stored.shape[-1])
        rows = int(np.prod(stored.shape[:-1], dtype=np.int64)) if stored.ndim > 1 else 1
        row_bytes = row_items * stored.dtype.itemsize
        columns = shape[-1] if shape else 1
        part = tensor.name.split(".")[-2] if tensor.name.count(".") >= 2 else ""
        permuted = part in self._heads and len(shape) == 2
        # Dequantised into float32 rows, each step cast into the result (a permuted tensor is put
        # in order in float32 first, then cast, as before).
        out = torch.empty((rows, columns), dtype=torch.float32 if permuted else dtype)
        step = max(1, _CHUNK_BYTES // max(1, columns * 4))
        with self.path.open("rb") as handle:
            fd = handle.fileno()
            for start in range(0, rows, step):
                count = min(step, rows - start)
                raw = os.pread(fd, count * row_bytes, tensor.data_offset + start * row_bytes)
                if len(raw) != count * row_bytes:
                    raise ModelLoadError(
                        f"GGUF file {self.path} is truncated at tensor {tensor.name}; the file is corrupt"
                    )
                block = np.frombuffer(raw, dtype=stored.dtype).reshape(count, row_items)
                values = np.asarray(gguf.quants.dequantize(block, tensor.tensor_type), dtype=np.float32)
                if not values.flags.writeable:  # a float32 tensor comes back as a view of the bytes read
                    values = values.copy()
                out[start : start + count] = torch.from_numpy(values.reshape(count, columns))
        value = out.reshape(shape)
        if permuted:
            value = llama_unpermute(value, self._heads[part])
        return value if value.dtype == dtype else value.to(dtype)


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "unknown"
