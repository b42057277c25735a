"""Which `model` names the server answers to, and adapters loaded and unloaded while it runs.

An adapter is `loading`, `ready` or `unloading`. Only a ready adapter admits new requests, and each
request holds its adapter (`acquire` / `release`) until it finishes. Unloading first stops new
requests (they get a 404 that says the adapter is being unloaded), waits for the requests already
running on it to finish, and then deletes it on the engine's worker between two steps — so a
request always finishes on the adapter it started with, and never gets another adapter's output.
Loading reads the files and adds the adapter on the worker too; the name answers only once it is
complete.

Adapters loaded over HTTP must lie under `adapter_dir` (after resolving symlinks) and be PEFT
files (`adapter_config.json` + `adapter_model.safetensors`; `lorakit.load_adapter` never unpickles).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lorakit.adapters import delete_adapter
from lorakit.errors import LorakitError
from lorakit.io import load_adapter
from lorakit.layers import BASE
from lorakit.models import adapter_directory
from lorakit.serve.engine import Engine
from lorakit.serve.errors import BadRequest, UnknownModel

__all__ = ["AdapterRegistry", "Entry"]


@dataclass
class Entry:
    """One adapter the server knows."""

    name: str
    path: Path
    state: Literal["loading", "ready", "unloading"] = "loading"
    refs: int = 0
    created: int = field(default_factory=lambda: int(time.time()))
    drained: Future | None = None


class AdapterRegistry:
    """The base model's names and the adapters, with their reference counts.

    Args:
        engine: the engine whose model carries the adapters.
        base_names: the names that mean the base model (its id, and the alias it was loaded by).
        adapter_dir: the only folder `load` (over HTTP) may read from; None refuses HTTP loads.
        max_adapters: adapters loaded at most.
    """

    def __init__(self, engine: Engine, *, base_names: list[str], adapter_dir: Path | None, max_adapters: int) -> None:
        self.engine = engine
        self.base_names = list(dict.fromkeys(base_names))
        self.adapter_dir = adapter_dir.resolve() if adapter_dir is not None else None
        self.max_adapters = max_adapters
        self._entries: dict[str, Entry] = {}
        self._lock = threading.Lock()

    @property
    def base(self) -> str:
        """The base model's id (as `/v1/models` lists it)."""
        return self.base_names[0]

    def ready(self) -> list[Entry]:
        with self._lock:
            return [e for e in self._entries.values() if e.state == "ready"]

    # ------------------------------------------------------------------ requests
    def acquire(self, model: str) -> str:
        """The engine's adapter for `model` (`BASE` for the base), held until `release`.

        Raises:
            UnknownModel: not the base and no ready adapter of that name.
        """
        if model in self.base_names:
            return BASE
        with self._lock:
            entry = self._entries.get(model)
            if entry is not None and entry.state == "ready":
                entry.refs += 1
                return model
            known = [*self.base_names[:1], *(n for n, e in self._entries.items() if e.state == "ready")]
        if entry is not None and entry.state == "loading":
            raise UnknownModel(f"adapter {model!r} is still being loaded; try again when it is ready", param="model")
        if entry is not None:
            raise UnknownModel(f"adapter {model!r} is being unloaded and takes no new requests", param="model")
        raise UnknownModel(f"the model {model!r} does not exist; served models: {', '.join(known)}", param="model")

    def release(self, adapter: str) -> None:
        """A request on `adapter` (from `acquire`) finished."""
        if adapter == BASE:
            return
        with self._lock:
            entry = self._entries[adapter]
            entry.refs -= 1
            drained = entry.state == "unloading" and entry.refs == 0
        if drained:
            self._delete(entry)

    # ------------------------------------------------------------------ load / unload
    def resolve_path(self, path: str) -> Path:
        """The adapter folder `path` names, which must lie under `adapter_dir`.

        Raises:
            BadRequest: no adapter folder was configured, the path leaves it, or holds no adapter.
        """
        if self.adapter_dir is None:
            raise BadRequest(
                "loading adapters over HTTP is off: start the server with --adapter-dir DIR", param="lora_path"
            )
        candidate = Path(path)
        resolved = (candidate if candidate.is_absolute() else self.adapter_dir / candidate).resolve()
        if not resolved.is_relative_to(self.adapter_dir):
            raise BadRequest(f"lora_path {path!r} is outside the adapter folder {self.adapter_dir}", param="lora_path")
        folder = adapter_directory(resolved)
        if not (folder / "adapter_config.json").is_file():
            raise BadRequest(
                f"no PEFT adapter (adapter_config.json) in {path!r} under {self.adapter_dir}", param="lora_path"
            )
        return folder

    def load(self, name: str, folder: Path) -> Future:
        """Load the adapter in `folder` as `name` (on the engine's worker).

        Returns:
            A future that completes when `name` answers requests, or holds the error
            (`BadRequest` naming what is wrong with the files or the name).

        Raises:
            BadRequest: the name is taken or invalid, or `max_adapters` are loaded.
        """
        if not name or name in self.base_names or name == BASE:
            raise BadRequest(f"invalid adapter name {name!r}", param="lora_name")
        with self._lock:
            if name in self._entries:
                raise BadRequest(f"an adapter named {name!r} is already loaded", param="lora_name")
            if len(self._entries) >= self.max_adapters:
                raise BadRequest(
                    f"{len(self._entries)} adapters are loaded, the most this server holds (--max-adapters "
                    f"{self.max_adapters}); unload one first",
                    param="lora_name",
                )
            entry = self._entries[name] = Entry(name, folder)
        done: Future = Future()

        def run() -> None:
            load_adapter(self.engine.model, folder, adapter_name=name)
            self.engine.model.eval()  # the server only infers: no dropout, whatever the model's mode was

        def finished(f: Future) -> None:
            err = f.exception()
            with self._lock:
                if err is None:
                    entry.state = "ready"
                else:
                    del self._entries[name]
            if err is None:
                done.set_result(entry)
            elif isinstance(err, LorakitError | OSError | ValueError):
                done.set_exception(BadRequest(f"cannot load adapter {name!r} from {folder}: {err}", param="lora_path"))
            else:
                done.set_exception(err)

        self.engine.call(run).add_done_callback(finished)
        return done

    def unload(self, name: str) -> Future:
        """Stop admitting requests for `name`, and delete it once the running ones finished.

        Raises:
            UnknownModel: no ready adapter `name`.
        """
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.state != "ready":
                raise UnknownModel(
                    f"no adapter named {name!r} is loaded" + (f" (it is {entry.state})" if entry else ""),
                    param="lora_name",
                )
            entry.state = "unloading"
            entry.drained = Future()
            idle = entry.refs == 0
        if idle:
            self._delete(entry)
        return entry.drained

    def _delete(self, entry: Entry) -> None:
        def run() -> None:
            delete_adapter(self.engine.model, entry.name)

        def finished(f: Future) -> None:
            with self._lock:
                self._entries.pop(entry.name, None)
            assert entry.drained is not None
            err = f.exception()
            if err is None:
                entry.drained.set_result(entry)
            else:
                entry.drained.set_exception(err)

        self.engine.call(run).add_done_callback(finished)
