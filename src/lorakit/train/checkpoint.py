"""Durable training checkpoints: `out_dir/checkpoints/step-N/`, written atomically, no pickle.

A checkpoint directory holds

- `adapter_config.json`, `adapter_model.safetensors`: the adapter in PEFT's format
  (`lorakit.save_adapter`), loadable on its own by lorakit or PEFT (not for a model trained
  without a lorakit adapter: its trainable parameters are all in the trainer state);
- `trainer_state.safetensors`: every tensor needed to resume — the trainable parameters exactly
  as they are in memory (`param.<name>`), the optimizer's state (`optimizer.<index>.<key>`), each
  rank's torch RNG state as uint8 (`rng.torch.<rank>`, `rng.cuda.<rank>`);
- `trainer_state.json`: everything else — step, data position (epoch, batch within the epoch),
  config, optimizer param groups and non-tensor state, scheduler state, python/numpy RNG state,
  loss and eval history;
- under FSDP (`strategy="fsdp"`), `shards/`: one safetensors file per rank with that rank's rows
  of the trainable parameters and of the optimizer state (`lorakit.train.sharding`); then
  `trainer_state.safetensors` holds only the RNG states. Such a checkpoint resumes on any number
  of ranks, or in one process; the adapter files beside it are whole (gathered to rank 0);
- `manifest.json`, written last: every other file's size and SHA-256.

The directory is built by `lorakit.atomic.build_directory` (a temporary `checkpoints/.step-N.tmp-*`,
every file fsynced, renamed to `step-N`, the parent fsynced), so a kill at any moment leaves
either no `step-N` or a complete one (under FSDP each rank writes its shard into
`checkpoints/.step-N.staging` first, and rank 0 moves it into the temporary directory).
Temporary leftovers are ignored and removed on the next run (`remove_partial`).

What happens to a checkpoint after it is written — a file cut short or edited, one deleted — the
manifest shows: `verify` checks every file against it, and `resumable` (what a resume starts from)
takes the newest checkpoint that verifies, moves each newer one aside as `step-N.incomplete` with a
warning naming the file and what is wrong, and raises `CheckpointError` listing them all when none
does. A checkpoint written before lorakit kept manifests (trainer state version 1) has none: it is
taken as complete, with a warning that its files were not verified; a version-2 one without its
manifest is incomplete.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save
from torch import nn

from lorakit import atomic
from lorakit.atomic import build_directory
from lorakit.errors import CheckpointError, TrainingError
from lorakit.io import save_adapter
from lorakit.state import adapter_owner
from lorakit.train.distributed import DistInfo, all_gather_bytes, barrier
from lorakit.train.sharding import SHARDS_DIR, gathered, is_sharded, load_shards, load_whole, save_shards

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy comes with torch in practice
    np = None  # type: ignore[assignment]

__all__ = [
    "CHECKPOINTS_DIR",
    "MANIFEST",
    "STATE_JSON",
    "STATE_TENSORS",
    "TrainerState",
    "Verdict",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "read_trainer_state",
    "resumable",
    "save_checkpoint",
    "verify",
]

CHECKPOINTS_DIR = "checkpoints"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
MANIFEST = "manifest.json"
FORMAT = "lorakit-trainer-state"
MANIFEST_FORMAT = "lorakit-checkpoint-manifest"
VERSION = 2  # 2: the checkpoint carries a manifest
_STEP_DIR = re.compile(r"step-(\d+)")

TrainerState = dict[str, Any]
"""The JSON part of a checkpoint (see the module docstring)."""


def list_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Checkpoints of a run, oldest first, as (step, directory), without verifying them (`resumable`
    does).

    A directory counts when it is named `step-N` and holds `trainer_state.json` or `manifest.json`;
    the temporary directories of an interrupted write never count.
    """
    root = Path(out_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.fullmatch(path.name)
        if match and path.is_dir() and ((path / STATE_JSON).is_file() or (path / MANIFEST).is_file()):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint with the highest step (not verified: see `resumable`), or None if there is none."""
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def remove_partial(out_dir: Path) -> list[str]:
    """Clear what a killed write left: in `checkpoints/`, the temporary directories of a checkpoint
    (`.step-N.tmp-*`, an FSDP `.step-N.staging`; a `.step-N.old-*` moved aside to be replaced is put
    back if its replacement never arrived); in `out_dir`, those of the adapter, model and files
    (`lorakit.atomic.clean_leftovers`).

    Returns:
        What was done, one entry per leftover.
    """
    done = [f"{out_dir.name}/{entry}" for entry in atomic.clean_leftovers(out_dir)]
    root = out_dir / CHECKPOINTS_DIR
    done += [f"{CHECKPOINTS_DIR}/{entry}" for entry in atomic.clean_leftovers(root)]
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(".") and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                done.append(f"{CHECKPOINTS_DIR}/removed {path.name}")
    return done


# ---------------------------------------------------------------------------------------- verify
@dataclass(frozen=True)
class Verdict:
    """What `verify` found in a checkpoint.

    Attributes:
        complete: every file is there with the size and SHA-256 its manifest lists (or the
            checkpoint predates manifests).
        problem: why it is incomplete (a file and what is wrong with it); for a complete
            checkpoint without a manifest, that it could not be verified; else None.
    """

    complete: bool
    problem: str | None = None


def verify(path: Path) -> Verdict:
    """Check checkpoint `path` against its `manifest.json` (reads and hashes every file)."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        try:
            version = read_trainer_state(path).get("version")
        except TrainingError as err:
            return Verdict(False, f"{MANIFEST} is missing and {err}")
        if version == 1:
            return Verdict(True, f"written before lorakit kept checkpoint manifests ({MANIFEST}): not verified")
        return Verdict(False, f"{MANIFEST} is missing")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError("not a lorakit checkpoint manifest")
        listed = {name: (int(entry["size"]), str(entry["sha256"])) for name, entry in files.items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        return Verdict(False, f"{MANIFEST} is unreadable ({err})")
    for name, (size, digest) in sorted(listed.items()):
        file = path / name
        if not file.is_file():
            return Verdict(False, f"{name} is missing")
        actual = file.stat().st_size
        if actual != size:
            return Verdict(False, f"{name} is {actual:,} bytes, the manifest says {size:,}")
        if _sha256(file) != digest:
            return Verdict(False, f"{name} does not match its checksum in the manifest (edited or damaged)")
    return Verdict(True)


def resumable(out_dir: str | os.PathLike, *, set_aside: bool = False, warn: bool = True) -> Path | None:
    """The newest checkpoint of `out_dir` that `verify` finds complete: where a resume starts.

    Args:
        out_dir: the run's output directory.
        set_aside: rename each newer, incomplete checkpoint to `step-N.incomplete` (kept for a
            look, never resumed from or pruned); one process does this (rank 0).
        warn: warn about each checkpoint skipped (naming the file and what is wrong) and about a
            checkpoint taken unverified (written before manifests).

    Returns:
        The checkpoint, or None when `out_dir` holds none.

    Raises:
        CheckpointError: checkpoints exist but none is complete (each named with its problem);
            nothing is moved then.
    """
    found = list_checkpoints(out_dir)
    skipped: list[tuple[Path, str]] = []
    chosen: tuple[Path, Verdict] | None = None
    for _, path in reversed(found):
        verdict = verify(path)
        if verdict.complete:
            chosen = (path, verdict)
            break
        skipped.append((path, verdict.problem or "incomplete"))
    if found and chosen is None:
        listed = "; ".join(f"{path.name}: {problem}" for path, problem in skipped)
        raise CheckpointError(
            f"cannot resume {out_dir}: no checkpoint is complete ({listed}); "
            "start the run again (without resume, after removing or overwriting its checkpoints)"
        )
    if chosen is None:
        return None
    path, verdict = chosen
    for bad, problem in skipped:
        moved = ""
        if set_aside:
            moved = f"; moved to {CHECKPOINTS_DIR}/{_set_aside(bad).name}"
        if warn:
            warnings.warn(
                f"checkpoint {bad} is incomplete: {problem}; resuming from {path.name} instead{moved}", stacklevel=2
            )
    if warn and verdict.problem:
        warnings.warn(f"checkpoint {path} was {verdict.problem}", stacklevel=2)
    return path


def _set_aside(path: Path) -> Path:
    """Rename an incomplete checkpoint `step-N` to `step-N.incomplete` (or `.incomplete-2`, ...)."""
    for n in range(1, 1000):
        target = path.with_name(f"{path.name}.incomplete" + (f"-{n}" if n > 1 else ""))
        if not target.exists():
            os.rename(path, target)
            return target
    raise CheckpointError(f"cannot set {path} aside: too many incomplete copies beside it")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest(folder: Path, step: int) -> dict[str, Any]:
    """Every file under `folder` (but the manifest) with its size and SHA-256."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    return {"format": MANIFEST_FORMAT, "version": 1, "step": step, "files": files}


# ---------------------------------------------------------------------------------------- save
def save_checkpoint(
    out_dir: Path,
    state: TrainerState,
    *,
    model: nn.Module,
    adapter_name: str | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    keep: int | None,
    info: DistInfo,
) -> Path:
    """Write `checkpoints/step-<state["step"]>` atomically; call on every rank (rank 0 writes).

    Args:
        out_dir: the run's output directory.
        state: step, data position, config and history (JSON-ready); RNG, optimizer and
            scheduler state are added here.
        model: the model (not a DDP wrapper).
        adapter_name: the adapter to save, or None for a model without a lorakit adapter.
        optimizer: its state goes to safetensors (tensors) and JSON (the rest).
        scheduler: its state dict (numbers only) goes to JSON.
        keep: keep only the newest this many checkpoints (None: all).
        info: rank and world size; every rank's RNG state is gathered to rank 0.

    Returns:
        The checkpoint directory.
    """
    step = int(state["step"])
    final = out_dir / CHECKPOINTS_DIR / f"step-{step}"
    sharded = is_sharded(model)
    staging = out_dir / CHECKPOINTS_DIR / f".step-{step}.staging"  # a dot name: remove_partial cleans it
    plain_opt: dict[str, Any] = {}
    if sharded:
        # Collective: each rank writes its rows of the trainable parameters and optimizer state;
        # rank 0 moves the finished shards into the checkpoint it builds below.
        if info.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        barrier(info)
        plain_opt = save_shards(staging, model, optimizer)
        barrier(info)
    tensors: dict[str, torch.Tensor] = {}
    # Collective: every rank's RNG state, gathered before rank 0 writes.
    for rank, rng in enumerate(all_gather_bytes(torch.get_rng_state(), info)):
        tensors[f"rng.torch.{rank}"] = rng
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for rank, rng in enumerate(all_gather_bytes(torch.cuda.get_rng_state(), info)):
            tensors[f"rng.cuda.{rank}"] = rng
    with gathered(model):  # FSDP: the whole adapter for its files (a collective)
        if info.is_main:
            full = {
                "format": FORMAT,
                "version": VERSION,
                **state,
                "world_size": info.world_size,
                "adapter_name": adapter_name,
                "optimizer": _optimizer_state(model, optimizer, tensors, plain_opt if sharded else None),
                "scheduler": scheduler.state_dict(),
                "rng": _host_rng_state(),
            }
            text = json.dumps(full, indent=1, sort_keys=True) + "\n"
            payload = safetensors_save(
                {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, {"format": "pt"}
            )

            def build(tmp: Path) -> None:
                if sharded:
                    os.rename(staging / SHARDS_DIR, tmp / SHARDS_DIR)
                    staging.rmdir()
                if adapter_name is not None:
                    save_adapter(adapter_owner(model), tmp, adapter_name)
                atomic.write_bytes(tmp / STATE_TENSORS, payload)
                atomic.write_text(tmp / STATE_JSON, text)
                atomic.write_json(tmp / MANIFEST, _manifest(tmp, step), indent=1)  # last

            # The same step saved twice (Ctrl-C right after a periodic save) replaces the first.
            build_directory(final, build, replace=True)
            if keep is not None:
                for _, old in list_checkpoints(out_dir)[:-keep]:
                    atomic.remove_directory(old)  # a kill leaves it whole or gone
    barrier(info)
    return final


def _optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], sharded: dict | None
) -> dict[str, Any]:
    """The checkpoint's optimizer JSON; the trainable parameters and optimizer tensors go into
    `tensors`. Under FSDP (`sharded`: the optimizer's non-tensor state from `save_shards`) both are
    in the shards instead."""
    if sharded is not None:
        return {"sharded": SHARDS_DIR, "plain": sharded}
    for name, param in model.named_parameters():
        if param.requires_grad:
            tensors[f"param.{name}"] = param.detach()
    opt_state = optimizer.state_dict()
    json_opt: dict[str, Any] = {"param_groups": opt_state["param_groups"], "state": {}}
    for index, entries in opt_state["state"].items():
        plain = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                plain[key] = value
        json_opt["state"][str(index)] = plain
    return json_opt


def _host_rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    out: dict[str, Any] = {"python": [version, list(internal), gauss]}
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        out["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    return out


# ---------------------------------------------------------------------------------------- load
def read_trainer_state(path: Path) -> TrainerState:
    """The JSON part of checkpoint `path` (step, position, config, history), without touching tensors.

    Raises:
        TrainingError: missing, unreadable or not a lorakit trainer state.
    """
    json_path = path / STATE_JSON
    try:
        state = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TrainingError(f"{json_path}: cannot read the trainer state ({err})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise TrainingError(f"{json_path}: not a lorakit trainer state")
    return state


def load_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    info: DistInfo,
) -> TrainerState:
    """Restore a checkpoint into a model, optimizer, scheduler and this process's RNGs.

    The trainable parameters are copied in place from their exact saved values (so the optimizer,
    which holds the same Parameter objects, keeps pointing at them). Every name and shape is
    checked before anything is copied.

    Args:
        path: a `step-N` directory.
        model: the model with the same adapter injected (not a DDP wrapper).
        optimizer: built by `build_optimizer` on that model with the same config.
        scheduler: built by `build_scheduler`.
        info: this rank; its own saved RNG state is restored when the world size matches.

    Returns:
        The JSON state (step, epoch, batch, config, history ...).

    Raises:
        TrainingError: missing or unreadable files, a pickle, or a checkpoint of other parameters.
    """
    json_path, tensor_path = path / STATE_JSON, path / STATE_TENSORS
    state = read_trainer_state(path)
    sharded = isinstance(state.get("optimizer"), dict) and "sharded" in state["optimizer"]
    try:
        with open(tensor_path, "rb") as f:
            magic = f.read(2)
        if magic[:1] == b"\x80" or magic == b"PK":
            raise TrainingError(f"{tensor_path}: a pickle/zip file, not safetensors; lorakit never unpickles")
        with safe_open(tensor_path, framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (OSError, SafetensorError, ValueError) as err:
        raise TrainingError(f"{tensor_path}: cannot read the trainer state ({err})") from None

    if sharded:  # the parameters and optimizer state are in the shards, on any number of ranks
        load_shards(path, model, optimizer, state["optimizer"]["plain"])
        scheduler.load_state_dict(state["scheduler"])
        _restore_rng(state, tensors, info)
        return state
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    saved = {k[len("param.") :] for k in tensors if k.startswith("param.")}
    if saved != set(params):
        missing, extra = sorted(set(params) - saved), sorted(saved - set(params))
        raise TrainingError(
            f"{tensor_path}: the checkpoint is for other trainable parameters than this model has "
            f"(not in the checkpoint: {missing[:5]}; only in the checkpoint: {extra[:5]}); "
            "inject the same adapter config as the run that wrote it"
        )
    for name, param in params.items():
        if tuple(tensors[f"param.{name}"].shape) != tuple(param.shape):
            raise TrainingError(
                f"{tensor_path}: param.{name} has shape {list(tensors[f'param.{name}'].shape)}, "
                f"the model's is {list(param.shape)}"
            )
    groups = state["optimizer"]["param_groups"]
    now_names = [g.get("param_names") for g in optimizer.param_groups]
    if [g.get("param_names") for g in groups] != now_names:
        raise TrainingError(
            f"{json_path}: the optimizer's parameter groups differ from the checkpoint's "
            "(another LoRA+ ratio or other trainable parameters?)"
        )

    opt_state: dict[int, dict[str, Any]] = {}
    for index, plain in state["optimizer"]["state"].items():
        opt_state[int(index)] = dict(plain)
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            opt_state.setdefault(int(index), {})[name] = value
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    if is_sharded(model):  # a checkpoint of an unsharded run: each rank keeps its rows of every tensor
        load_whole(model, optimizer, {n: tensors[f"param.{n}"] for n in params}, opt_state, groups)
    else:
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(tensors[f"param.{name}"])
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    scheduler.load_state_dict(state["scheduler"])
    _restore_rng(state, tensors, info)
    return state


def _restore_rng(state: TrainerState, tensors: dict[str, torch.Tensor], info: DistInfo) -> None:
    same_world = state.get("world_size") == info.world_size
    key = f"rng.torch.{info.rank if same_world else 0}"
    if key in tensors:
        torch.set_rng_state(tensors[key])
    cuda_key = f"rng.cuda.{info.rank if same_world else 0}"
    if cuda_key in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors[cuda_key])
    rng = state.get("rng", {})
    if "python" in rng:
        version, internal, gauss = rng["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in rng and np is not None:
        name, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
