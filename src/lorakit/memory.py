"""Preflight: the memory a LoRA training run will hold, estimated from the model's config alone.

`estimate(model, quantize=..., lora=..., batch_size=..., seq_len=...)` builds the model on
the meta device from its config (`model_skeleton`: shapes and dtypes, no weights: a 7B-shape
config in seconds and a few MB) and adds up, in bytes:

- *weights*, each parameter as lorakit stores it: the linear layers `lorakit.quantize` picks (every
  `nn.Linear` but the output head) in NF4 (`stored_bytes` of torchao's `NF4Tensor`: 4-bit codes,
  one int8 scaler per 64 values, one scaler factor per `nf4_scaler_block` scalers, the mean and
  the 16-value table in the load dtype) or bf16; under either scheme the input embeddings and the
  output head in bf16 (`quantization.tables_to_store`), otherwise in the load dtype; norms and
  biases in the load dtype; tied weights once. Buffers (rotary tables) apart.
- *adapters + optimizer*: the trainable parameters `inject.preview` counts (A, B, DoRA's
  magnitude, `modules_to_save` copies; trained biases), as many bytes again for their gradients,
  and AdamW's state (two moments in the parameter's dtype and a float32 step per tensor).
- *activations*, what the forward keeps for the backward (`Activations`), per block and token,
  for a LLaMA-style block (RMSNorm, rotary attention, gated MLP) or a GPT-2-style one (LayerNorm,
  GELU MLP, dropouts), counted tensor by tensor in `_block_bytes`'s docstring; with gradient
  checkpointing, each block's input plus one block's tensors (rebuilt in its backward); and the
  gradients in flight in one block's backward.
- *loss*: the full path's (tokens × vocabulary) logits, their shifted copy, log-softmax and its
  gradient, or the chunked path's one chunk of float32 logits and its gradient (`train.chunked_loss`).
  The loss's tensors are gone when the blocks' backward starts, so the peak counts the larger of
  the loss and the backward's gradients (`Activations.peak`).
- *runtime*: what `import torch, transformers` and lorakit hold in a fresh process
  (`RUNTIME_OVERHEAD`).

`available_memory(device)` is what the machine can give: `psutil.virtual_memory().available`
(else `/proc/meminfo`'s MemAvailable), free CUDA memory for `"cuda"`, or the environment variable
`LORAKIT_AVAILABLE_MEMORY` when set (bytes, or with a K/M/G/T suffix: binary units), which
overrides both. `lorakit inspect` prints the estimate beside it; `lorakit train` warns before
loading the model when the estimate exceeds it.

The estimate models lorakit's own paths (its LoRA node, the gated-MLP node, NF4 dequantized per
product, dropout masks as int32 positions on CPU or bits) in training mode without autocast.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import ConfigError, ModelLoadError
from lorakit.extras import require
from lorakit.inject import preview
from lorakit.kernels.dropout import SPARSE_MAX_P
from lorakit.kernels.gated_mlp import is_gated_mlp
from lorakit.models.cache import gguf_header, resolve
from lorakit.models.pretrained import dtype_kwargs
from lorakit.quantization import (
    NF4_BLOCK_SIZE,
    TablesToStore,
    linears_to_quantize,
    nf4_scaler_block,
    quantization_of,
    tables_to_store,
)
from lorakit.state import find_state
from lorakit.targeting import resolve_modules_to_save
from lorakit.train.chunked_loss import chunk_tokens_for
from lorakit.weights import is_conv1d

__all__ = [
    "AVAILABLE_MEMORY_ENV",
    "RUNTIME_OVERHEAD",
    "Activations",
    "MemoryEstimate",
    "Preflight",
    "advice",
    "available_memory",
    "estimate",
    "format_bytes",
    "model_skeleton",
    "report",
    "verdict",
]

RUNTIME_OVERHEAD = 352 * 2**20
"""Resident memory of a fresh process after `import torch, transformers, lorakit` and torchao's NF4:
351 MiB measured (torch 2.13 CPU, transformers 5.25, Linux x86-64; `import torch` alone 219 MiB)."""

AVAILABLE_MEMORY_ENV = "LORAKIT_AVAILABLE_MEMORY"
"""Environment variable that overrides the available memory `available_memory` reports."""

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_HALF = (torch.bfloat16, torch.float16)
# The leaf names of the projection that leaves an attention or MLP module (its input is that
# module's inner activation, not the block's hidden state).
_ATTENTION_OUT = frozenset({"o_proj", "c_proj", "out_proj", "dense", "wo"})
_MLP_OUT = frozenset({"down_proj", "c_proj", "fc2", "dense_4h_to_h", "w2", "wo"})


@dataclass
class Preflight:
    """The training run whose memory `lorakit inspect` estimates (the rest is `--target`, `-r`, ...);
    the defaults are `lorakit train`'s.

    Args:
        quantize: how the base's linear weights would be stored: `none` (the load dtype), `nf4` or
            `bf16` (as `lorakit train --quantize`).
        seq_len: tokens per row.
        batch_size: rows per batch.
        device: where training would run: `cpu` (compared with the available RAM) or `cuda`
            (with the free memory of the current CUDA device).
    """

    quantize: Literal["none", "nf4", "bf16"] = "none"
    seq_len: int = 128
    batch_size: int = 8
    device: Literal["cpu", "cuda"] = "cpu"

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be an integer >= 1, got {value!r}"
            for name in ("seq_len", "batch_size")
            if isinstance(value := getattr(self, name), bool) or not isinstance(value, int) or value < 1
        ]
        if self.quantize not in ("none", "nf4", "bf16"):
            problems.append(f"quantize must be 'none', 'nf4' or 'bf16', got {self.quantize!r}")
        if self.device not in ("cpu", "cuda"):
            problems.append(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if problems:
            raise ConfigError("invalid Preflight:\n  - " + "\n  - ".join(problems))


@dataclass(frozen=True)
class Activations:
    """Bytes of activations one training step holds (forward and backward of one micro-batch).

    Attributes:
        saved: what the forward keeps for the backward in every block (no checkpointing), and
            outside them: the end of the forward.
        kept: with gradient checkpointing, what the forward keeps: each block's input, the tensors
            kept outside the blocks.
        block: the largest block's saved tensors, which checkpointing rebuilds in its backward.
        backward: the gradients in flight while one block runs its backward.
    """

    saved: int
    kept: int
    block: int
    backward: int

    def total(self, grad_checkpointing: bool) -> int:
        """The activations' peak without the loss: at the start of the backward (no checkpointing),
        or while the backward rebuilds a block (checkpointing)."""
        return (self.kept + self.block if grad_checkpointing else self.saved) + self.backward

    def peak(self, grad_checkpointing: bool, loss: int) -> int:
        """The peak with a loss that holds `loss` bytes at the end of the forward: the loss's
        tensors are gone when the blocks' backward starts, so the larger of the two counts."""
        if grad_checkpointing:
            return self.kept + max(loss, self.block + self.backward)
        return self.saved + max(loss, self.backward)


@dataclass(frozen=True)
class MemoryEstimate:
    """What a LoRA training run will hold, in bytes (see the module docstring for each part).

    Attributes:
        weights: bytes of the base's parameters by kind (`linear (nf4)`, `linear (float32)`,
            `embeddings`, `output head`, `norms and biases`); tied parameters once.
        buffers: the base's buffers (rotary tables, ...).
        trainable_parameters: parameters that train (A, B, ... as `inject.preview` counts, plus
            trained biases).
        adapters: bytes of those parameters.
        gradients: bytes of their gradients.
        optimizer: AdamW's state for them (two moments and a step per tensor).
        activations: the forward's activations (`Activations`).
        loss: bytes the loss holds, for `"full"` and `"chunked"`.
        overhead: the runtime's own memory (`RUNTIME_OVERHEAD`).
        grad_checkpointing: whether `total` counts checkpointed activations.
        loss_kind: which `loss` entry `total` counts.
        batch_size: rows per micro-batch.
        seq_len: tokens per row.
        quantize: how the linear layers are stored (`"nf4"`, `"bf16"`, None).
        device: `"cpu"` or `"cuda"`.
    """

    weights: Mapping[str, int]
    buffers: int
    trainable_parameters: int
    adapters: int
    gradients: int
    optimizer: int
    activations: Activations
    loss: Mapping[str, int]
    overhead: int
    grad_checkpointing: bool
    loss_kind: str
    batch_size: int
    seq_len: int
    quantize: str | None
    device: str

    @property
    def weight_bytes(self) -> int:
        """All of the base's parameters."""
        return sum(self.weights.values())

    @property
    def adapter_state(self) -> int:
        """Adapters + gradients + optimizer state."""
        return self.adapters + self.gradients + self.optimizer

    def total_for(self, grad_checkpointing: bool, loss: str) -> int:
        """The whole estimate for the given checkpointing and loss."""
        return (
            self.weight_bytes
            + self.buffers
            + self.adapter_state
            + self.activations.peak(grad_checkpointing, self.loss[loss])
            + self.overhead
        )

    @property
    def total(self) -> int:
        """The whole estimate, with this estimate's checkpointing and loss."""
        return self.total_for(self.grad_checkpointing, self.loss_kind)


# ----------------------------------------------------------------------------- the model from its config
def model_skeleton(
    spec: Any = None, *, task: str = "causal-lm", num_labels: int = 2, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, str]:
    """The model `load_model(spec, task=...)` would build, on the meta device: every module, parameter
    shape and dtype, no weights (nothing is read but the config).

    Args:
        spec: what `load_model` takes (a packaged alias, a transformers directory, a `.gguf` file;
            None: the packaged default), or a transformers `PretrainedConfig`.
        task: `causal-lm`, `classification` or `base`, as for `load_model`.
        num_labels: classes, for classification.
        dtype: the load dtype.

    Returns:
        (the meta model, its name as `load_model` gives it; for a config, its `name_or_path`).

    Raises:
        ModelLoadError: as `load_model`, or transformers cannot build the model from its config.
    """
    require("transformers", "cli", "reading a model's config")
    import transformers

    if isinstance(spec, transformers.PretrainedConfig):
        config, name = spec, str(getattr(spec, "name_or_path", "") or type(spec).__name__)
    else:
        config, name, task = _config_of(spec, task)
    if task == "classification":
        config = copy.deepcopy(config)  # the caller's config stays as it was
        config.num_labels = num_labels
        auto = transformers.AutoModelForSequenceClassification
    elif task == "causal-lm":
        auto = transformers.AutoModelForCausalLM
    else:
        auto = transformers.AutoModel
    try:
        with torch.device("meta"):
            model = auto.from_config(config, **dtype_kwargs(dtype))
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot build a {task} model from the config of {name}: {exc}") from exc
    return model, name


def _config_of(spec: Any, task: str) -> tuple[Any, str, str]:
    """(config, name, task) for a spec, as `load_model` finds them: a `.gguf` file's config from its
    metadata (`cache.gguf_header`: config and tokenizer cached, nothing dequantised), else the
    config.json of the directory `cache.resolve` gives."""
    from transformers import AutoConfig

    text = os.fspath(spec) if spec is not None else None
    path = Path(text).expanduser() if text is not None else None
    is_encoder = False
    try:
        if path is not None and path.is_file() and path.suffix.lower() == ".gguf":
            directory, name = gguf_header(path)  # type: ignore[misc]  # built when missing, so never None
        else:
            directory, name, is_encoder = resolve(spec)
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot read the config of {text or 'the packaged model'}: {exc}") from exc
    return config, name, ("base" if is_encoder and task != "classification" else task)


# ----------------------------------------------------------------------------- the estimate
def estimate(
    model: Any = None,
    *,
    quantize: str | None = None,
    lora: LoraConfig | None = None,
    batch_size: int = 8,
    seq_len: int = 128,
    grad_checkpointing: bool = False,
    loss: str = "chunked",
    dtype: torch.dtype = torch.float32,
    task: str = "causal-lm",
    num_labels: int = 2,
    device: str = "cpu",
) -> MemoryEstimate:
    """Estimate the memory of training `lora` on `model` (see the module docstring).

    Args:
        model: a spec `load_model` takes, a transformers config, or a model (its structure is read,
            never its weights; a model already quantized or carrying adapters is refused).
        quantize: `"nf4"`, `"bf16"` or None (`"none"`): how the linear layers are stored.
        lora: the adapter that would train (default: `LoraConfig()`); for classification without
            `modules_to_save`, the classification head trains in full, as `lorakit train` does.
        batch_size: rows per micro-batch.
        seq_len: tokens per row (every row counted at full length).
        grad_checkpointing: which activations `total` counts.
        loss: `"chunked"` or `"full"`: which loss `total` counts (classification: the logits only).
        dtype: the load dtype (`lorakit train` loads in float32).
        task: `causal-lm`, `classification` or `base`.
        num_labels: classes, for classification.
        device: `"cpu"` or `"cuda"`: how dropout masks and attention are kept there.

    Returns:
        A `MemoryEstimate`.

    Raises:
        ConfigError: a bad option, or NF4 asked for a model with a linear layer it cannot block
            (as `lorakit.quantize` would, before anything loads).
        ModelLoadError, TargetNotFoundError: the model cannot be read, or `lora` targets nothing in it.
    """
    lora = lora if lora is not None else LoraConfig()
    scheme = None if quantize in (None, "none") else quantize
    _check(scheme, batch_size, seq_len, loss, device)
    if isinstance(model, nn.Module):
        skeleton = model
        if quantization_of(model) is not None or find_state(model) is not None:
            raise ConfigError("estimate reads a plain model: pass it before quantize and inject (or its config)")
    else:
        skeleton, _ = model_skeleton(model, task=task, num_labels=num_labels, dtype=dtype)
    dtype = next((p.dtype for p in skeleton.parameters() if p.is_floating_point()), dtype)
    head = _head(skeleton)
    if task == "classification" and lora.modules_to_save is None:
        name = next((n for n in ("classifier", "score") if hasattr(skeleton, n)), None)
        if name is not None:
            lora = dataclasses.replace(lora, modules_to_save=[name])
    weights, quantized = _weights(skeleton, scheme, head)
    buffers = sum(_bytes(b) for b in skeleton.buffers())
    adapter_dtype = _adapter_dtype(lora, dtype, scheme)
    sizes = preview(skeleton, lora)
    saved_paths = set(resolve_modules_to_save(skeleton, lora))
    params = _trainable(skeleton, lora, sizes, saved_paths, adapter_dtype)
    param_bytes = sum(n * size for n, size, _ in params)
    optimizer = sum(2 * n * size + 4 * tensors for n, size, tensors in params)
    spec = _Spec.of(skeleton, dtype, batch_size, seq_len, device)
    adapted = {p: n for p, n in sizes.items() if p not in saved_paths}
    activations = _activations(skeleton, spec, lora, adapted, adapter_dtype, quantized, saved_paths)
    losses = _loss(skeleton, spec, head, task, saved_paths)
    return MemoryEstimate(
        weights=weights,
        buffers=buffers,
        trainable_parameters=sum(n for n, _, _ in params),
        adapters=param_bytes,
        gradients=param_bytes,
        optimizer=optimizer,
        activations=activations,
        loss=losses,
        overhead=RUNTIME_OVERHEAD,
        grad_checkpointing=grad_checkpointing,
        loss_kind=loss,
        batch_size=batch_size,
        seq_len=seq_len,
        quantize=scheme,
        device=device,
    )


def _check(scheme: str | None, batch_size: int, seq_len: int, loss: str, device: str) -> None:
    problems = [
        f"{name} must be an integer >= 1, got {value!r}"
        for name, value in (("batch_size", batch_size), ("seq_len", seq_len))
        if isinstance(value, bool) or not isinstance(value, int) or value < 1
    ]
    if scheme not in (None, "nf4", "bf16"):
        problems.append(f"quantize must be 'nf4', 'bf16' or None, got {scheme!r}")
    if loss not in ("chunked", "full"):
        problems.append(f"loss must be 'chunked' or 'full', got {loss!r}")
    if device not in ("cpu", "cuda"):
        problems.append(f"device must be 'cpu' or 'cuda', got {device!r}")
    if problems:
        raise ConfigError("cannot estimate the memory:\n  - " + "\n  - ".join(problems))


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def _nf4_bytes(numel: int, dtype: torch.dtype) -> int:
    """`stored_bytes` of an NF4 weight of `numel` values quantized from `dtype`: the packed codes
    (2 a byte), an int8 scaler per 64-block, a scaler factor per scaler block, the scalers' mean
    and the 16-value table (those three in `dtype`)."""
    blocks = numel // NF4_BLOCK_SIZE
    small = blocks // nf4_scaler_block(numel) + 1 + 16
    return numel // 2 + blocks + small * torch.empty((), dtype=dtype).element_size()


def _weights(model: nn.Module, scheme: str | None, head: nn.Module | None) -> tuple[dict[str, int], set[str]]:
    """(bytes by kind, the paths `lorakit.quantize` would replace), refusing what `quantize` would
    refuse (a layer NF4 cannot block, NF4 without torchao) as it would."""
    chosen = linears_to_quantize(model, scheme) if scheme is not None else {}
    quantized = set(chosen)
    tables = tables_to_store(model, chosen) if scheme is not None else TablesToStore()
    stored = {id(model.get_submodule(p).weight) for p in (tables.embeddings, tables.head) if p is not None}
    kinds: dict[str, int] = {}
    seen: set[int] = set()
    head_weight = getattr(head, "weight", None)
    for path, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            dtype_name = str(param.dtype).removeprefix("torch.")
            if path in quantized and name == "weight":
                kind = f"linear ({scheme})"
                size = _nf4_bytes(param.numel(), param.dtype) if scheme == "nf4" else param.numel() * 2
            else:
                size = param.numel() * 2 if id(param) in stored else _bytes(param)  # bf16 tables
                if isinstance(module, nn.Embedding):
                    kind = "embeddings"
                elif param is head_weight:
                    kind = "output head"
                elif name == "weight" and (isinstance(module, nn.Linear) or is_conv1d(module)):
                    kind = f"linear ({dtype_name})"
                else:
                    kind = "norms and biases"
            kinds[kind] = kinds.get(kind, 0) + size
    return kinds, quantized


def _adapter_dtype(lora: LoraConfig, dtype: torch.dtype, scheme: str | None) -> torch.dtype:
    """A and B's dtype: `adapter_dtype`, or `auto`: float32 over a half-precision or quantized base."""
    if lora.adapter_dtype != "auto":
        return getattr(torch, lora.adapter_dtype)
    return torch.float32 if (scheme is not None or dtype in _HALF) else dtype


def _trainable(
    model: nn.Module, lora: LoraConfig, sizes: Mapping[str, int], saved: set[str], adapter_dtype: torch.dtype
) -> list[tuple[int, int, int]]:
    """(parameters, bytes each, tensors) per group that trains: the adapters, the `modules_to_save`
    copies (in the model's dtype), the biases `lora.bias` names."""
    itemsize = torch.empty((), dtype=adapter_dtype).element_size()
    groups: list[tuple[int, int, int]] = []
    adapted = [p for p in sizes if p not in saved]
    tensors = 2 + (1 if lora.use_dora else 0)  # A, B (DoRA: its magnitude)
    groups.append((sum(sizes[p] for p in adapted), itemsize, tensors * len(adapted)))
    for path in saved:
        ps = list(model.get_submodule(path).parameters())
        groups += [(p.numel(), p.element_size(), 1) for p in ps]
    if lora.bias != "none":
        owners = adapted if lora.bias == "lora_only" else [p for p, _ in model.named_modules()]
        for path in owners:
            bias = getattr(model.get_submodule(path), "bias", None)
            if isinstance(bias, nn.Parameter) and not any(path == s or path.startswith(s + ".") for s in saved):
                groups.append((bias.numel(), bias.element_size(), 1))
    return groups


# ----------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class _Spec:
    """The shapes an activation estimate needs, from the model's config."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    layers: int
    itemsize: int
    batch: int
    seq: int
    device: str
    attention_dropout: float

    @classmethod
    def of(cls, model: nn.Module, dtype: torch.dtype, batch: int, seq: int, device: str) -> _Spec:
        cfg = getattr(model, "config", None)
        if cfg is None:
            raise ConfigError(f"estimate reads a transformers model's config; {type(model).__name__} has none")
        hidden = _first(cfg, "hidden_size", "n_embd", "d_model")
        heads = _first(cfg, "num_attention_heads", "n_head")
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or hidden // heads
        inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * hidden
        layers = _first(cfg, "num_hidden_layers", "n_layer")
        drop = float(getattr(cfg, "attention_dropout", None) or getattr(cfg, "attn_pdrop", None) or 0.0)
        itemsize = torch.empty((), dtype=dtype).element_size()
        vocab = int(getattr(cfg, "vocab_size", 0) or 0)
        return cls(hidden, inter, heads, kv, head_dim, vocab, layers, itemsize, batch, seq, device, drop)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def mask_bytes(self, width: int, p: float) -> float:
        """Bytes per token of one LoRA dropout mask over `width` inputs, as a backward keeps it: int32
        dropped positions on CPU up to `SPARSE_MAX_P` (p·width of them), else bits."""
        if p <= 0:
            return 0.0
        return p * width * 4 if (self.device == "cpu" and p <= SPARSE_MAX_P) else width / 8


def _first(cfg: Any, *names: str) -> int:
    for name in names:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ConfigError(f"cannot estimate activations: the model's config has none of {', '.join(names)}")


@dataclass
class _Adapted:
    """The adapted layers of one block, by role."""

    attn_in: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (input width, r) each
    attn_out: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    mlp_in: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    mlp_out: list[tuple[int, int]] = dataclasses.field(default_factory=list)


def _blocks(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """(path, modules) of the model's longest `nn.ModuleList`, its decoder blocks; `("", [])` if none."""
    lists = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        return "", []
    path, blocks = max(lists, key=lambda item: len(item[1]))
    return path, list(blocks)


def _in_width(module: nn.Module) -> int:
    if is_conv1d(module):
        return int(module.weight.shape[0])  # Conv1D stores (in, out)
    return int(getattr(module, "in_features", 0) or module.weight.shape[-1])


def _activations(
    model: nn.Module,
    spec: _Spec,
    lora: LoraConfig,
    adapted: Mapping[str, int],
    adapter_dtype: torch.dtype,
    quantized: set[str],
    saved_paths: set[str],
) -> Activations:
    path, blocks = _blocks(model)
    per_block = [_Adapted() for _ in blocks]
    # The first block's input requires grad only when an embedding trains (adapted or saved).
    outside = [t for t in (*adapted, *saved_paths) if not t.startswith(path + ".")]
    grad_in = any(isinstance(model.get_submodule(t), nn.Embedding) for t in outside)
    for target in adapted:
        if not target.startswith(path + "."):
            continue
        index, _, inner = target[len(path) + 1 :].partition(".")
        segments = inner.split(".")
        module = model.get_submodule(target)
        entry = (_in_width(module), lora.rank_for(target))
        attention = any("attn" in s or "attention" in s for s in segments[:-1])
        leaf = segments[-1]
        role = ("attn_out" if leaf in _ATTENTION_OUT else "attn_in") if attention else None
        if role is None:
            role = "mlp_out" if leaf in _MLP_OUT else "mlp_in"
        getattr(per_block[int(index)], role).append(entry)
    a_size = torch.empty((), dtype=adapter_dtype).element_size()
    total: list[float] = []
    for i, block in enumerate(blocks):
        block_quantized = any(p.startswith(f"{path}.{i}.") for p in quantized)
        size, grad_in = _block_bytes(block, per_block[i], spec, lora, a_size, grad_in, block_quantized)
        total.append(size)
    n, d = spec.tokens, spec.itemsize
    final = (_norm_bytes(_norm_kind(model), spec) if grad_in else 0.0) * n
    # Shared by every block: the rotary cos/sin (1, 1, seq, head_dim) and, when rows are padded
    # (batch > 1), the float attention mask (batch, 1, seq, seq) SDPA keeps — one per block.
    shared = 2 * spec.seq * spec.head_dim * d
    padded_mask = spec.batch * spec.seq * spec.seq * d if spec.batch > 1 else 0
    saved = sum(total) + final + shared + padded_mask * len(blocks)
    kept = len(blocks) * n * spec.hidden * d + final + shared + padded_mask
    # The backward of one block, measured: lorakit's gated-MLP node about (3·I + 2·H)·d a token
    # (the gradients of h, e and u, and of the block's input and output), the reference MLPs
    # about (2·I + 2·H)·d.
    node = blocks and _gated(blocks[0]) and not quantized and any(b.mlp_in or b.mlp_out for b in per_block)
    mlp = 3 if node else 2
    backward = n * d * (2 * spec.hidden + mlp * spec.intermediate) if blocks else 0
    block = max(total, default=0.0)
    return Activations(saved=round(saved), kept=round(kept), block=round(block), backward=round(backward))


def _norm_kind(module: nn.Module) -> str:
    return next(("layer" if isinstance(m, nn.LayerNorm) else "rms" for m in module.modules() if _is_norm(m)), "rms")


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or "RMSNorm" in type(module).__name__


def _norm_bytes(kind: str, spec: _Spec) -> float:
    """Per token, what a norm over a hidden state that requires grad keeps: RMSNorm its input in
    float32 and 1/rms (float32); LayerNorm its input and the mean and 1/std (float32)."""
    if kind == "layer":
        return spec.hidden * spec.itemsize + 8
    return spec.hidden * 4 + 4


def _gated(block: nn.Module) -> bool:
    return any(is_gated_mlp(m) for m in block.modules())


def _gelu_saves(block: nn.Module) -> int:
    """How many (tokens, intermediate) tensors the MLP's activation keeps: GPT-2's `gelu_new`
    (written out in tensor ops: x, x³ term, tanh, 1 + tanh) 4, torch's own GELU/SiLU/ReLU 1."""
    names = {type(m).__name__ for m in block.modules()}
    return 4 if "NewGELUActivation" in names else 1


def _block_bytes(
    block: nn.Module,
    adapted: _Adapted,
    spec: _Spec,
    lora: LoraConfig,
    a_size: int,
    grad_in: bool,
    quantized: bool,
) -> tuple[float, bool]:
    """(bytes one block keeps for the backward, whether its output requires grad).

    Per token, with d the activations' bytes (the load dtype), H hidden, I intermediate, h heads,
    k key/value heads, e head_dim, r each adapter's rank, only where a gradient flows through:

    - each norm: its input (RMSNorm: in float32, 4·H, and 1/rms; LayerNorm: d·H, mean and 1/std);
    - attention with SDPA's fused kernels: q, k, v and the output (d·(2·h·e + 2·k·e); k, v at h
      heads when a padding mask makes transformers repeat them) and the log-sum-exp (4·h);
      GPT-2's attention dropout on CPU takes the math path instead: the probabilities, their
      dropout noise and the dropped-out ones (3·h·seq·d) and q, kᵀ, v (3·d·H);
    - the MLP: lorakit's gated node (LLaMA, plain linear projections with LoRA) keeps e and u
      (2·d·I) and its input (d·H); the frozen gated MLP (or an NF4/bf16 one) keeps act's input,
      act(e) and u (3·d·I); GPT-2's GELU MLP what its activation keeps (`_gelu_saves`);
    - dropout modules of the block (GPT-2's residual dropouts): a float noise of d·H on CPU, a
      bool mask elsewhere;
    - LoRA: each node keeps its input (once per input tensor: q, k, v share the norm's output,
      gate and up the MLP's input; o_proj and down_proj their own), the (tokens, r) product
      x·Aᵀ in the adapter's dtype, and the dropout mask (`_Spec.mask_bytes`; shared like the
      input when `share_dropout_mask`).
    """
    d, H, inter = spec.itemsize, spec.hidden, spec.intermediate
    p = lora.lora_dropout
    shares = lora.share_dropout_mask
    norm = _norm_bytes(_norm_kind(block), spec)
    per_token = 0.0
    every = adapted.attn_in + adapted.attn_out + adapted.mlp_in + adapted.mlp_out
    per_token += sum(r * a_size for _, r in every)

    def lora_inputs(group: list[tuple[int, int]]) -> float:
        if not group:
            return 0.0
        width = group[0][0]
        masks = 1 if shares else len(group)
        return width * d + masks * spec.mask_bytes(width, p)

    # attention
    if grad_in:
        per_token += norm
    attn_grad = grad_in or bool(adapted.attn_in)
    per_token += lora_inputs(adapted.attn_in)
    math_path = spec.attention_dropout > 0 and spec.device == "cpu"
    if attn_grad:
        h, k, e = spec.heads, spec.kv_heads, spec.head_dim
        if math_path:
            per_token += 3 * h * spec.seq * d + 3 * H * d
        else:
            kv = h if spec.batch > 1 else k
            per_token += d * (2 * h * e + 2 * kv * e) + 4 * h
    for width, _ in adapted.attn_out:
        # SDPA's fused kernels return the output in (batch, seq, heads, head_dim) order, so the
        # output projection's input is the tensor SDPA keeps; the math path's is a new copy.
        shared_output = attn_grad and not math_path
        per_token += (0 if shared_output else width * d) + spec.mask_bytes(width, p)
    attn_out_grad = attn_grad or bool(adapted.attn_out)
    drops = [m for n, m in block.named_modules() if isinstance(m, nn.Dropout) and m.p > 0 and "attn_dropout" not in n]
    drop = d * H if spec.device == "cpu" else H
    if attn_out_grad and drops:
        per_token += drop  # the attention's residual dropout
    residual_grad = grad_in or attn_out_grad
    # MLP
    if residual_grad:
        per_token += norm
    gated = _gated(block)
    mlp_lora = bool(adapted.mlp_in or adapted.mlp_out)
    if gated and mlp_lora and not quantized and len(adapted.mlp_in) <= 2 and len(adapted.mlp_out) <= 1:
        # GatedMlpFunction: x, e, u; gate and up share one mask over x, down has its own over h.
        per_token += H * d + 2 * inter * d
        if adapted.mlp_in:
            share = shares and len(adapted.mlp_in) == 2
            per_token += (1 if share else len(adapted.mlp_in)) * spec.mask_bytes(H, p)
        if adapted.mlp_out:
            per_token += spec.mask_bytes(inter, p)
    else:
        mlp_grad = residual_grad or bool(adapted.mlp_in)
        if mlp_grad:
            per_token += (3 if gated else _gelu_saves(block)) * inter * d
        per_token += lora_inputs(adapted.mlp_in)
        for width, _ in adapted.mlp_out:
            per_token += width * d + spec.mask_bytes(width, p)
    out_grad = residual_grad or mlp_lora
    if out_grad and len(drops) > 1:
        per_token += drop  # the MLP's dropout
    return per_token * spec.tokens, out_grad


# ----------------------------------------------------------------------------- loss
def _loss(model: nn.Module, spec: _Spec, head: nn.Module | None, task: str, saved: set[str]) -> dict[str, int]:
    """Bytes of the loss for the full and the chunked path.

    Full, per (token, vocabulary entry), the larger of two moments: the end of the forward holds
    the head's logits (d), their shifted copy (d), a float32 copy when d < 4 and the log-softmax
    cross_entropy keeps (4); the start of the backward that log-softmax, the gradient of the NLL
    (4) and of the log-softmax (4), cast back to d when d < 4. Chunked: the head's input
    (tokens, H) as the model returns it, the kept rows and their gradient (3·d·H), and one chunk
    of float32 logits, which becomes its gradient in place, and logsumexp's temporary (C·V·8;
    the head's output in d before its float32 copy when d < 4),
    C = `chunk_tokens_for(V)`; a trained head also its float32 gradient (V·H·4). Classification:
    the (batch, labels) logits, on either path (counted as 0).
    """
    n, d, V, H = spec.tokens, spec.itemsize, spec.vocab, spec.hidden
    if task != "causal-lm" or head is None or V == 0:
        return {"full": 0, "chunked": 0}
    cast = 4 if d < 4 else 0
    full = n * V * max(2 * d + cast + 4, 12 + (d if cast else 0))
    chunk = min(n, chunk_tokens_for(V))
    chunked = n * H * d * 3 + chunk * V * (8 + (d if cast else 0)) + chunk * H * d
    head_path = next((p for p, m in model.named_modules() if m is head), None)
    if head_path is not None and head_path in saved:
        chunked += V * H * 4
    return {"full": round(full), "chunked": round(chunked)}


# ----------------------------------------------------------------------------- available memory
def available_memory(device: str = "cpu") -> int | None:
    """Bytes the machine can give a new allocation now.

    `$LORAKIT_AVAILABLE_MEMORY` (bytes, or a number with K, M, G or T: binary units) overrides
    everything; else on `"cpu"` psutil's `virtual_memory().available` (without psutil,
    /proc/meminfo's MemAvailable), on `"cuda"` the current device's free memory.

    Returns:
        The bytes, or None where nothing says (no psutil and no /proc/meminfo; no CUDA device).

    Raises:
        ConfigError: the environment variable is not a size.
    """
    given = os.environ.get(AVAILABLE_MEMORY_ENV, "").strip()
    if given:
        match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?", given, re.IGNORECASE)
        if match is None:
            raise ConfigError(
                f"{AVAILABLE_MEMORY_ENV}={given!r} is not a size: give bytes, or a number with K, M, G or T "
                "(binary units), e.g. 16G"
            )
        return int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if device == "cuda":
        return int(torch.cuda.mem_get_info()[0]) if torch.cuda.is_available() else None
    try:
        import psutil  # in the cli extra; /proc/meminfo without it
    except ImportError:
        return _meminfo_available()
    return int(psutil.virtual_memory().available)


def _meminfo_available() -> int | None:
    try:
        text = Path("/proc/meminfo").read_text(encoding="ascii")
    except OSError:
        return None
    match = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def format_bytes(n: float) -> str:
    """`1.5 GiB`, `320.0 MiB`, `12.0 KiB`, `512 B`."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{math.floor(n)} B"


# ----------------------------------------------------------------------------- what the commands print
def report(est: MemoryEstimate, available: int | None) -> list[str]:
    """The lines `lorakit inspect` prints: each part, the totals, what is available, a verdict.

    The main column is `lorakit train`'s default (no checkpointing, chunked loss); the notes give
    the other choices.

    Args:
        est: the estimate.
        available: `available_memory(est.device)`, or None when unknown.

    Returns:
        One string per line.
    """
    kinds = sorted(est.weights.items(), key=lambda item: -item[1])
    weights = ", ".join(f"{kind} {format_bytes(size)}" for kind, size in kinds)
    if est.buffers:
        weights += f", buffers {format_bytes(est.buffers)}"
    ckpt, full = est.total_for(True, "chunked"), est.total_for(False, "full")
    rows = [
        ("weights", est.weight_bytes + est.buffers, weights),
        (
            "adapters + optimizer",
            est.adapter_state,
            f"{est.trainable_parameters:,} trainable parameters, their gradients, AdamW's two moments",
        ),
        (
            "activations",
            est.activations.total(False),
            f"with --grad-checkpointing: {format_bytes(est.activations.total(True))}",
        ),
        ("loss (chunked)", est.loss["chunked"], f"--loss full (the logits): {format_bytes(est.loss['full'])}"),
        ("runtime", est.overhead, "torch, transformers and lorakit in a fresh process"),
        (
            "total",
            est.total_for(False, "chunked"),
            f"with --grad-checkpointing: {format_bytes(ckpt)}; with --loss full: {format_bytes(full)}",
        ),
    ]
    stored = f", linear layers as {est.quantize}" if est.quantize else ""
    lines = [f"memory estimate for training, batch {est.batch_size} × {est.seq_len} tokens{stored}:"]
    lines += [f"  {name:<22}{format_bytes(size):>11}   {note}" for name, size, note in rows]
    shown = format_bytes(available) if available is not None else "unknown"
    given = f"   from ${AVAILABLE_MEMORY_ENV}" if os.environ.get(AVAILABLE_MEMORY_ENV, "").strip() else ""
    lines.append(f"  {_available_label(est.device):<22}{shown:>11}{given}")
    lines.append(verdict(est, available, grad_checkpointing=False, loss="chunked"))
    return lines


def verdict(est: MemoryEstimate, available: int | None, *, grad_checkpointing: bool, loss: str) -> str:
    """One line: whether the run with these settings fits in `available`, and what would help if not."""
    total = est.total_for(grad_checkpointing, loss)
    where = _available_label(est.device)
    if available is None:
        return f"{where} is unknown: the estimate is {format_bytes(total)}"
    if total <= available:
        return f"fits: the estimate, {format_bytes(total)}, is {100 * total / available:.0f}% of the {where}"
    return (
        f"does not fit: the estimate, {format_bytes(total)}, exceeds the {where}, {format_bytes(available)}; "
        + advice(est, grad_checkpointing=grad_checkpointing, loss=loss)
    )


def advice(est: MemoryEstimate, *, grad_checkpointing: bool, loss: str) -> str:
    """What would lower the estimate of a run with these settings: `try --quantize nf4, ...`."""
    steps = []
    if est.quantize != "nf4":
        steps.append("--quantize nf4")
    if not grad_checkpointing:
        steps.append("--grad-checkpointing")
    if loss == "full":
        steps.append("--loss chunked")
    steps.append("a smaller --batch-size" if est.batch_size > 1 else "a smaller --seq-len")
    return "try " + ", ".join(steps[:-1]) + (" or " if len(steps) > 1 else "") + steps[-1]


def _available_label(device: str) -> str:
    return "free CUDA memory" if device == "cuda" else "available RAM"
