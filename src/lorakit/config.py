"""`LoraConfig`: what to adapt and how, validated in one place, and its PEFT JSON form."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from lorakit.errors import AdapterFormatError, ConfigError
from lorakit.variants import VARIANTS

__all__ = ["PEFT_FIELDS", "LoraConfig"]

BiasMode = Literal["none", "all", "lora_only"]
InitMode = bool | Literal["gaussian", "pissa"]

# Fields of PEFT's LoraConfig (0.21) that an adapter_config.json written by lorakit may carry.
PEFT_FIELDS = (
    "peft_type",
    "base_model_name_or_path",
    "task_type",
    "inference_mode",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "bias",
    "modules_to_save",
    "use_rslora",
    "init_lora_weights",
    "fan_in_fan_out",
    "use_dora",
    "lora_bias",
)

# PEFT options lorakit does not implement: loading a file that turns one on must fail loudly, since
# ignoring it would silently give other outputs than PEFT.
_UNSUPPORTED_WHEN_SET = {
    "lora_bias": "a bias on lora_B (lora_bias=true)",
    "layer_replication": "layer replication",
    "target_parameters": "target_parameters (LoRA on raw parameters)",
    "trainable_token_indices": "trainable token indices",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "aLoRA",
    "use_bdlora": "BD-LoRA",
}


@dataclass
class LoraConfig:
    """Which modules get a LoRA update and with which hyper-parameters.

    Field names and meanings follow PEFT's `LoraConfig` where PEFT has the field, so a config
    reads the same in both and round-trips through `adapter_config.json`.

    Args:
        r: rank of each update (an int ≥ 1). The paper uses 1-64; 4 or 8 is typical.
        lora_alpha: α; the update is scaled by α/r (α/√r with `use_rslora`). Must be > 0.
        lora_dropout: dropout probability on the LoRA branch's input, in [0, 1).
        target_modules: what to adapt. A list of module-name suffixes (`["q_proj", "v_proj"]`
            matches `model.layers.0.self_attn.q_proj`, by whole dotted segments), a regex string
            matched in full against each dotted module path, or `"all-linear"` (every linear
            layer except the output head) (default: the paper's choice, the attention query and
            value projections: `q_proj`/`v_proj`, `query`/`value`, or q and v inside GPT-2's
            fused `c_attn`).
        exclude_modules: suffix list or regex of modules never to adapt.
        layers_to_transform: only adapt modules whose layer index (the first numbered path
            segment, e.g. the 3 in `model.layers.3.mlp.up_proj`) is in this list (default: every
            layer).
        layers_pattern: the name of the layer list (e.g. `"layers"`, `"h"`) whose index
            `layers_to_transform` refers to (default: the first numbered path segment).
        rank_pattern: `{pattern: r}` overriding r for modules whose path ends with the pattern
            (regex, whole segments), as PEFT.
        alpha_pattern: `{pattern: alpha}` overriding lora_alpha the same way.
        bias: which biases train with the adapter: `"none"`, `"all"` (every bias of the
            model) or `"lora_only"` (biases of adapted layers). Trained biases are saved with it.
        modules_to_save: module-name suffixes trained in full (e.g. a classification head);
            each adapter keeps its own copy, saved in the adapter file (default: none; `lorakit
            train --task classification` trains the classification head).
        use_rslora: scale by α/√r instead of α/r.
        init_lora_weights: `True`: A Kaiming-uniform (as the reference implementation), B = 0,
            so a fresh adapter is a no-op. `"gaussian"`: A ~ N(0, 1/r²), B = 0. `"pissa"`: A and
            B from the top-r singular vectors of W0, and W0 replaced by the residual, so the
            output is unchanged at start (Meng et al., 2024). `False`: A and B both random
            (not a no-op; for tests).
        fused_slices: `{module suffix: [bool, ...]}` for fused projections: the layer's output
            is split into `len(list)` equal slices and only the `True` ones are adapted, each
            with its own rank-r pair (the paper's GPT-2 setup adapts q and v of `c_attn`:
            `{"c_attn": [True, False, True]}`).
        share_dropout_mask: layers that read the very same input tensor (q, k, v; gate, up)
            share one dropout mask, as the reference implementation's fused q/v layer does; the
            input and a 1-byte mask are kept once for the backward instead of a float copy per
            layer. `False` draws a mask per layer, as PEFT does. A lorakit setting, not saved
            in `adapter_config.json`; it only matters in training with `lora_dropout > 0`.
        adapter_dtype: the dtype of A and B (and DoRA's m): `auto` is fp32 over a half-precision or
            quantized base (as PEFT) and the base's dtype over fp32/fp64; `bfloat16` halves the
            adapter's weights and gradients. A lorakit setting, not saved in
            `adapter_config.json`.
        use_dora: DoRA (Liu et al., 2024): each adapted row of W is m·(W0 + s·B·A)/‖W0 + s·B·A‖, a
            trained magnitude m (PEFT's `lora_magnitude_vector`, initialised to the row norms of
            W0) times a LoRA-updated direction, the norm detached from the gradient (the paper's
            §4.3). Linear and Conv1D layers. With dropout in training, lorakit scales the base
            output of the input itself (PEFT recomputes the base product on the dropped-out input:
            one more product per layer); without dropout, and in inference, the two agree.
        base_model_name_or_path: recorded in `adapter_config.json` (default: the base model's
            name, `config._name_or_path`, when the adapter is saved).

    Raises:
        ConfigError: listing every invalid field with its value, all at once.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    bias: BiasMode = "none"
    modules_to_save: list[str] | None = None
    use_rslora: bool = False
    init_lora_weights: InitMode = True
    fused_slices: dict[str, list[bool]] | None = None
    share_dropout_mask: bool = True
    adapter_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    use_dora: bool = False
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, set | tuple):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, set | tuple):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.modules_to_save, set | tuple):
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.layers_to_transform, tuple):
            self.layers_to_transform = list(self.layers_to_transform)
        problems = self.problems()
        if problems:
            raise ConfigError("invalid LoraConfig:\n" + "\n".join(f"  - {p}" for p in problems))

    # ------------------------------------------------------------------ validation
    def problems(self) -> list[str]:
        """Every problem with this config, as one sentence each (empty when valid)."""
        out: list[str] = []
        if not _is_int(self.r) or self.r <= 0:
            out.append(f"r must be a positive integer, got {self.r!r}")
        if not _is_number(self.lora_alpha) or not self.lora_alpha > 0:
            out.append(f"lora_alpha must be a number > 0, got {self.lora_alpha!r}")
        if not _is_number(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            out.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            out.append(f"bias must be one of 'none', 'all', 'lora_only', got {self.bias!r}")
        if not (isinstance(self.init_lora_weights, bool) or self.init_lora_weights in ("gaussian", "pissa")):
            out.append(f"init_lora_weights must be True, False, 'gaussian' or 'pissa', got {self.init_lora_weights!r}")
        if not isinstance(self.use_rslora, bool):
            out.append(f"use_rslora must be a bool, got {self.use_rslora!r}")
        if not isinstance(self.share_dropout_mask, bool):
            out.append(f"share_dropout_mask must be a bool, got {self.share_dropout_mask!r}")
        if self.adapter_dtype not in ("auto", "float32", "bfloat16", "float16"):
            out.append(f"adapter_dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {self.adapter_dtype!r}")
        if not isinstance(self.use_dora, bool):
            out.append(f"use_dora must be a bool, got {self.use_dora!r}")
        else:
            chosen = [v for v in VARIANTS.values() if v.selected(self)]
            if len(chosen) > 1:
                out.append(f"choose one LoRA variant; this config selects {', '.join(v.name for v in chosen)}")
            for variant in chosen:
                out += variant.config_problems(self)
        out += _pattern_problems("target_modules", self.target_modules, allow_none=True)
        out += _pattern_problems("exclude_modules", self.exclude_modules, allow_none=True)
        if isinstance(self.target_modules, list) and not self.target_modules:
            out.append("target_modules is an empty list; name at least one module (or use None for the default)")
        lt = self.layers_to_transform
        if lt is not None:
            items = [lt] if _is_int(lt) else lt if isinstance(lt, list) else None
            if items is None or not all(_is_int(i) and i >= 0 for i in items):
                out.append(f"layers_to_transform must be an int ≥ 0 or a list of them, got {lt!r}")
            if isinstance(self.target_modules, str):
                out.append(
                    "layers_to_transform cannot be combined with a regex target_modules; put the index in the regex"
                )
        if self.layers_pattern is not None and lt is None:
            out.append("layers_pattern is only meaningful with layers_to_transform")
        for name, mapping, check, wanted in (
            ("rank_pattern", self.rank_pattern, lambda v: _is_int(v) and v > 0, "a positive integer"),
            ("alpha_pattern", self.alpha_pattern, lambda v: _is_number(v) and v > 0, "> 0"),
        ):
            if not isinstance(mapping, Mapping):
                out.append(f"{name} must be a dict, got {mapping!r}")
                continue
            for key, value in mapping.items():
                if not check(value):
                    out.append(f"{name}[{key!r}] must be {wanted}, got {value!r}")
                out += _regex_problems(f"{name} key", key)
        if self.modules_to_save is not None and (
            not isinstance(self.modules_to_save, list)
            or not all(isinstance(m, str) and m for m in self.modules_to_save)
        ):
            out.append(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")
        if self.fused_slices is not None:
            if not isinstance(self.fused_slices, Mapping):
                out.append(f"fused_slices must be a dict {{module: [bool, ...]}}, got {self.fused_slices!r}")
            else:
                for key, mask in self.fused_slices.items():
                    if (
                        not isinstance(mask, list | tuple)
                        or len(mask) < 2
                        or not all(isinstance(b, bool) for b in mask)
                    ):
                        out.append(f"fused_slices[{key!r}] must be a list of ≥ 2 bools, got {mask!r}")
                    elif not any(mask):
                        out.append(f"fused_slices[{key!r}] adapts no slice: {list(mask)!r}")
            if self.init_lora_weights == "pissa":
                out.append("init_lora_weights='pissa' cannot be combined with fused_slices")
        return out

    # ------------------------------------------------------------------ per-module values
    def rank_for(self, path: str) -> int:
        """r for the module at `path` (rank_pattern first, as PEFT's `get_pattern_key`)."""
        key = _pattern_key(self.rank_pattern, path)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, path: str) -> float:
        """lora_alpha for the module at `path` (alpha_pattern first)."""
        key = _pattern_key(self.alpha_pattern, path)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def fused_slices_for(self, path: str) -> list[bool] | None:
        """The slice mask for the module at `path`, or None if it is not a sliced fused layer."""
        if not self.fused_slices:
            return None
        key = _pattern_key(self.fused_slices, path)
        return list(self.fused_slices[key]) if key is not None else None

    # ------------------------------------------------------------------ PEFT JSON
    @classmethod
    def from_peft_dict(cls, data: Mapping[str, Any], source: str = "adapter_config.json") -> LoraConfig:
        """Read PEFT's `adapter_config.json` content.

        Args:
            data: the parsed JSON object.
            source: the file name, for error messages.

        Returns:
            The config. Fields lorakit has no use for (task_type, inference_mode, ...) are dropped.

        Raises:
            AdapterFormatError: not a LoRA config, or it turns on a PEFT feature lorakit lacks.
        """
        if not isinstance(data, Mapping):
            raise AdapterFormatError(f"{source}: expected a JSON object, got {type(data).__name__}")
        peft_type = data.get("peft_type")
        if peft_type != "LORA":
            raise AdapterFormatError(f"{source}: peft_type is {peft_type!r}; lorakit reads LoRA adapters ('LORA') only")
        for key, what in _UNSUPPORTED_WHEN_SET.items():
            if data.get(key):
                raise AdapterFormatError(f"{source}: the adapter uses {what}, which lorakit does not support")
        init = data.get("init_lora_weights", True)
        if init not in (True, False, "gaussian", "pissa"):
            # PEFT's other initialisations (olora, loftq, eva, ...) only matter at creation time;
            # the saved tensors already hold their result.
            init = True
        kwargs: dict[str, Any] = {}
        names = {f.name for f in fields(cls)}
        for key in names - {"init_lora_weights", "fused_slices", "share_dropout_mask", "adapter_dtype"}:
            if key in data and data[key] is not None:
                kwargs[key] = data[key]
        kwargs["init_lora_weights"] = init
        for key in ("rank_pattern", "alpha_pattern"):
            kwargs[key] = dict(kwargs.get(key) or {})
        try:
            return cls(**kwargs)
        except ConfigError as err:
            raise AdapterFormatError(f"{source}: {err}") from None

    def to_peft_dict(self) -> dict[str, Any]:
        """This config as PEFT's `adapter_config.json` (PEFT's field names only)."""
        if self.fused_slices:
            raise ConfigError("a config with fused_slices is written per module by save_adapter, not directly")
        return {
            "peft_type": "LORA",
            "base_model_name_or_path": self.base_model_name_or_path,
            "task_type": None,
            "inference_mode": True,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": self.target_modules,
            "exclude_modules": self.exclude_modules,
            "layers_to_transform": self.layers_to_transform,
            "layers_pattern": self.layers_pattern,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "bias": self.bias,
            "modules_to_save": self.modules_to_save,
            "use_rslora": self.use_rslora,
            "init_lora_weights": self.init_lora_weights if self.init_lora_weights != "pissa" else True,
            "fan_in_fan_out": False,
            "use_dora": self.use_dora,
            "lora_bias": False,
        }


def _pattern_key(patterns: Mapping[str, Any], path: str) -> str | None:
    # PEFT utils/other.py get_pattern_key: the first key k with re.match(rf"(.*\.)?({k})$", path).
    for key in patterns:
        if key == path or re.match(rf"(.*\.)?({key})$", path):
            return key
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _regex_problems(what: str, pattern: str) -> list[str]:
    try:
        re.compile(pattern)
    except re.error as err:
        return [f"{what} {pattern!r} is not a valid regular expression: {err}"]
    return []


def _pattern_problems(name: str, value: Any, *, allow_none: bool) -> list[str]:
    if value is None:
        return [] if allow_none else [f"{name} is required"]
    if isinstance(value, str):
        return [] if value == "all-linear" else _regex_problems(name, value)
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return []
    return [f"{name} must be a list of module names, a regex string or 'all-linear', got {value!r}"]
