"""The serving engine: one worker thread owns the model and decodes many requests together.

Continuous batching across adapters. Each turn of the worker loop:

1. runs the commands queued for it (loading and deleting adapters happen here, between steps,
   so no forward ever sees a half-changed model);
2. admits waiting requests while the batch has free rows (`max_batch`): each is prefilled alone
   (batch 1, unpadded) and samples its first token, then its KV cache joins the batch
   (`KVBatch.join`);
3. runs one decode step for all rows together, each row with its own adapter or the base
   (`lorakit.adapter_per_row`, the per-row path of the layers: every adapter's A and B stacked
   once, each row's own columns selected, one product for the batch; a batch whose rows all use
   one adapter runs it as the active adapter), and each row samples its next token with its own
   generator;
4. drops the rows that finished (end of sequence, a stop string, `max_tokens`) or whose client
   went away, at once, so their slots go to waiting requests in the next turn.

`batching="per_adapter"` is the baseline S-LoRA compares against (PEFT's `set_adapter` way): the
batch holds one adapter's requests at a time, and requests for another adapter wait until it
drains. It exists for `benchmarks/serve.py`.

Greedy output of a request is what `lorakit generate` computes for its prompt and adapter: the
prefill is the same batch-1 forward, and in the batch each row attends only to its own cache
(padding is masked). Batched products can round differently from batch-1 ones in the last bits,
so a token could differ only where two logits tie to within float rounding.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from lorakit.adapters import active_adapters, adapter_per_row, disable_adapters, list_adapters, set_adapter
from lorakit.layers import BASE
from lorakit.serve.batch import KVBatch, layers_of
from lorakit.serve.errors import Overloaded, Unavailable
from lorakit.serve.text import SamplingParams, TextStream, make_generator, next_token

__all__ = ["Engine", "Event", "Job"]

log = logging.getLogger("lorakit.serve")

FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class Event:
    """What a request receives from the engine: new text, and at the end why it finished.

    Args:
        text: text generated since the last event (may be empty).
        finish_reason: None while running; `stop`, `length`, `cancelled` or `error` at the end.
        completion_tokens: tokens generated so far (the end-of-sequence token included).
        error: what went wrong, when `finish_reason` is `error`.
    """

    text: str = ""
    finish_reason: FinishReason | None = None
    completion_tokens: int = 0
    error: str | None = None


@dataclass(eq=False)
class Job:
    """One request inside the engine.

    Args:
        prompt: the prompt's token ids.
        adapter: the adapter name, or `BASE` for the base model alone.
        params: sampling parameters.
        emit: called (on the worker thread) with each `Event`; the last has a `finish_reason`.
        on_finish: called once when the job ends, however it ends (releases its adapter).
    """

    prompt: list[int]
    adapter: str
    params: SamplingParams
    emit: Callable[[Event], None]
    on_finish: Callable[[], None] | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    done: bool = False
    # decoding state, set when admitted
    stream: TextStream | None = None
    generator: torch.Generator | None = None
    last: int = 0
    length: int = 0

    def cancel(self) -> None:
        """Ask the engine to drop this job (its client went away); safe from any thread."""
        self.cancelled.set()


class Engine:
    """Owns the model; runs continuous batching on its own thread.

    Args:
        model: a causal LM, with lorakit adapters or none, in eval mode.
        tokenizer: its tokenizer.
        max_batch: rows decoded together at most.
        max_queue: requests waiting at most; `submit` beyond it raises `Overloaded`.
        batching: `mixed` (rows with different adapters in one batch) or `per_adapter` (the
            switching baseline: one adapter's requests at a time).
        eos_ids: tokens that end a completion (default: the tokenizer's and the model's
            generation config's end-of-sequence ids).
        metrics: receives step, first-token and finish observations (`ServeMetrics`), or None.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        batching: Literal["mixed", "per_adapter"] = "mixed",
        eos_ids: Iterable[int] | None = None,
        metrics: Any = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.batching = batching
        self.metrics = metrics
        self.device = next(model.parameters()).device
        self.eos_ids = frozenset(eos_ids if eos_ids is not None else _eos_ids(model, tokenizer))
        self._waiting: deque[Job] = deque()
        self._commands: deque[tuple[Callable[[], Any], Future]] = deque()
        self._rows: list[Job] = []
        self._batch = KVBatch(self.device)
        self._wake = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        # transformers 5 names the cache argument and output `cache`, earlier versions `past_key_values`
        accepted = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in accepted else "past_key_values"
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}

    # ------------------------------------------------------------------ control (any thread)
    def start(self) -> Engine:
        """Start the worker thread."""
        self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker: running and waiting jobs end with `cancelled`, new ones are refused.

        Waits up to `timeout` seconds for the worker to stop (0: do not wait, from the event loop).
        """
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closed

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._rows)

    def submit(self, job: Job) -> None:
        """Queue a job.

        Raises:
            Overloaded: `max_queue` jobs are already waiting.
            Unavailable: the engine is closed (the server is stopping).
        """
        with self._wake:
            if self._closed:
                raise Unavailable("the server is stopping and takes no new requests")
            if len(self._waiting) >= self.max_queue:
                raise Overloaded(f"the server is at capacity ({self.max_queue} requests waiting); retry shortly")
            self._waiting.append(job)
            if self.metrics is not None:
                self.metrics.observe_queued(len(self._waiting))
            self._wake.notify_all()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn()` on the worker between two steps; its result or exception goes to the future."""
        future: Future = Future()
        with self._wake:
            if self._closed:
                future.set_exception(RuntimeError("the engine is closed"))
                return future
            self._commands.append((fn, future))
            self._wake.notify_all()
        return future

    # ------------------------------------------------------------------ the worker
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._closed or self._commands or self._rows or self._waiting):
                    self._wake.wait()
                if self._closed:
                    break
                commands = list(self._commands)
                self._commands.clear()
            for fn, future in commands:  # outside inference mode: adapters load as ordinary tensors
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as err:  # handed to the caller, not raised here
                        future.set_exception(err)
            try:
                with torch.inference_mode():
                    self._admit()
                    if self._rows:
                        self._decode()
            except Exception as err:  # a failing forward ends its jobs, not the server
                log.exception("engine step failed")
                for job in self._rows:
                    self._finish(job, "error", error=f"generation failed: {type(err).__name__}: {err}")
                self._rows, self._batch = [], KVBatch(self.device)
            self._report()
        for job in [*self._rows, *self._waiting]:
            self._finish(job, "cancelled")
        for _, future in self._commands:
            future.cancel()

    def _next_jobs(self) -> list[Job]:
        """Pop the waiting jobs to admit now (cancelled ones are finished on the way)."""
        picked: list[Job] = []
        with self._wake:
            free = self.max_batch - len(self._rows)
            adapter = self._rows[0].adapter if self._rows else None
            kept: deque[Job] = deque()
            while self._waiting:
                job = self._waiting.popleft()
                if job.cancelled.is_set():
                    self._finish(job, "cancelled")
                elif len(picked) < free and (self.batching == "mixed" or adapter in (None, job.adapter)):
                    adapter = job.adapter
                    picked.append(job)
                else:
                    kept.append(job)
            self._waiting = kept
        return picked

    def _admit(self) -> None:
        for job in self._next_jobs():
            job.stream = TextStream(self.tokenizer, stop=job.params.stop)
            job.generator = make_generator(job.params.seed, self.device)
            try:
                ids = torch.tensor([job.prompt], dtype=torch.long, device=self.device)
                with self._route([job.adapter]):
                    out = self.model(input_ids=ids, use_cache=True, **self._last_only)
                cache = layers_of(self._cache_of(out))
            except Exception as err:
                log.exception("prefill failed")
                self._finish(job, "error", error=f"prefill failed: {type(err).__name__}: {err}")
                continue
            job.length = len(job.prompt)
            self._batch.join(cache)
            self._rows.append(job)
            self._accept(job, next_token(out.logits[0, -1], job.params, job.generator))
        self._sweep()

    def _decode(self) -> None:
        start = time.perf_counter()
        cache, mask = self._batch.step_inputs()
        ids = torch.tensor([[job.last] for job in self._rows], dtype=torch.long, device=self.device)
        positions = torch.tensor([[job.length] for job in self._rows], dtype=torch.long, device=self.device)
        with self._route([job.adapter for job in self._rows]):
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{self._cache_arg: cache},
                **self._last_only,
            )
        self._batch.advance(self._cache_of(out))
        logits = out.logits[:, -1]
        for row, job in enumerate(self._rows):
            job.length += 1
            self._accept(job, next_token(logits[row], job.params, job.generator))
        self.steps += 1
        if self.metrics is not None:
            self.metrics.observe_step(len(self._rows), self.max_batch, time.perf_counter() - start)
        self._sweep()

    def _accept(self, job: Job, token: int) -> None:
        """Record a row's new token; emit its text or finish it."""
        assert job.stream is not None
        if job.first_token is None:
            job.first_token = time.perf_counter()
            if self.metrics is not None:
                self.metrics.observe_first_token(job.first_token - job.submitted)
        job.last = token
        end = token in self.eos_ids and not job.params.ignore_eos
        piece = job.stream.add(token, special=end)
        if end or job.stream.stopped:
            self._finish(job, "stop", text=piece)
        elif len(job.stream.tokens) >= job.params.max_tokens:
            self._finish(job, "length", text=piece + job.stream.flush())
        elif piece:
            job.emit(Event(text=piece, completion_tokens=len(job.stream.tokens)))

    def _sweep(self) -> None:
        """Drop finished and cancelled rows from the batch."""
        for job in self._rows:
            if not job.done and job.cancelled.is_set():
                self._finish(job, "cancelled")
        keep = [i for i, job in enumerate(self._rows) if not job.done]
        if len(keep) < len(self._rows):
            self._batch.keep(keep)
            self._rows = [self._rows[i] for i in keep]

    def _finish(self, job: Job, reason: FinishReason, *, text: str = "", error: str | None = None) -> None:
        if job.done:
            return
        job.done = True
        tokens = len(job.stream.tokens) if job.stream is not None else 0
        try:
            job.emit(Event(text=text, finish_reason=reason, completion_tokens=tokens, error=error))
        finally:
            if job.on_finish is not None:
                job.on_finish()
            if self.metrics is not None:
                self.metrics.observe_finish(reason, len(job.prompt), tokens, time.perf_counter() - job.submitted)

    def _cache_of(self, out: Any) -> Any:
        return getattr(out, self._cache_arg)

    def _report(self) -> None:
        if self.metrics is not None:
            self.metrics.observe_load(len(self._waiting), len(self._rows), self.max_batch)

    @contextlib.contextmanager
    def _route(self, names: list[str]) -> Iterator[None]:
        """Run the block with adapter `names[i]` on batch row i (`BASE`: none).

        Rows of different adapters go through `adapter_per_row`; a batch whose rows all use one
        adapter runs it as the model's active adapter (the single-adapter path, no routing).
        """
        distinct = set(names)
        if not list_adapters(self.model):
            yield  # no adapter loaded: every row is the base
        elif len(distinct) == 1 and BASE not in distinct:
            (name,) = distinct
            if active_adapters(self.model) != (name,):
                set_adapter(self.model, name)
            yield
        elif self.batching == "per_adapter":
            with disable_adapters(self.model):  # the baseline's batches hold one adapter: here, the base
                yield
        else:
            with adapter_per_row(self.model, names):
                yield


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids.update([configured] if isinstance(configured, int) else configured)
    return ids
