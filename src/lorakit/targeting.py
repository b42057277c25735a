"""Turn a `LoraConfig` into the exact list of module paths to adapt. Mutates nothing."""

from __future__ import annotations

import difflib
import re
from collections import Counter
from dataclasses import dataclass

from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import ConfigError, TargetNotFoundError, UnsupportedLayerError
from lorakit.layers import LoraLayer, SavedModule, is_conv1d, supported_types
from lorakit.state import walk

__all__ = [
    "DEFAULT_TARGETS",
    "Target",
    "adaptable_modules",
    "names_module",
    "resolve_modules_to_save",
    "resolve_targets",
]

# The paper adapts Wq and Wv (section 4.2, 7.1). Per architecture family, the first set found is used.
DEFAULT_TARGETS: tuple[tuple[str, ...], ...] = (("q_proj", "v_proj"), ("query", "value"))
# GPT-2 computes q, k, v in one fused Conv1D; the paper's setup adapts q and v inside it.
DEFAULT_FUSED = {"c_attn": [True, False, True]}


def names_module(path: str, name: str) -> bool:
    """Whether `name` names the module at `path`, as PEFT's list targets do: the whole dotted path,
    or its last parts (`q_proj` and `self_attn.q_proj` name `model.layers.0.self_attn.q_proj`;
    `proj` does not)."""
    return path == name or path.endswith("." + name)


@dataclass(frozen=True)
class Target:
    """One module to adapt.

    Attributes:
        path: dotted module path (as in `model.named_modules()` before injection).
        module: what is there now: the base layer, or an existing LoRA wrapper.
        slices: the fused-slice mask, or None for an ordinary adapter.
    """

    path: str
    module: nn.Module
    slices: list[bool] | None = None

    @property
    def base(self) -> nn.Module:
        """The layer that is (or will be) wrapped."""
        return self.module.base_layer if isinstance(self.module, LoraLayer) else self.module


def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """path -> base layer, for every layer of a type lorakit can adapt (wrapped or not)."""
    out: dict[str, nn.Module] = {}
    types = supported_types()
    for path, module in walk(model):
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if isinstance(base, types) and not _inside_saved(model, path):
            out[path] = module
    return out


def resolve_targets(model: nn.Module, config: LoraConfig) -> list[Target]:
    """Every module `config` adapts, in model order.

    Raises:
        TargetNotFoundError: a target (or the whole config) matches nothing; the message lists the
            closest existing names and the adaptable layers of the model.
        UnsupportedLayerError: a target names a module whose type cannot be adapted.
        ConfigError: a fused-slice mask does not fit the layer it names.
    """
    modules = list(walk(model))
    adaptable = adaptable_modules(model)
    saved = set(resolve_modules_to_save(model, config, check=False))
    output_head = _output_head_path(model)
    layers_filter = _layer_filter(config)
    fused = dict(config.fused_slices or {})

    spec = config.target_modules
    if spec is None:
        spec, fused_default = _default_targets(adaptable)
        if fused_default:
            fused = {**fused_default, **fused}
    chosen: list[Target] = []
    hits: Counter[str] = Counter()
    for path, module in modules:
        if _inside_saved(model, path) or any(path == s or path.startswith(s + ".") for s in saved):
            continue
        if _excluded(config.exclude_modules, path):
            continue
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if spec == "all-linear":
            matched = (isinstance(base, nn.Linear) or is_conv1d(base)) and path != output_head
        elif isinstance(spec, str):
            matched = re.fullmatch(spec, path) is not None
        else:
            entry = next((t for t in spec if names_module(path, t)), None)
            matched = entry is not None
            if matched:
                hits[entry] += 1
        if not matched or isinstance(module, SavedModule):
            continue
        if path not in adaptable:
            raise UnsupportedLayerError(
                f"target {path!r} is a {type(base).__name__}, which LoRA cannot adapt. "
                f"Adaptable types: {_type_names()}. " + _children_hint(path, adaptable)
            )
        if layers_filter is not None and not layers_filter(path):
            continue
        chosen.append(Target(path, module, _slices_for(fused, path)))

    if isinstance(spec, list):
        missing = [t for t in spec if hits[t] == 0]
        if missing:
            raise TargetNotFoundError(_not_found_message(missing, adaptable, config))
    if not chosen:
        what = f"target_modules={spec!r}" if config.target_modules is not None else "the default targets (q/v)"
        reason = ""
        if layers_filter is not None:
            reason = f" with layers_to_transform={config.layers_to_transform!r}"
        raise TargetNotFoundError(f"{what}{reason} matched no adaptable module.\n" + _inventory(adaptable))
    _check_fused(fused, chosen, config)
    return chosen


def resolve_modules_to_save(model: nn.Module, config: LoraConfig, *, check: bool = True) -> list[str]:
    """Paths of the modules `config.modules_to_save` names (suffix match on whole segments).

    Raises:
        TargetNotFoundError: (with `check`) a name that matches no module, with the closest names.
    """
    if not config.modules_to_save:
        return []
    paths: list[str] = []
    all_paths = [p for p, _ in walk(model)]
    for name in config.modules_to_save:
        found = [p for p in all_paths if names_module(p, name) and not _inside_saved(model, p)]
        found = [p for p in found if not any(p.startswith(q + ".") for q in found)]
        if not found and check:
            leaves = sorted({p.rsplit(".", 1)[-1] for p in all_paths})
            close = difflib.get_close_matches(name, leaves, n=5, cutoff=0.4)
            raise TargetNotFoundError(
                f"modules_to_save entry {name!r} matches no module. "
                f"Closest names: {', '.join(close) or '(none)'}. Top-level modules: "
                f"{', '.join(n for n, _ in model.named_children())}"
            )
        paths += found
    return paths


# ---------------------------------------------------------------------------- helpers
def _inside_saved(model: nn.Module, path: str) -> bool:
    parts = path.split(".")
    module = model
    for part in parts[:-1]:
        module = getattr(module, part)
        if isinstance(module, SavedModule):
            return True
    return False


def _excluded(exclude: list[str] | str | None, path: str) -> bool:
    if not exclude:
        return False
    if isinstance(exclude, str):
        return re.fullmatch(exclude, path) is not None
    return any(names_module(path, e) for e in exclude)


def _output_head_path(model: nn.Module) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    for path, module in walk(model):
        if module is head or (isinstance(module, LoraLayer) and module.base_layer is head):
            return path
    return None


def _layer_index(path: str, pattern: list[str] | str | None) -> int | None:
    parts = path.split(".")
    if pattern is None:
        # The first numbered segment after the first one: `model.layers.3.mlp` -> 3.
        return next((int(p) for p in parts[1:] if p.isdigit()), None)
    patterns = [pattern] if isinstance(pattern, str) else pattern
    for i, part in enumerate(parts[:-1]):
        if any(re.fullmatch(p, part) for p in patterns) and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def _layer_filter(config: LoraConfig):
    wanted = config.layers_to_transform
    if wanted is None:
        return None
    indices = {wanted} if isinstance(wanted, int) else set(wanted)
    return lambda path: _layer_index(path, config.layers_pattern) in indices


def _default_targets(adaptable: dict[str, nn.Module]) -> tuple[list[str], dict[str, list[bool]]]:
    leaves = {p.rsplit(".", 1)[-1] for p in adaptable}
    for group in DEFAULT_TARGETS:
        if leaves & set(group):
            return [t for t in group if t in leaves], {}
    if "c_attn" in leaves:
        return ["c_attn"], dict(DEFAULT_FUSED)
    raise TargetNotFoundError(
        "target_modules is not set and the model has none of the usual attention projections "
        f"({', '.join(t for g in DEFAULT_TARGETS for t in g)}, c_attn); name the modules to adapt.\n"
        + _inventory(adaptable)
    )


def _slices_for(fused: dict[str, list[bool]], path: str) -> list[bool] | None:
    for key, mask in fused.items():
        if names_module(path, key) or re.fullmatch(rf"(.*\.)?({key})", path):
            return list(mask)
    return None


def _check_fused(fused: dict[str, list[bool]], chosen: list[Target], config: LoraConfig) -> None:
    problems = []
    for key in fused:
        explicit = bool(config.fused_slices) and key in config.fused_slices
        if explicit and not any(_slices_for({key: [True]}, t.path) for t in chosen):
            problems.append(f"fused_slices key {key!r} matches no adapted module")
    for t in chosen:
        if t.slices is None:
            continue
        base = t.base
        if not (isinstance(base, nn.Linear) or is_conv1d(base)):
            problems.append(f"fused_slices applies to linear layers; {t.path!r} is a {type(base).__name__}")
            continue
        out = base.weight.shape[1] if is_conv1d(base) else base.weight.shape[0]
        if out % len(t.slices):
            problems.append(
                f"fused_slices for {t.path!r}: {out} output features do not split into {len(t.slices)} equal slices"
            )
    if problems:
        raise ConfigError("invalid fused_slices:\n" + "\n".join(f"  - {p}" for p in problems))


def _type_names() -> str:
    return ", ".join(t.__name__ for t in supported_types())


def _leaf_counts(adaptable: dict[str, nn.Module]) -> dict[str, str]:
    counts: dict[str, Counter[str]] = {}
    for path, module in adaptable.items():
        base = module.base_layer if isinstance(module, LoraLayer) else module
        counts.setdefault(path.rsplit(".", 1)[-1], Counter())[type(base).__name__] += 1
    return {leaf: ", ".join(f"{t} ×{n}" for t, n in c.items()) for leaf, c in counts.items()}


def _inventory(adaptable: dict[str, nn.Module]) -> str:
    leaves = _leaf_counts(adaptable)
    listing = "; ".join(f"{leaf} ({desc})" for leaf, desc in leaves.items()) or "(none)"
    return f"Adaptable layers in this model: {listing}. Layer types lorakit can adapt: {_type_names()}."


def _not_found_message(missing: list[str], adaptable: dict[str, nn.Module], config: LoraConfig) -> str:
    leaves = list(_leaf_counts(adaptable))
    lines = []
    for name in missing:
        pool = leaves if "." not in name else list(adaptable)
        close = difflib.get_close_matches(name, pool, n=5, cutoff=0.3)
        lines.append(f"target_modules entry {name!r} matches no module; closest names: {', '.join(close) or '(none)'}")
    return "\n".join(lines) + "\n" + _inventory(adaptable)


def _children_hint(path: str, adaptable: dict[str, nn.Module]) -> str:
    kids = [p[len(path) + 1 :] for p in adaptable if p.startswith(path + ".")]
    if not kids:
        return ""
    shown = ", ".join(kids[:8]) + (", ..." if len(kids) > 8 else "")
    return f"Its adaptable submodules: {shown}."
