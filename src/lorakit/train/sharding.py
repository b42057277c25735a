"""FSDP2 for `fit`: shard a model across the ranks, gather its trainable tensors, checkpoint its shards.

`shard(model)` applies PyTorch's `fully_shard` (FSDP2) to each decoder block, then to the root, as
torchtune's LoRA recipes do: every parameter — the frozen base and the adapters alike — is split
along its first dimension over the ranks (a `DTensor` holding this rank's rows), gathered block by
block for each forward and backward, and each gradient is reduce-scattered back to the rank that
owns its rows. Only the adapters train; the optimizer sees only this rank's rows of them.

- Gradients are reduced with sums only (`set_force_sum_reduction_for_comms`): gloo's `AVG`
  reduction has been reported to sum instead of average (pytorch issue 162338), and a sum followed
  by FSDP's own division is exact on every backend.
- `gathered(model)` makes every trainable parameter whole again for a moment (a collective: every
  rank calls it), so `save_adapter` writes the same PEFT files as a single-process run.
- `save_shards` / `load_shards` write and read the trainable parameters and the optimizer state as
  sharded safetensors through `torch.distributed.checkpoint` (`HuggingFaceStorageWriter`: each
  rank writes its own rows, with their offsets in the file's JSON header; no pickle). Loading
  reshards, so a checkpoint written by N ranks loads on M ranks or in one process.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.errors import ConfigError, TrainingError
from lorakit.train.blocks import decoder_blocks

__all__ = [
    "SHARDS_DIR",
    "gathered",
    "is_sharded",
    "load_shards",
    "load_whole",
    "save_shards",
    "shard",
    "shard_units",
]

logger = logging.getLogger("lorakit.train")

SHARDS_DIR = "shards"
_MODEL, _OPTIM = "model.", "optim."


def is_sharded(model: nn.Module) -> bool:
    """True when `model` has been sharded by `shard` (its root is an FSDP2 module)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(model, FSDPModule)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules that become their own FSDP unit: the decoder blocks (`blocks.decoder_blocks`),
    outermost first. Empty when the model has none: then the root is the only unit."""
    return decoder_blocks(model)


def shard(
    model: nn.Module,
    *,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
    mesh: Any = None,
) -> nn.Module:
    """Shard `model` in place with FSDP2 over every rank of the default process group.

    Each decoder block (`shard_units`) is its own unit, then the root. Frozen and trainable
    parameters are both sharded; gradients are reduced with sums (see the module docstring).
    Build the optimizer after this call: it must hold the sharded parameters.

    Args:
        model: a model on its device (CPU, or this rank's GPU), adapters already injected.
        reshard_after_forward: free each block's gathered parameters after its forward and gather
            them again for the backward (less memory, one more all-gather per block); False keeps
            them from the forward to the backward.
        cpu_offload: keep the sharded parameters, gradients and optimizer state in CPU memory and
            copy each block to the GPU for its forward and backward (CUDA only).
        mesh: a 1-D `DeviceMesh` (default: every rank, on the model's device type; gloo on CPU,
            NCCL on CUDA).

    Returns:
        The same model object, now an FSDP module.

    Raises:
        ConfigError: no process group, a model that is already sharded, CPU offload of a model
            that is on the CPU already, or a base stored as NF4 (not supported by this path).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(
            "shard needs a process group: run under torchrun (or call torch.distributed.init_process_group)"
        )
    if is_sharded(model):
        raise ConfigError("the model is already sharded")
    device = next(model.parameters()).device
    if cpu_offload and device.type != "cuda":
        raise ConfigError(
            f"cpu_offload moves a GPU model's shards to CPU memory between uses; this model is on {device.type}, "
            "where its shards are in CPU memory already: drop cpu_offload"
        )
    nf4 = [(name, p) for name, p in model.named_parameters() if _is_nf4(p)]
    if nf4:
        name, weight = nf4[0]
        factors = getattr(weight.data, "quantization_factor", None)
        detail = f"; {name} has {factors.numel()} double-quantization factors" if factors is not None else ""
        raise ConfigError(
            f"FSDP over an NF4 base is not supported ({len(nf4)} NF4 weights): torchao's NF4Tensor can be split "
            "over N ranks only when its codes, block scales and double-quantization factors each divide by N, "
            f"which lorakit's block sizes do not arrange{detail}. Use strategy='ddp' for an NF4 base, or a bf16 "
            "base (quantize='bf16') with FSDP"
        )
    if mesh is None:
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    options: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    units = shard_units(model)
    for unit in units:
        fully_shard(unit, **options)
    fully_shard(model, **options)
    for module in [*units, model]:
        module.set_force_sum_reduction_for_comms(True)
    logger.info("FSDP: %d blocks + the root sharded over %d ranks", len(units), dist.get_world_size())
    return model


def _is_nf4(tensor: torch.Tensor) -> bool:
    data = tensor.data if isinstance(tensor, nn.Parameter) else tensor
    return type(data).__name__ == "NF4Tensor"


def _is_dtensor(tensor: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


@contextlib.contextmanager
def gathered(model: nn.Module, *, frozen: bool = False) -> Iterator[None]:
    """Inside, every trainable parameter of a sharded `model` is a whole plain tensor (on every rank).

    A collective: every rank must enter it. `frozen=True` gathers the frozen ones too (to save a
    whole model). On leaving, the sharded parameters are put back
    untouched (the whole copies are read-only snapshots: nothing written to them is kept). A model
    that is not sharded is left as it is.
    """
    if not is_sharded(model):
        yield
        return
    swapped = []
    wholes: dict[int, nn.Parameter] = {}  # a tied parameter (registered twice) is gathered once
    for name, param in model.named_parameters(remove_duplicate=False):
        if _is_dtensor(param) and (param.requires_grad or frozen):
            if id(param) not in wholes:
                wholes[id(param)] = nn.Parameter(param.detach().full_tensor(), requires_grad=False)
            owner_path, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_path) if owner_path else model
            swapped.append((owner, leaf, param))
            owner._parameters[leaf] = wholes[id(param)]
    try:
        yield
    finally:
        for owner, leaf, param in swapped:
            owner._parameters[leaf] = param


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The trainable parameters (by name) and the optimizer's state (flat, by parameter name)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(ignore_frozen_params=True, flatten_optimizer_state_dict=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    # A frozen weight tied to another (a tied output head) still comes back: keep the trainable only.
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    return {k: v for k, v in model_sd.items() if k in trainable}, optim_sd


def _split(optim_sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors, and the rest as JSON values. `param_names` (each group's list, repeated for each of
    its parameters) is left out: it is the optimizer's own, rebuilt on load."""
    tensors = {k: v for k, v in optim_sd.items() if isinstance(v, torch.Tensor)}
    plain = {
        k: (list(v) if isinstance(v, tuple) else v)
        for k, v in optim_sd.items()
        if k not in tensors and not k.endswith(".param_names")
    }
    return tensors, plain


def save_shards(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Write this rank's rows of the trainable parameters and optimizer state to `directory/shards`.

    A collective (every rank calls it with the same directory, on one file system). Each rank
    writes one safetensors file of its own rows; the files are fsynced. Also works on a model that
    is not sharded (every tensor is then written whole by one rank).

    Returns:
        The optimizer's non-tensor state (learning rates, betas, ... by parameter name), the same
        on every rank, for the caller to keep in the checkpoint's JSON.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    model_sd, optim_sd = _state_dicts(model, optimizer)
    optim_tensors, plain = _split(optim_sd)
    state = {**{_MODEL + k: v for k, v in model_sd.items()}, **{_OPTIM + k: v for k, v in optim_tensors.items()}}
    distributed = dist.is_available() and dist.is_initialized()
    writer = HuggingFaceStorageWriter(str(directory / SHARDS_DIR), save_distributed=distributed)
    dcp.save(state, storage_writer=writer)
    return plain


def load_shards(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, plain: dict[str, Any]) -> None:
    """Read `directory/shards` (written by `save_shards` on any number of ranks) into this rank's rows.

    A collective under a process group. Every name the model and optimizer need is checked against
    the files before anything is copied.

    Args:
        directory: the checkpoint directory.
        model: the model (sharded or not) with the same adapter as the run that wrote it.
        optimizer: built on that model with the same config.
        plain: the optimizer's non-tensor state that `save_shards` returned.

    Raises:
        TrainingError: missing or unreadable shards, or other trainable parameters than the model's.
    """
    import torch.distributed.checkpoint as dcp
    from safetensors import SafetensorError
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    folder = directory / SHARDS_DIR
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        raise TrainingError(f"{folder}: no sharded state (the checkpoint is incomplete or not an FSDP checkpoint)")
    model_sd, optim_sd = _state_dicts(model, optimizer)
    optim_tensors, _ = _split(optim_sd)
    names = {k: v for k, v in optim_sd.items() if k.endswith(".param_names")}
    state = {**{_MODEL + k: v for k, v in model_sd.items()}, **{_OPTIM + k: v for k, v in optim_tensors.items()}}
    reader = HuggingFaceStorageReader(str(folder))
    try:
        saved = set(reader.read_metadata().state_dict_metadata)
    except (OSError, SafetensorError, ValueError, KeyError) as err:
        raise TrainingError(f"{folder}: cannot read the sharded state ({err})") from None
    wanted = set(state)
    if saved != wanted:
        missing, extra = sorted(wanted - saved), sorted(saved - wanted)
        raise TrainingError(
            f"{folder}: the checkpoint is for other trainable parameters than this model has "
            f"(not in the checkpoint: {missing[:5]}; only in the checkpoint: {extra[:5]}); "
            "inject the same adapter config as the run that wrote it"
        )
    try:
        dcp.load(state, storage_reader=HuggingFaceStorageReader(str(folder)))
    except (OSError, SafetensorError, ValueError, RuntimeError, AssertionError) as err:
        raise TrainingError(f"{folder}: cannot load the sharded state ({err})") from None
    loaded_model = {k[len(_MODEL) :]: v for k, v in state.items() if k.startswith(_MODEL)}
    loaded_optim = {k[len(_OPTIM) :]: v for k, v in state.items() if k.startswith(_OPTIM)}
    for key, value in plain.items():
        loaded_optim[key] = tuple(value) if key.endswith(".betas") else value
    loaded_optim.update(names)
    options = StateDictOptions(ignore_frozen_params=True, flatten_optimizer_state_dict=True, strict=False)
    set_state_dict(model, optimizer, model_state_dict=loaded_model, optim_state_dict=loaded_optim, options=options)


def load_whole(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    params: dict[str, torch.Tensor],
    state: dict[int, dict[str, Any]],
    groups: list[dict[str, Any]],
) -> None:
    """Whole tensors (a checkpoint of an unsharded run) into a sharded model and its optimizer.

    A collective. Every rank reads the whole tensors and keeps its own rows.

    Args:
        model: the sharded model.
        optimizer: built on it by `build_optimizer` (its groups carry `param_names`).
        params: every trainable parameter, whole, by name.
        state: the optimizer's per-parameter state, by index as `Optimizer.state_dict` numbers them.
        groups: the optimizer's parameter groups as saved (with `param_names`).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    from torch.distributed.tensor import distribute_tensor

    names = [name for group in groups for name in group["param_names"]]
    flat: dict[str, Any] = {}
    for index, entries in state.items():
        for key, value in entries.items():
            flat[f"state.{names[index]}.{key}"] = value
    for group in groups:
        for name in group["param_names"]:
            for key, value in group.items():
                if key != "params":
                    flat[f"param_groups.{name}.{key}"] = tuple(value) if key == "betas" else value

    def rows_of(template: Any, whole: Any) -> Any:  # this rank's rows, cut from the whole tensor here
        if _is_dtensor(template):
            whole = whole.to(template.dtype)
            return distribute_tensor(whole, template.device_mesh, template.placements, src_data_rank=None)
        return whole.to(template.dtype) if isinstance(template, torch.Tensor) else whole

    model_sd, optim_sd = _state_dicts(model, optimizer)
    loaded_model = {k: rows_of(t, params[k]) for k, t in model_sd.items()}
    loaded_optim = {k: rows_of(t, flat[k]) if k in flat else t for k, t in optim_sd.items()}
    options = StateDictOptions(ignore_frozen_params=True, flatten_optimizer_state_dict=True, strict=False)
    set_state_dict(model, optimizer, model_state_dict=loaded_model, optim_state_dict=loaded_optim, options=options)
