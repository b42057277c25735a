"""A causal LM built from its checkpoint one tensor at a time, each stored at once in its final form.

transformers' `from_pretrained` followed by `lorakit.quantize` holds the whole model in the load
dtype before anything is quantized: a LLaMA-7B is 27 GB in float32 though its NF4 form is under
4 GB. Here the module tree is built with its parameters on the meta device (no memory; buffers
such as rotary tables are computed by the modules' own constructors and transformers' weight
initialisation, as `from_pretrained` computes them), then each tensor is read from the checkpoint
(`SafetensorsFiles`, `GgufTensors`), cast to the dtype its parameter was built with (`dtype`, as
transformers casts), and stored: a linear layer `lorakit.quantize` would replace becomes its
`QuantizedLinear` through the same `QuantizedLinear.from_linear` call (NF4 or bf16) as soon as its
weight and bias are in, and the full-precision weight is dropped. Tied weights stay one Parameter;
the model ends in eval mode, with the directory's generation config, as `from_pretrained` leaves it.
The result equals `from_pretrained(dtype)` + `quantize(model, scheme)` bit for bit (every
parameter, buffer, NF4 code and scaler; `tests/unit/test_streaming.py`).

Everything is checked before the first tensor is read: every parameter present (tied ones through
any of their names), every shape as the config makes it, every quantized layer's size (a
`ModelLoadError` or `ConfigError` names them); nothing is written.

Memory: the process's peak during the load is at most

    the final model's bytes + L + 256 MiB

with L the largest tensor in float32: one tensor read and converted (the raw tensor beside its
converted copy). NF4 quantization adds only a few MB (`kernels.nf4.quantize` goes through a weight
4,096 blocks at a time; with the path `nf4_quant` off, torchao's `to_nf4` holds 2.5 times the
weight plus about 150 MB instead). The 256 MiB (`FIXED_OVERHEAD_BYTES`) is those chunks, the GGUF
reader's row buffers (`gguf_tensors`), the pages of a memory-mapped shard being read and allocator
slack (`tests/unit/test_streaming.py` measures the bound in a child process).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from lorakit.errors import ModelLoadError
from lorakit.models.pretrained import dtype_kwargs
from lorakit.quantization import QuantizedLinear, TablesToStore, linears_to_quantize, store_tables, tables_to_store

__all__ = ["FIXED_OVERHEAD_BYTES", "REFRESH_SECONDS", "TensorSource", "build_empty", "fill", "keeps_modules_in_fp32"]

FIXED_OVERHEAD_BYTES = 256 * 2**20
"""The fixed part of the load's memory bound (see the module docstring)."""

REFRESH_SECONDS = 5.0
"""The progress bar is redrawn at least this often, however long one tensor takes."""


class TensorSource(Protocol):
    """Where `fill` reads tensors: `SafetensorsFiles` or `GgufTensors`."""

    def keys(self) -> set[str]:
        """The model keys the checkpoint holds."""
        ...

    def shape(self, key: str) -> tuple[int, ...]:
        """A stored tensor's shape."""
        ...

    def read(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        """A tensor in `dtype`, in memory of its own."""
        ...

    def describe(self, key: str) -> str:
        """The file and tensor, for messages."""
        ...


def build_empty(config: Any, dtype: torch.dtype) -> nn.Module:
    """The causal LM of `config` with every parameter on the meta device and real buffers.

    Built by `AutoModelForCausalLM.from_config` with `dtype` as the default dtype (so each
    parameter has the dtype `from_pretrained` would give it), its constructors and weight
    initialisation run as usual, except that each parameter moves to the meta device as it is
    registered: the initialisers then touch no memory, while buffers computed in constructors (rotary
    frequencies, position ids) are real.

    Raises:
        ModelLoadError: transformers has no causal LM for this config.
    """
    from transformers import AutoModelForCausalLM

    try:
        with _parameters_on_meta():
            return AutoModelForCausalLM.from_config(config, **dtype_kwargs(dtype))
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(f"transformers has no causal LM for this config ({type(config).__name__}): {exc}") from exc


def keeps_modules_in_fp32(model: nn.Module, dtype: torch.dtype) -> bool:
    """Whether `from_pretrained` would keep some of the model's modules in float32 at `dtype`
    (`_keep_in_fp32_modules` for float16, `_keep_in_fp32_modules_strict` for float16 and bfloat16);
    `lorakit.models.load_model` leaves such models to `from_pretrained`."""
    loose = getattr(model, "_keep_in_fp32_modules", None)
    strict = getattr(model, "_keep_in_fp32_modules_strict", None)
    return bool((dtype == torch.float16 and loose) or (dtype in (torch.float16, torch.bfloat16) and strict))


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Move every parameter to the meta device as a module registers it; buffers stay real.

    What accelerate's `init_empty_weights(include_buffers=False)` does. It patches
    `nn.Module.register_parameter` for the duration, so another thread building modules meanwhile
    would get meta parameters too: `load_model` builds before anything else runs.
    """
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and type(param) is nn.Parameter and param.device.type != "meta":
            moved = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
            moved.__dict__.update(param.__dict__)
            module._parameters[name] = moved

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


@dataclass
class _Unit:
    """One tensor of the model (all the names it is tied under) and where its value comes from."""

    keys: list[str]
    meta: torch.Tensor
    is_param: bool
    holders: list[tuple[nn.Module, str]]
    present: dict[str, str] = field(default_factory=dict)  # model key -> checkpoint key


def fill(
    model: nn.Module,
    source: TensorSource,
    *,
    quantize: str | None = None,
    progress: bool | None = None,
    generation_dir: Path | None = None,
) -> nn.Module:
    """Read every parameter (and every persistent buffer the checkpoint holds) of a `build_empty`
    model from `source`, storing each in its final form; see the module docstring.

    Args:
        model: from `build_empty`.
        source: the checkpoint.
        quantize: `"nf4"` or `"bf16"`: the linear layers `lorakit.quantize` picks become
            `QuantizedLinear`s as they are read, and the input embeddings and output head it stores
            in bf16 are read in bf16; None keeps everything in the load dtype.
        progress: show a tqdm bar over the tensors (on stderr, gone when done; redrawn at least
            every `REFRESH_SECONDS`, naming the tensor being read); None: when stderr is a terminal.
        generation_dir: a directory whose `generation_config.json`, if any, becomes
            `model.generation_config` (as `from_pretrained` reads it).

    Returns:
        The same model, in eval mode.

    Raises:
        ModelLoadError: a parameter the checkpoint lacks, a tensor whose shape is not the one the
            config makes (every one named, with both shapes), or a file that cannot be read.
        ConfigError: layers NF4 cannot block (as `lorakit.quantize`).
    """
    units = _plan(model, source)
    chosen = linears_to_quantize(model, quantize) if quantize is not None else {}
    tables = tables_to_store(model, chosen) if quantize is not None else TablesToStore()
    # By identity: a layer still waiting is in the model, so its id cannot be reused meanwhile.
    pending = {id(module): path for path, module in chosen.items()}
    del chosen
    # The tables stored in bf16 are read in bf16 (no float32 copy), their modules replaced at the end.
    table_modules = [model.get_submodule(p) for p in (tables.embeddings, tables.head) if p is not None]
    table_dtype = table_modules[0].weight.dtype if table_modules else None
    table_ids = {id(m) for m in table_modules}
    del table_modules
    show = progress if progress is not None else sys.stderr.isatty()
    bar = tqdm(total=len(units), desc="load", unit="tensor", disable=not show, leave=False, dynamic_ncols=True)
    with torch.no_grad(), bar, _refreshing(bar):
        while units:
            # Popped, so nothing here keeps a replaced layer (and its full-precision weight) alive.
            unit = units.pop(0)
            bar.set_postfix_str(unit.keys[0], refresh=False)
            is_table = unit.is_param and any(id(m) in table_ids for m, _ in unit.holders)
            _store(unit, source, torch.bfloat16 if is_table else None)
            for module, _ in unit.holders:
                path = pending.get(id(module))
                if path is not None and not any(p.is_meta for p in module.parameters(recurse=False)):
                    model.set_submodule(path, QuantizedLinear.from_linear(module, quantize))
                    del pending[id(module)]
            del unit
            bar.update()
    left = [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]
    if left:  # every parameter has a unit; this would be a module that shares one in a way lorakit missed
        raise ModelLoadError(f"these tensors were not loaded: {', '.join(left[:8])}")
    store_tables(model, tables, table_dtype)
    if generation_dir is not None and (generation_dir / "generation_config.json").is_file():
        _read_generation_config(model, generation_dir)
    return model.eval()


@contextmanager
def _refreshing(bar: tqdm) -> Iterator[None]:
    """Redraw the bar every `REFRESH_SECONDS` from a thread, so its clock moves even while one
    tensor takes long (a 7B model's 45M-weight projections take seconds each to quantize to NF4)."""
    if bar.disable:
        yield
        return
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(REFRESH_SECONDS):
            bar.refresh()

    thread = threading.Thread(target=tick, name="lorakit-load-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _plan(model: nn.Module, source: TensorSource) -> list[_Unit]:
    """One unit per distinct parameter (and persistent buffer), checked against the checkpoint."""
    available = source.keys()
    prefix = getattr(model, "base_model_prefix", "") or ""
    units: dict[int, _Unit] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        path, _, attr = key.rpartition(".")
        module = model.get_submodule(path)
        is_param = attr in module._parameters
        unit = units.get(id(tensor))
        if unit is None:
            unit = units[id(tensor)] = _Unit(keys=[], meta=tensor, is_param=is_param, holders=[])
        unit.keys.append(key)
        unit.holders.append((module, attr))
        stored = _checkpoint_key(key, available, prefix)
        if stored is not None:
            unit.present[key] = stored
    # A buffer the checkpoint lacks keeps the value its module computed (transformers re-initialises
    # those the same way); a parameter it lacks is an error.
    kept = [u for u in units.values() if u.present or u.is_param]
    missing = [" = ".join(u.keys) for u in kept if not u.present]
    if missing:
        raise ModelLoadError(
            f"the checkpoint lacks {len(missing)} of the model's tensors: {', '.join(missing[:8])}"
            f"{' ...' if len(missing) > 8 else ''}; it is incomplete or for another model class"
        )
    mismatched = [
        f"{source.describe(stored)} has shape {tuple(source.shape(stored))}, the model's {key} is {tuple(u.meta.shape)}"
        for u in kept
        for key, stored in u.present.items()
        if tuple(source.shape(stored)) != tuple(u.meta.shape)
    ]
    if mismatched:
        raise ModelLoadError(
            f"{len(mismatched)} tensors do not have the shape the config makes: {'; '.join(mismatched[:8])}"
            f"{' ...' if len(mismatched) > 8 else ''}; the checkpoint and its config.json do not belong together"
        )
    return [u for u in kept if u.present]


def _checkpoint_key(key: str, available: set[str], prefix: str) -> str | None:
    """The checkpoint's name for a model key: the same, or without the task head's base-model prefix
    (a checkpoint saved from the bare model, as transformers accepts)."""
    if key in available:
        return key
    if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1 :] in available:
        return key[len(prefix) + 1 :]
    return None


def _store(unit: _Unit, source: TensorSource, dtype: torch.dtype | None = None) -> None:
    """Read a unit's value(s), in `dtype` (default: the one it was built with), and set them on
    every module that holds it.

    Names tied in the model but each present in the checkpoint stay tied only if the stored values
    are equal (transformers' `tie_weights` unties them otherwise).
    """
    dtype = dtype or unit.meta.dtype
    first_key, first_stored = next(iter(unit.present.items()))
    values = {first_key: source.read(first_stored, dtype)}
    for key, stored in list(unit.present.items())[1:]:
        other = source.read(stored, dtype)
        if not torch.equal(other, values[first_key]):
            values[key] = other
    made: dict[int, torch.Tensor] = {}
    for key, (module, attr) in zip(unit.keys, unit.holders, strict=True):
        raw = values.get(key, values[first_key])
        if id(raw) not in made:
            made[id(raw)] = nn.Parameter(raw, requires_grad=unit.meta.requires_grad) if unit.is_param else raw
        if unit.is_param:
            module._parameters[attr] = made[id(raw)]
        else:
            module._buffers[attr] = made[id(raw)]


def _read_generation_config(model: nn.Module, directory: Path) -> None:
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {directory / 'generation_config.json'}: {exc}") from exc
