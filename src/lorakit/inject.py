"""Inject adapters into a model: plan every replacement first, then swap; and remove them again."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import ConfigError, LorakitError, UnsupportedLayerError
from lorakit.functional import scaling
from lorakit.kernels import gated_mlp
from lorakit.layers import AdapterRecord, LoraLayer, SavedModule, wrapper_for
from lorakit.quantized import is_quantized
from lorakit.state import check_adapter_name, clear_state, hosts, lora_layers, state_of
from lorakit.targeting import Target, resolve_modules_to_save, resolve_targets
from lorakit.variants import variant_for

__all__ = ["inject", "preview", "unload"]


_ADAPTER_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class _Step:
    path: str
    old: nn.Module
    wrapper: LoraLayer
    record: AdapterRecord
    residual: torch.Tensor | None = None  # PiSSA: the new base weight


def inject(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Add a LoRA adapter to every layer `config` targets, in place.

    Every target is resolved and every replacement built before any module is swapped, so an
    error leaves the model exactly as it was. Afterwards the base weights are frozen: only the
    active adapters' A and B (plus the biases `config.bias` names and the `modules_to_save`
    copies) require grad. The first adapter on a model becomes active; later ones are added
    inactive (as PEFT's `add_adapter`): switch with `set_adapter`.

    Args:
        model: any `nn.Module`; changed in place.
        config: what to adapt and how.
        adapter_name: a name for this adapter (no dots; not `"__base__"`).

    Returns:
        The same model object.

    Raises:
        ConfigError: bad adapter name, or a name already in use.
        TargetNotFoundError: a target matches nothing (the message lists the names that exist).
        UnsupportedLayerError: a target is a layer type lorakit cannot adapt.
    """
    check_adapter_name(model, adapter_name)
    steps = plan(model, config, adapter_name)
    saved_paths = resolve_modules_to_save(model, config)
    apply(model, config, adapter_name, steps, saved_paths, trainable=True)
    return model


def preview(model: nn.Module, config: LoraConfig) -> dict[str, int]:
    """What `inject(model, config)` would train, without changing the model.

    Returns:
        Module path -> its new trainable parameters, for every LoRA layer (A and B) and every
        `modules_to_save` copy the config would add, in model order.

    Raises:
        As `inject`.
    """
    counting = dataclasses.replace(config, init_lora_weights=True)  # no SVD for PiSSA: sizes only
    steps = plan(model, counting, "preview")
    sizes = {step.path: sum(p.numel() for p in step.record.parameters()) for step in steps}
    for path in resolve_modules_to_save(model, config):
        sizes[path] = sum(p.numel() for p in model.get_submodule(path).parameters())
    return sizes


def plan(model: nn.Module, config: LoraConfig, adapter_name: str, targets: list[Target] | None = None) -> list[_Step]:
    """Build (without installing) the wrapper and adapter record for every target."""
    steps: list[_Step] = []
    dtype = _ADAPTER_DTYPES[config.adapter_dtype]
    variant = variant_for(config)
    for target in targets if targets is not None else resolve_targets(model, config):
        module = target.module
        wrapper = module if isinstance(module, LoraLayer) else wrapper_for(module)(module)
        if adapter_name in wrapper.adapters:
            raise ConfigError(f"{target.path!r} already has an adapter named {adapter_name!r}")
        r = config.rank_for(target.path)
        alpha = config.alpha_for(target.path)
        enabled = [i for i, on in enumerate(target.slices) if on] if target.slices else None
        n_slices = len(target.slices) if target.slices else 1
        residual = None
        if config.init_lora_weights == "pissa":
            if not hasattr(wrapper, "pissa_tensors"):
                raise ConfigError(f"init_lora_weights='pissa' supports linear layers; {target.path!r} is not one")
            if is_quantized(target.base):
                raise ConfigError(
                    f"init_lora_weights='pissa' rewrites W0, which {target.path!r} stores quantized: it would be "
                    "re-quantized; initialise PiSSA on the full-precision model, or use init_lora_weights=True"
                )
            A, B, residual = wrapper.pissa_tensors(r, scaling(r, alpha, config.use_rslora))
            A, B = (A.to(dtype), B.to(dtype)) if dtype is not None else (A, B)
        elif enabled is not None:
            A, B = wrapper.new_pair(r, config.init_lora_weights, dtype=dtype, slices=enabled, n_slices=n_slices)
        else:
            A, B = wrapper.new_pair(r, config.init_lora_weights, dtype=dtype)
        record = AdapterRecord(
            A,
            B,
            r=r,
            lora_alpha=alpha,
            use_rslora=config.use_rslora,
            dropout=config.lora_dropout,
            share_dropout_mask=config.share_dropout_mask,
            slices=enabled,
            n_slices=n_slices,
        )
        if residual is not None:
            record.pissa_initial = (A.detach().clone(), B.detach().clone())
        if variant is not None:
            why = variant.unsupported(wrapper, target.path)
            if why is not None:
                raise UnsupportedLayerError(why)
            record.variant = variant
            variant.init(wrapper, record)
        steps.append(_Step(target.path, module, wrapper, record, residual))
    return steps


def apply(
    model: nn.Module,
    config: LoraConfig,
    adapter_name: str,
    steps: list[_Step],
    saved_paths: list[str],
    *,
    trainable: bool,
) -> None:
    """Install planned steps (nothing here validates user input; on any error, undo all).

    Every module this creates (wrapper, adapter record, saved copy) takes the training mode of the
    layer it wraps, so an adapter loaded into a model in eval mode runs no dropout, and one added
    to a training model trains (PEFT's `from_pretrained` likewise gives an eval-mode model).
    """
    state = state_of(model, create=True)
    first = not state.configs
    done: list[tuple[str, nn.Module, nn.Module]] = []  # (path, old, new) swaps, to undo
    added: list[nn.Module] = []
    old_weights: list[tuple[nn.Module, torch.Tensor]] = []
    try:
        for step in steps:
            if step.wrapper is not step.old:
                step.wrapper.train(step.old.training)
                _set_module(model, step.path, step.wrapper)
                done.append((step.path, step.old, step.wrapper))
            step.record.train(step.wrapper.base_layer.training)
            step.wrapper.adapters[adapter_name] = step.record
            added.append(step.wrapper)
            if step.residual is not None:
                weight = step.wrapper.base_layer.weight
                old_weights.append((step.wrapper, weight.detach().clone()))
                with torch.no_grad():
                    weight.copy_(step.residual)
        for path in saved_paths:
            module = model.get_submodule(path)
            wrapper = module if isinstance(module, SavedModule) else SavedModule(module)
            if wrapper is not module:
                wrapper.train(module.training)
                _set_module(model, path, wrapper)
                done.append((path, module, wrapper))
            wrapper.add_copy(adapter_name).train(wrapper.original_module.training)
            added.append(wrapper)
    except BaseException:
        for host in added:
            if adapter_name in host.adapters:
                del host.adapters[adapter_name]
        for wrapper, weight in old_weights:
            with torch.no_grad():
                wrapper.base_layer.weight.copy_(weight)
        for path, old, _new in reversed(done):
            _set_module(model, path, old)
        if first:
            clear_state(model)
        raise

    state.configs[adapter_name] = config
    if first:
        for p in model.parameters():
            p.requires_grad_(False)
        state.active = (adapter_name,)
    for _, host in hosts(model):
        if adapter_name in host.adapters and trainable:
            host.trainable_adapters.add(adapter_name)
        host.set_active(state.active)
        if isinstance(host, LoraLayer):
            host.masks = state.masks
    if trainable and adapter_name in state.active:
        _set_bias_trainable(model, config)
    gated_mlp.install(model)


def unload(model: nn.Module) -> nn.Module:
    """Remove every wrapper without merging: the base layers come back as they are now.

    Merged adapters stay in the weights (use `merge_and_unload` to merge first, or `unmerge`).

    Returns:
        The same model object, with its original module types.
    """
    for path, host in list(hosts(model)):
        if isinstance(host, LoraLayer):
            _set_module(model, path, host.base_layer)
        else:
            assert isinstance(host, SavedModule)
            _set_module(model, path, host.original_module)
    gated_mlp.uninstall(model)
    clear_state(model)
    return model


def _set_bias_trainable(model: nn.Module, config: LoraConfig) -> None:
    if config.bias == "all":
        for name, p in model.named_parameters():
            segments = name.split(".")
            if segments[-1] == "bias" and "adapters" not in segments and "original_module" not in segments:
                p.requires_grad_(True)
    elif config.bias == "lora_only":
        for _, layer in lora_layers(model):
            bias = getattr(layer.base_layer, "bias", None)
            if isinstance(bias, nn.Parameter):
                bias.requires_grad_(True)


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if not hasattr(parent, leaf):
        raise LorakitError(f"no module at {path!r}")
    setattr(parent, leaf, module)
