"""Adapter files in PEFT's exact format: `adapter_config.json` + `adapter_model.safetensors`.

Keys are `base_model.model.<module path>.lora_A.weight` (r × in) and `.lora_B.weight` (out × r)
(embeddings: `.lora_embedding_A` / `.lora_embedding_B`), metadata `{"format": "pt"}`, as PEFT's
`get_peft_model_state_dict` writes them (PEFT utils/save_and_load.py). Writes are atomic; reads
touch safetensors and JSON only, and check every key and shape before copying any tensor.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from lorakit import atomic
from lorakit.config import LoraConfig
from lorakit.errors import AdapterFormatError, ShapeMismatchError
from lorakit.inject import apply, plan
from lorakit.layers import LoraConv2d, LoraEmbedding, LoraLayer, SavedModule, is_conv1d, wrapper_for
from lorakit.quantized import quantization_of
from lorakit.state import check_adapter_name, hosts, lora_layers, require_adapter, walk
from lorakit.targeting import Target, resolve_modules_to_save
from lorakit.variants import VARIANTS, variant_for

__all__ = [
    "BASE_QUANTIZATION_KEY",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "adapter_base_quantization",
    "check_adapter_files",
    "load_adapter",
    "read_adapter_config",
    "read_lora_tensors",
    "save_adapter",
]

BASE_QUANTIZATION_KEY = "lorakit.base_quantization"
"""Metadata key of `adapter_model.safetensors` naming the scheme of a quantized base the adapter
was trained on (`"nf4"`, `"bf16"`); absent for a full-precision base. PEFT does not read it."""
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_LORA_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_embedding_A": "A",
    ".lora_embedding_B": "B",
}
_AB = {"A": "lora_A", "B": "lora_B"}


def _suffixes() -> dict[str, str]:
    """Key suffix -> part: A and B, and every registered variant's parameters (`<path>.<name>`,
    the part named as the parameter)."""
    return {**_LORA_SUFFIXES, **{f".{n}": n for v in VARIANTS.values() for n in v.param_names}}


# ---------------------------------------------------------------------------------------- save
def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Write one adapter as PEFT does, so `peft.PeftModel.from_pretrained` loads it.

    Fused-slice adapters are written as an ordinary adapter of the fused layer (B
    block-structured, zeros where a slice is not adapted), PiSSA adapters relative to the original
    W0; per-module ranks and alphas go into `rank_pattern`/`alpha_pattern` keyed by exact path.

    Args:
        model: a model carrying the adapter.
        directory: created if missing; existing files of the same names are replaced atomically.
        adapter_name: which adapter.

    Returns:
        The directory as a Path.

    Raises:
        LorakitError: no adapter of that name.
    """
    state = require_adapter(model, adapter_name)
    config = state.configs[adapter_name]
    tensors: dict[str, torch.Tensor] = {}
    paths: list[str] = []
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    fan_in_fan_out = False
    for path, layer in lora_layers(model):
        if adapter_name not in layer.adapters:
            continue
        paths.append(path)
        for suffix, tensor in layer.peft_tensors(adapter_name).items():
            tensors[f"{PREFIX}{path}.{suffix}"] = tensor
        rank, alpha = layer.peft_rank_alpha(adapter_name)
        if rank != config.r:
            rank_pattern[re.escape(path)] = rank
        if alpha != config.lora_alpha:
            alpha_pattern[re.escape(path)] = alpha
        fan_in_fan_out |= is_conv1d(layer.base_layer)
    for path, host in hosts(model):
        if isinstance(host, SavedModule) and adapter_name in host.adapters:
            for name, tensor in host.adapters[adapter_name].state_dict().items():
                tensors[f"{PREFIX}{path}.{name}"] = tensor
    for name, param in _trained_biases(model, config):
        tensors[f"{PREFIX}{name}"] = param.detach()

    peft = (
        config.to_peft_dict()
        if not config.fused_slices
        else dataclasses.replace(config, fused_slices=None).to_peft_dict()
    )
    peft.update(
        target_modules=paths,
        exclude_modules=None,
        layers_to_transform=None,
        layers_pattern=None,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        fan_in_fan_out=fan_in_fan_out,
        base_model_name_or_path=config.base_model_name_or_path or _model_name(model),
    )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt"}
    scheme = quantization_of(model)
    if scheme is not None:  # PEFT reads only "format"; lorakit's `merge` reads this one
        metadata[BASE_QUANTIZATION_KEY] = scheme
    payload = safetensors_save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, metadata)
    atomic.write_bytes(directory / WEIGHTS_NAME, payload)
    atomic.write_json(directory / CONFIG_NAME, peft, sort_keys=True)
    return directory


def _model_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    return str(name) if name else None


def _trained_biases(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Parameter]]:
    if config.bias == "none":
        return []
    if config.bias == "lora_only":
        out = []
        for path, layer in lora_layers(model):
            bias = getattr(layer.base_layer, "bias", None)
            if isinstance(bias, nn.Parameter):
                out.append((f"{path}.base_layer.bias", bias))
        return out
    return [
        (name, p)
        for name, p in model.named_parameters()
        if name.split(".")[-1] == "bias" and not {"adapters", "original_module"} & set(name.split("."))
    ]


# ---------------------------------------------------------------------------------------- load
def adapter_base_quantization(directory: str | os.PathLike) -> str | None:
    """The quantization of the base an adapter was trained on (`"nf4"`, `"bf16"`), or None.

    Raises:
        AdapterFormatError: the weights file is missing or not safetensors.
    """
    path = Path(directory) / WEIGHTS_NAME
    _read_weights(path)
    with safe_open(path, framework="pt", device="cpu") as f:
        return (f.metadata() or {}).get(BASE_QUANTIZATION_KEY)


def read_adapter_config(directory: str | os.PathLike) -> LoraConfig:
    """Read and validate `adapter_config.json` of an adapter directory.

    Raises:
        AdapterFormatError: missing directory or file, invalid JSON, not a LoRA config.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFormatError(f"adapter directory {str(directory)!r} does not exist")
    path = directory / CONFIG_NAME
    if not path.is_file():
        present = sorted(p.name for p in directory.iterdir())
        raise AdapterFormatError(f"{path}: missing (the directory has: {', '.join(present) or 'nothing'})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFormatError(f"{path}: not valid JSON, incomplete or corrupt ({err})") from None
    return LoraConfig.from_peft_dict(data, source=str(path))


def check_adapter_files(directory: str | os.PathLike) -> LoraConfig:
    """Check an adapter directory as far as no model is needed, so a command refuses a bad adapter
    before it loads one: `adapter_config.json`, the safetensors file (read whole and checked; never a
    pickle), PEFT's keys with every lora_A paired with its lora_B. `load_adapter` checks the same,
    then the shapes.

    Returns:
        The adapter's config.

    Raises:
        AdapterFormatError: as `load_adapter`, for everything but the model's modules and shapes.
    """
    config = read_adapter_config(directory)
    path = Path(directory) / WEIGHTS_NAME
    _split_keys(_shapes(_read_weights(path)), path)
    return config


def load_adapter(
    model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False
) -> nn.Module:
    """Load a PEFT-format LoRA adapter (saved by lorakit or by PEFT) into `model` in place.

    The adapted modules are exactly those the file has tensors for. Every key and shape is
    checked against the model before anything is copied; on any error the model is unchanged.
    The first adapter on a model becomes active; later ones are added inactive.

    Args:
        model: the base model (or a model that already carries other adapters).
        directory: folder with `adapter_config.json` and `adapter_model.safetensors`.
        adapter_name: the name to give it.
        is_trainable: if False (default) its parameters stay frozen, for inference.

    Returns:
        The same model object.

    Raises:
        AdapterFormatError: missing or corrupt files, a pickle in place of safetensors, keys that
            name modules the model does not have.
        ShapeMismatchError: a tensor whose shape does not fit its layer (names file, key, shapes).
        ConfigError: the adapter name is taken or invalid.
    """
    check_adapter_name(model, adapter_name)
    config = read_adapter_config(directory)
    weights_path = Path(directory) / WEIGHTS_NAME
    tensors = _read_weights(weights_path)
    header = _shapes(tensors)

    lora, extra = _split_keys(header, weights_path)
    targets: list[Target] = []
    modules = dict(walk(model))
    order = {p: i for i, p in enumerate(modules)}
    for path in sorted(lora, key=lambda p: order.get(p, -1)):
        targets.append(_check_lora_module(model, modules, path, lora[path], header, config, weights_path))
    saved_paths = resolve_modules_to_save(model, config) if config.modules_to_save else []
    extra_plan = _check_extra(model, saved_paths, extra, header, weights_path)

    load_config = dataclasses.replace(config, init_lora_weights=False)
    steps = plan(model, load_config, adapter_name, targets)
    apply(model, config, adapter_name, steps, saved_paths, trainable=is_trainable)
    with torch.no_grad():
        for step in steps:
            keys = lora[step.path]
            step.record.lora_A.copy_(tensors[keys["A"]])
            step.record.lora_B.copy_(tensors[keys["B"]])
            for part, key in keys.items():
                if part not in ("A", "B", "kind"):  # a variant's parameter, by its own name
                    getattr(step.record, part).copy_(tensors[key])
        for key, (kind, where, name) in extra_plan.items():
            if kind == "saved":
                copy = model.get_submodule(where).adapters[adapter_name]
                copy.state_dict()[name].copy_(tensors[key])  # state_dict tensors share storage
            else:
                where.copy_(tensors[key])
    return model


def read_lora_tensors(directory: str | os.PathLike) -> tuple[LoraConfig, dict[str, dict[str, Any]]]:
    """An adapter's config and, per adapted module, its tensors, read (not loaded into a model).

    The files are checked as `load_adapter` checks them (safetensors only, PEFT's keys, A and B
    both present); keys other than LoRA's (modules_to_save, biases) are left out.

    Returns:
        `(config, {module path: {"A": tensor, "B": tensor, [a variant's parameter by its name,] "kind":
        "linear" | "embedding"}})`.

    Raises:
        AdapterFormatError: missing, corrupt or pickled files, or keys that are not PEFT's.
    """
    config = read_adapter_config(directory)
    path = Path(directory) / WEIGHTS_NAME
    tensors = _read_weights(path)
    lora, _ = _split_keys(_shapes(tensors), path)
    return config, {
        module: {part: (key if part == "kind" else tensors[key]) for part, key in slot.items()}
        for module, slot in lora.items()
    }


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an adapter's weights file, which must be there, safetensors, whole, not empty.

    The file is read once with plain reads, never memory-mapped, and everything (the keys and
    shapes checked against a model, the tensors copied into it) comes from that one read: a file
    rewritten in place while it is read (an adapter being saved again) is then an error here,
    where a mapped read would kill the process with SIGBUS once the file is cut short. Adapter
    files are small; the copy costs one file's size for a moment.
    """
    if not path.is_file():
        pickled = [
            n for n in ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin") if (path.parent / n).exists()
        ]
        if pickled:
            raise AdapterFormatError(
                f"{path}: missing; the directory has {pickled[0]}, a pickle file, which lorakit never loads "
                "(unpickling runs arbitrary code). Convert it to safetensors with a tool you trust."
            )
        raise AdapterFormatError(f"{path}: missing (an incomplete adapter: is it still being written?)")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise AdapterFormatError(f"{path}: cannot be read: {err}") from None
    if data[:2] == b"PK" or data[:1] == b"\x80":
        raise AdapterFormatError(
            f"{path}: this is a pickle/zip file (torch.save), not safetensors; lorakit never unpickles files"
        )
    try:
        tensors = safetensors_load(data)
    except (SafetensorError, ValueError) as err:
        raise AdapterFormatError(
            f"{path}: not a valid safetensors file, incomplete or corrupt (is it still being written?): {err}"
        ) from None
    if not tensors:
        raise AdapterFormatError(f"{path}: holds no tensors")
    return tensors


def _shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(t.shape) for k, t in tensors.items()}


def _split_keys(header: dict[str, tuple[int, ...]], path: Path) -> tuple[dict[str, dict[str, str]], list[str]]:
    lora: dict[str, dict[str, str]] = {}
    extra: list[str] = []
    # safetensors gives the keys in no fixed order: sorted, the first module an error names is
    # the same on every run (and every machine).
    for key in sorted(header):
        if not key.startswith(PREFIX):
            raise AdapterFormatError(f"{path}: key {key!r} does not start with {PREFIX!r}; not a PEFT adapter file")
        for suffix, part in _suffixes().items():
            if key.endswith(suffix):
                module_path = key[len(PREFIX) : -len(suffix)]
                slot = lora.setdefault(module_path, {})
                slot[part] = key
                if part in _AB:
                    slot["kind"] = "embedding" if "embedding" in suffix else "linear"
                break
        else:
            extra.append(key)
    for module_path, slot in lora.items():
        for part in ("A", "B"):
            if part not in slot:
                present = ", ".join(_AB.get(p, p) for p in slot if p != "kind")
                raise AdapterFormatError(f"{path}: {module_path!r} has {present} but no {_AB[part]}")
    return lora, extra


def _check_lora_module(
    model: nn.Module,
    modules: dict[str, nn.Module],
    path: str,
    keys: dict[str, str],
    header: dict[str, tuple[int, ...]],
    config: LoraConfig,
    file: Path,
) -> Target:
    module = modules.get(path)
    if module is None:
        close = difflib.get_close_matches(path, list(modules), n=3, cutoff=0.5)
        base = f" (made for {config.base_model_name_or_path!r}?)" if config.base_model_name_or_path else ""
        raise AdapterFormatError(
            f"{file}: key {keys['A']!r} names module {path!r}, which this model does not have: the adapter was made "
            f"for another base model{base}. Closest modules: {', '.join(close) or '(none)'}"
        )
    base = module.base_layer if isinstance(module, LoraLayer) else module
    cls = wrapper_for(base)
    if cls is None:
        raise AdapterFormatError(f"{file}: {path!r} is a {type(base).__name__}, which LoRA cannot adapt")
    if (cls is LoraEmbedding) != (keys["kind"] == "embedding"):
        raise AdapterFormatError(f"{file}: {keys['A']!r} does not fit {path!r}, a {type(base).__name__}")
    shape_a, shape_b = header[keys["A"]], header[keys["B"]]
    r = shape_a[0] if shape_a else 0
    if isinstance(base, nn.Embedding):
        want_a, want_b = (r, base.num_embeddings), (base.embedding_dim, r)
    elif cls is LoraConv2d:
        want_a, want_b = (r, base.in_channels, *base.kernel_size), (base.out_channels, r, 1, 1)
    else:
        w = base.weight.shape
        in_f, out_f = (w[0], w[1]) if is_conv1d(base) else (w[1], w[0])
        want_a, want_b = (r, in_f), (out_f, r)
    for key, got, want in ((keys["A"], shape_a, want_a), (keys["B"], shape_b, want_b)):
        if tuple(got) != tuple(want):
            raise ShapeMismatchError(
                f"{file}: tensor {key!r} has shape {list(got)} but {path!r} ({type(base).__name__} "
                f"{list(base.weight.shape)}) needs {list(want)}: the adapter was made for another base model"
            )
    expected_r = config.rank_for(path)
    if expected_r != r:
        raise ShapeMismatchError(
            f"{file}: {keys['A']!r} has rank {r} but adapter_config.json says r={expected_r} for {path!r}"
        )
    variant = variant_for(config)
    want = set(variant.param_names) if variant is not None else set()
    have = {p for p in keys if p not in ("A", "B", "kind")}
    if have != want:
        kind = f"a {variant.title} adapter (with {', '.join(sorted(want))})" if variant is not None else "plain LoRA"
        raise AdapterFormatError(
            f"{file}: {path!r} has {', '.join(sorted(have)) or 'no tensors but lora_A and lora_B'}, but "
            f"adapter_config.json describes {kind}"
        )
    if variant is not None:
        shapes = variant.param_shape(_ShapeView(want_b[0]), r)
        for part in sorted(have):
            if tuple(header[keys[part]]) != tuple(shapes[part]):
                raise ShapeMismatchError(
                    f"{file}: tensor {keys[part]!r} has shape {list(header[keys[part]])} but {path!r} needs "
                    f"{list(shapes[part])}"
                )
    return Target(path, module)


@dataclasses.dataclass
class _ShapeView:
    """What a variant's `param_shape` reads of a layer, known from the file before any wrapper exists."""

    out_features: int


def _normalised(name: str) -> str:
    return ".".join(s for s in name.split(".") if s != "base_layer")


def _check_extra(
    model: nn.Module, saved_paths: list[str], extra: list[str], header: dict[str, tuple[int, ...]], file: Path
) -> dict[str, tuple]:
    plan_: dict[str, tuple] = {}
    params = {
        _normalised(n): p
        for n, p in model.named_parameters()
        if not {"adapters", "original_module"} & set(n.split("."))
    }
    for key in extra:
        rest = key[len(PREFIX) :]
        owner = next((s for s in saved_paths if rest.startswith(s + ".")), None)
        if owner is not None:
            host = model.get_submodule(owner)
            original = host.original_module if isinstance(host, SavedModule) else host
            name = rest[len(owner) + 1 :]
            if name.startswith("modules_to_save."):  # some writers keep PEFT's wrapper segment
                name = name.split(".", 2)[2]
            state = original.state_dict()
            if name not in state:
                raise AdapterFormatError(f"{file}: {key!r}: {owner!r} has no tensor {name!r} (it has {sorted(state)})")
            target_shape = tuple(state[name].shape)
            plan_[key] = ("saved", owner, name)
        else:
            param = params.get(_normalised(rest))
            if param is None:
                raise AdapterFormatError(
                    f"{file}: key {key!r} matches no LoRA tensor, module to save or parameter of this model"
                )
            target_shape = tuple(param.shape)
            plan_[key] = ("param", param, None)
        if tuple(header[key]) != target_shape:
            raise ShapeMismatchError(
                f"{file}: tensor {key!r} has shape {list(header[key])}, the model needs {list(target_shape)}"
            )
    return plan_
