"""`lorakit serve`: load the base model and adapters, start the engine, run uvicorn."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from lorakit.errors import ConfigError
from lorakit.extras import require
from lorakit.io import adapter_base_quantization, check_adapter_files
from lorakit.layers import BASE
from lorakit.models import DEFAULT_MODEL, ModelSource, adapter_directory, load_model
from lorakit.serve.engine import Engine
from lorakit.serve.metrics import ServeMetrics
from lorakit.serve.registry import AdapterRegistry

if TYPE_CHECKING:
    from lorakit.serve.api import ServerState

__all__ = ["ServeConfig", "build_server", "serve"]


@dataclass
class ServeConfig:
    """How `lorakit serve` runs.

    Args:
        adapter: adapters to load at start, `name=folder` (an adapter folder or a training run's
            output directory); repeat the flag or separate pairs with commas.
        host: the address to listen on.
        port: the port to listen on.
        adapter_dir: the folder `POST /v1/load_lora_adapter` may load from (paths are resolved
            inside it; nothing outside it is read); omit to refuse loading over HTTP.
        max_batch: requests decoded together at most (rows of one batch).
        max_adapters: adapters loaded at most (at start and over HTTP together).
        max_queue: requests waiting for a row at most; beyond it requests get 429 with Retry-After.
        max_model_len: prompt plus completion tokens at most (default: the model's context length,
            `max_position_embeddings`: 8192 for SmolLM2). A longer prompt, or a `max_tokens` that
            does not fit after the prompt, is a 400 naming both lengths (never clamped).
        default_max_tokens: `max_tokens` of a request that gives none (default: OpenAI's, 16 for
            completions and the rest of the context for chat).
        api_key_env: name of an environment variable holding the API key that `/v1/` requests must
            send as `Authorization: Bearer KEY` (omit for no key).
        batching: `mixed` (one batch holds rows of different adapters) or `per_adapter` (one
            adapter's requests at a time: the switching baseline, for benchmarks).
        max_request_bytes: the largest request body accepted, in bytes; a larger one gets 413
            without being read (default: 8388608, 8 MiB).
        shutdown_timeout: seconds SIGTERM (or Ctrl-C) waits for running requests to finish before
            it cancels them (503); new connections are refused at once. After SIGTERM the process
            exits 0 (after Ctrl-C, 130 as any interrupted command).
        threads: torch CPU threads (default: torch's).
        log_level: uvicorn's log level.
    """

    adapter: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8000
    adapter_dir: str | None = None
    max_batch: int = 8
    max_adapters: int = 16
    max_queue: int = 64
    max_model_len: int | None = None
    default_max_tokens: int | None = None
    api_key_env: str | None = None
    batching: Literal["mixed", "per_adapter"] = "mixed"
    max_request_bytes: int = 8 * 1024 * 1024
    shutdown_timeout: float = 30.0
    threads: int | None = None
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    def __post_init__(self) -> None:
        problems = []
        for name in ("max_batch", "max_adapters", "max_queue", "max_request_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("max_model_len", "default_max_tokens", "threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                problems.append(f"{name} must be an integer >= 1 or none, got {value!r}")
        if isinstance(self.shutdown_timeout, bool) or not (
            isinstance(self.shutdown_timeout, int | float) and self.shutdown_timeout >= 0
        ):
            problems.append(f"shutdown_timeout must be a number of seconds >= 0, got {self.shutdown_timeout!r}")
        if not 0 <= self.port <= 65535:
            problems.append(f"port must be in 0..65535, got {self.port}")
        for name in self.adapter:
            if not name or "." in name or name == BASE:
                problems.append(f"adapter name {name!r}: a name is non-empty, without dots, not {BASE!r}")
        if len(self.adapter) > self.max_adapters:
            problems.append(f"{len(self.adapter)} adapters given but max_adapters is {self.max_adapters}")
        if self.adapter_dir is not None and not Path(self.adapter_dir).is_dir():
            problems.append(f"adapter_dir {self.adapter_dir!r} is not a folder")
        if self.api_key_env is not None and not os.environ.get(self.api_key_env):
            problems.append(f"api_key_env: the environment variable {self.api_key_env} is not set (or empty)")
        if problems:
            raise ConfigError("invalid ServeConfig:\n" + "\n".join(f"  - {p}" for p in problems))


def build_server(config: ServeConfig, source: ModelSource) -> tuple[Any, ServerState]:
    """Load the model and the start-up adapters, start the engine; return `(app, state)`.

    `source.quantize == "auto"` stores the base as the start-up adapters were trained (NF4 or bf16
    when they all record the same), else in full precision.

    Raises:
        ConfigError: invalid settings. AdapterFormatError, ShapeMismatchError: an unreadable adapter
            or one made for another model (nothing is served then).
    """
    require("fastapi", "serve", "lorakit serve")
    require("uvicorn", "serve", "lorakit serve")
    from lorakit.serve.api import ServerState, create_app  # pydantic and FastAPI: only when serving

    if config.threads:
        torch.set_num_threads(config.threads)
    folders = {name: adapter_directory(path) for name, path in config.adapter.items()}
    for folder in folders.values():
        check_adapter_files(folder)  # a bad start-up adapter is refused before the model loads
    if source.quantize == "auto":
        recorded = {adapter_base_quantization(f) for f in folders.values()}
        scheme = recorded.pop() if len(recorded) == 1 else None
    else:
        scheme = None if source.quantize == "none" else source.quantize
    model, tokenizer, name = load_model(source.model, quantize=scheme)
    model.eval()
    metrics = ServeMetrics()
    engine = Engine(
        model,
        tokenizer,
        max_batch=config.max_batch,
        max_queue=config.max_queue,
        batching=config.batching,
        metrics=metrics,
    ).start()
    registry = AdapterRegistry(
        engine,
        base_names=[name, source.model or DEFAULT_MODEL],
        adapter_dir=Path(config.adapter_dir) if config.adapter_dir else None,
        max_adapters=config.max_adapters,
    )
    try:
        for adapter_name, folder in folders.items():
            registry.load(adapter_name, folder).result()
    except Exception:
        engine.close()
        raise
    metrics.adapters.set(len(folders))
    context = config.max_model_len or getattr(model.config, "max_position_embeddings", None) or 2048
    state = ServerState(
        engine=engine,
        registry=registry,
        tokenizer=tokenizer,
        metrics=metrics,
        max_model_len=int(context),
        default_max_tokens=config.default_max_tokens,
        api_key=os.environ[config.api_key_env] if config.api_key_env else None,
        max_request_bytes=config.max_request_bytes,
    )
    return create_app(state), state


def serve(config: ServeConfig, source: ModelSource, echo: Callable[[str], None] = print) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully and return.

    Shutting down: the listening socket closes at once (new connections are refused, and
    keep-alive connections close after their current response); requests already received keep
    running — streams included, the engine keeps stepping — for up to `shutdown_timeout` seconds;
    then the engine cancels what is left (a stream ends with a 503 error event and `[DONE]`, a
    collected request gets a 503), the connections close and the process exits. uvicorn would
    cancel the HTTP tasks themselves a little later (`_BACKSTOP_S`), which it logs as a traceback;
    the engine's cancellation ends them first. After a graceful shutdown uvicorn raises the signal
    it caught again, which would end the process with that signal's status; for SIGTERM the
    handler installed here turns that into a normal return, so `lorakit serve` exits 0 (SIGINT
    stays a KeyboardInterrupt: the CLI's 130).
    """
    import uvicorn

    app, state = build_server(config, source)
    adapters = ", ".join(e.name for e in state.registry.ready()) or "none"
    echo(f"serving {state.registry.base} (adapters: {adapters}) on http://{config.host}:{config.port}/v1")
    settings = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        timeout_graceful_shutdown=config.shutdown_timeout + _BACKSTOP_S,
    )
    previous = signal.signal(signal.SIGTERM, _after_graceful_shutdown)
    try:
        _graceful(uvicorn.Server, state.engine, config.shutdown_timeout)(settings).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        state.engine.close()


_BACKSTOP_S = 5.0  # uvicorn's own deadline, after the engine's


def _graceful(server_class: type, engine: Engine, grace: float) -> type:
    """uvicorn's `Server` whose shutdown closes `engine` once `grace` seconds have passed."""

    class GracefulServer(server_class):  # type: ignore[misc, valid-type]
        async def shutdown(self, sockets: Any = None) -> None:
            deadline = asyncio.get_running_loop().call_later(grace, engine.close, 0)
            try:
                await super().shutdown(sockets)
            finally:
                deadline.cancel()

    return GracefulServer


def _after_graceful_shutdown(signum: int, frame: Any) -> None:
    """SIGTERM outside uvicorn's own handler: uvicorn re-raising the signal it has already served."""
