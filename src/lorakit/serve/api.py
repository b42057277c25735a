"""The HTTP layer: OpenAI's endpoints over the engine (FastAPI).

Handlers only validate, tokenize, hand jobs to the engine and relay its events; all model work
runs on the engine's worker thread, so the event loop stays free. Every error is OpenAI's error
JSON with the right status (400 bad request, 401 API key, 404 unknown model, 413 body over
`--max-request-bytes`, 429 queue full with `Retry-After`, 500 otherwise) and never a traceback.
"""

import asyncio
import contextlib
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lorakit.data import encode_prompt
from lorakit.extras import require
from lorakit.serve.engine import Engine, Event, Job
from lorakit.serve.errors import BadRequest, ServeError, Unauthorized, Unavailable
from lorakit.serve.limits import BodyLimit
from lorakit.serve.metrics import ServeMetrics
from lorakit.serve.registry import AdapterRegistry
from lorakit.serve.schemas import (
    ChatRequest,
    CompletionRequest,
    ErrorResponse,
    LoadAdapterRequest,
    UnloadAdapterRequest,
)
from lorakit.serve.text import SamplingParams

__all__ = ["ServerState", "create_app"]

log = logging.getLogger("lorakit.serve")

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in (
        (400, "Bad request"),
        (401, "Missing or wrong API key"),
        (404, "Unknown model"),
        (413, "Request body over --max-request-bytes"),
    )
}
_GENERATION_ERRORS = {**_ERRORS, 429: {"model": ErrorResponse, "description": "Queue full; see Retry-After"}}


@dataclass
class ServerState:
    """What the handlers share.

    Args:
        engine: the running engine.
        registry: model names and adapters.
        tokenizer: the base model's tokenizer.
        metrics: the Prometheus metrics.
        max_model_len: prompt plus completion tokens at most.
        default_max_tokens: `max_tokens` of a request that gives none; None = OpenAI's defaults
            (16 for completions, the rest of the context for chat).
        api_key: the key `/v1/` requests must send as `Authorization: Bearer KEY`, or None.
        max_request_bytes: the largest request body accepted (larger: 413, unread).
    """

    engine: Engine
    registry: AdapterRegistry
    tokenizer: Any
    metrics: ServeMetrics
    max_model_len: int
    default_max_tokens: int | None = None
    api_key: str | None = None
    max_request_bytes: int = 8 * 1024 * 1024


def create_app(state: ServerState) -> Any:
    """The FastAPI application serving `state`."""
    require("fastapi", "serve", "lorakit serve")
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, Response
    from starlette.exceptions import HTTPException

    app = FastAPI(title="lorakit", summary="OpenAI-compatible server: one base model, many LoRA adapters")
    app.state.lorakit = state

    def error_response(err: ServeError) -> JSONResponse:
        headers = {"Retry-After": str(err.retry_after)} if hasattr(err, "retry_after") else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, err: ServeError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(err.errors()))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, err: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if err.status_code < 500 else "server_error"
        body = {"error": {"message": str(err.detail), "type": kind, "param": None, "code": None}}
        return JSONResponse(body, status_code=err.status_code, headers=getattr(err, "headers", None))

    def internal_error(err: Exception, path: str) -> JSONResponse:
        log.exception("unexpected error on %s", path)  # the traceback goes to the log, not the client
        return error_response(ServeError(f"internal error: {type(err).__name__}"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        return internal_error(err, request.url.path)

    # Inside the middleware below (added first): its body-reading wrapper runs in a task group,
    # which would wrap BodyTooLarge in an ExceptionGroup that FastAPI's body reader turns into a 400.
    app.add_middleware(BodyLimit, max_bytes=state.max_request_bytes)

    @app.middleware("http")
    async def _auth_and_count(request: Request, call_next: Callable) -> Response:
        path = request.url.path
        if state.api_key is not None and path.startswith("/v1/"):
            header = request.headers.get("authorization", "")
            scheme, _, given = header.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), state.api_key.encode()):
                response: Response = error_response(
                    Unauthorized("missing or wrong API key: send the header 'Authorization: Bearer KEY'")
                )
                state.metrics.count(path, 401)
                return response
        try:
            response = await call_next(request)
        except Exception as err:  # what the exception handlers did not turn into a response
            response = internal_error(err, path)
        route = request.scope.get("route")
        state.metrics.count(getattr(route, "path", None) or _endpoint(app, path), response.status_code)
        return response

    # ------------------------------------------------------------------ endpoints
    @app.get("/health", summary="200 while the engine runs")
    async def health() -> JSONResponse:
        alive = state.engine.alive
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    @app.get(
        "/v1/models", summary="The base model and each loaded adapter (with vLLM's max_model_len)", responses=_ERRORS
    )
    async def models() -> dict:
        created = int(_START)
        data = [
            {
                "id": state.registry.base,
                "object": "model",
                "created": created,
                "owned_by": "lorakit",
                "root": state.registry.base,
                "parent": None,
                "max_model_len": state.max_model_len,
            }
        ]
        for entry in state.registry.ready():
            data.append(
                {
                    "id": entry.name,
                    "object": "model",
                    "created": entry.created,
                    "owned_by": "lorakit",
                    "root": str(entry.path),
                    "parent": state.registry.base,
                    "max_model_len": state.max_model_len,
                }
            )
        return {"object": "list", "data": data}

    @app.post("/v1/completions", summary="Continue a prompt", responses=_GENERATION_ERRORS)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        prompts = _completion_prompts(state, body.prompt)
        return await _generate(state, request, body, prompts, chat=False)

    @app.post("/v1/chat/completions", summary="Answer a conversation", responses=_GENERATION_ERRORS)
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        return await _generate(state, request, body, [_chat_prompt(state, body)], chat=True)

    @app.post("/v1/load_lora_adapter", summary="Load a PEFT adapter from under --adapter-dir", responses=_ERRORS)
    async def load_lora_adapter(body: LoadAdapterRequest) -> dict:
        folder = state.registry.resolve_path(body.lora_path)
        entry = await asyncio.wrap_future(state.registry.load(body.lora_name, folder))
        state.metrics.adapters.set(len(state.registry.ready()))
        return {"object": "lora_adapter", "id": entry.name, "root": str(entry.path), "status": "loaded"}

    @app.post("/v1/unload_lora_adapter", summary="Unload an adapter once its requests finish", responses=_ERRORS)
    async def unload_lora_adapter(body: UnloadAdapterRequest) -> dict:
        entry = await asyncio.wrap_future(state.registry.unload(body.lora_name))
        state.metrics.adapters.set(len(state.registry.ready()))
        return {"object": "lora_adapter", "id": entry.name, "status": "unloaded"}

    return app


_START = time.time()


def _endpoint(app: Any, path: str) -> str:
    """The metrics label of a request answered before routing (a 413): its route's path, or `other`."""
    return path if any(getattr(r, "path", None) == path for r in app.routes) else "other"


_SOURCES = ("body", "query", "path", "header", "cookie")


def _validation_error(errors: Sequence[Mapping[str, Any]]) -> BadRequest:
    """OpenAI's 400 for FastAPI's validation errors (pydantic's `loc`, `msg`, `type`, `ctx` each).

    A body that is not JSON at all has `loc` ("body", character position): the position goes into
    the message (`invalid JSON at position 50: ...`) and `param` is None, as for any error not
    about one field. Otherwise `param` is the top-level field the first error is about (never a
    list index), and the message lists up to five problems as `messages[0].role: ...`.
    """
    for e in errors:
        if e.get("type") == "json_invalid":
            loc = e.get("loc", ())
            position = next((p for p in loc if isinstance(p, int)), None)
            where = f" at position {position}" if position is not None else ""
            reason = (e.get("ctx") or {}).get("error")
            return BadRequest(f"invalid JSON{where}" + (f": {reason}" if reason else ""))
    problems = []
    for e in errors[:5]:
        problems.append(f"{_location(e.get('loc', ())) or 'body'}: {e.get('msg', 'invalid')}")
    first = _field_path(errors[0].get("loc", ())) if errors else ()
    param = first[0] if first and isinstance(first[0], str) else None
    return BadRequest("invalid request: " + "; ".join(problems or ["invalid body"]), param=param)


def _field_path(loc: Sequence[Any]) -> tuple[Any, ...]:
    """`loc` without its leading source (`body`, `query`, ...): field names and list indices."""
    loc = tuple(loc)
    return loc[1:] if loc and loc[0] in _SOURCES else loc


def _location(loc: Sequence[Any]) -> str:
    """A field path as written in JSON terms: ("body", "messages", 0, "role") -> `messages[0].role`."""
    text = ""
    for part in _field_path(loc):
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


# ---------------------------------------------------------------------- prompts
def _completion_prompts(state: ServerState, prompt: Any) -> list[list[int]]:
    """Token ids of each prompt: text encoded as `lorakit generate` encodes it, or ids as given."""
    if isinstance(prompt, str):
        texts: list[Any] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        texts = [prompt]
    else:
        texts = list(prompt)
    if not texts:
        raise BadRequest("prompt is empty", param="prompt")
    vocab = len(state.tokenizer)
    out = []
    for p in texts:
        ids = encode_prompt(state.tokenizer, p) if isinstance(p, str) else list(p)
        if not ids:
            raise BadRequest("prompt is empty (it encodes to no tokens)", param="prompt")
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise BadRequest(f"prompt token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})", param="prompt")
        out.append(ids)
    return out


def _chat_prompt(state: ServerState, body: ChatRequest) -> list[int]:
    tokenizer = state.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise BadRequest("this model's tokenizer has no chat template; use /v1/completions", param="messages")
    conversation = []
    for m in body.messages:
        content = m.content if isinstance(m.content, str) or m.content is None else "".join(p.text for p in m.content)
        conversation.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
    try:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    except Exception as err:  # a template that rejects the conversation (jinja raise_exception)
        raise BadRequest(f"the chat template rejected these messages: {err}", param="messages") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise BadRequest("the conversation encodes to no tokens", param="messages")
    return ids


def _params(state: ServerState, body: Any, prompt_len: int, chat: bool) -> SamplingParams:
    room = state.max_model_len - prompt_len
    if room < 1:
        raise BadRequest(
            f"the prompt has {prompt_len} tokens; this server's context is {state.max_model_len} tokens "
            "(--max-model-len), leaving no room to generate",
            param="messages" if chat else "prompt",
        )
    asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if asked is None:
        asked = state.default_max_tokens or (room if chat else 16)
        asked = min(asked, room)
    if asked > room:
        raise BadRequest(
            f"max_tokens {asked} plus the prompt's {prompt_len} tokens exceeds this server's context of "
            f"{state.max_model_len} tokens (--max-model-len)",
            param="max_tokens",
        )
    stop = body.stop if isinstance(body.stop, list) else [body.stop] if body.stop else []
    return SamplingParams(
        max_tokens=asked,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=tuple(s for s in stop if s),
        seed=body.seed,
        ignore_eos=bool(body.ignore_eos),
    )


# ---------------------------------------------------------------------- running a request
async def _generate(state: ServerState, request: Any, body: Any, prompts: list[list[int]], *, chat: bool) -> Any:
    params = [_params(state, body, len(p), chat) for p in prompts]
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
    jobs: list[Job] = []

    def emitter(index: int) -> Callable[[Event], None]:
        def emit(event: Event) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: the server is stopping
                loop.call_soon_threadsafe(queue.put_nowait, (index, event))

        return emit

    try:
        for index, (ids, p) in enumerate(zip(prompts, params, strict=True)):
            adapter = state.registry.acquire(body.model)
            job = Job(ids, adapter, p, emitter(index), on_finish=lambda a=adapter: state.registry.release(a))
            try:
                state.engine.submit(job)
            except BaseException:
                state.registry.release(adapter)
                raise
            jobs.append(job)
    except BaseException:
        for job in jobs:
            job.cancel()
        raise
    kind = "chat.completion" if chat else "text_completion"
    reply = _Reply(id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, model=body.model, kind=kind)
    usage = {"prompt_tokens": sum(len(p) for p in prompts)}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        from fastapi.responses import StreamingResponse

        stream = _stream(reply, queue, jobs, usage, include_usage, chat)
        return StreamingResponse(stream, media_type="text/event-stream")
    return await _collect(reply, queue, jobs, usage, chat, request)


def _failure(event: Event) -> ServeError:
    """The error of a job that ended without finishing: generation failed (500), or the engine
    cancelled it because the server is stopping (503: a client that went away is never answered)."""
    if event.finish_reason == "cancelled":
        return Unavailable("the request was cancelled: the server is stopping (--shutdown-timeout ran out)")
    return ServeError(event.error or "generation failed")


@dataclass
class _Reply:
    id: str
    model: str
    kind: str
    created: int = 0

    def __post_init__(self) -> None:
        self.created = int(time.time())

    def wrap(self, choices: list[dict], **extra: Any) -> dict:
        return {
            "id": self.id,
            "object": self.kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }


def _usage(usage: dict, completion: int) -> dict:
    return {**usage, "completion_tokens": completion, "total_tokens": usage["prompt_tokens"] + completion}


async def _collect(reply: _Reply, queue: asyncio.Queue, jobs: list[Job], usage: dict, chat: bool, request: Any) -> dict:
    texts = [""] * len(jobs)
    ends: list[Event | None] = [None] * len(jobs)
    try:
        while any(e is None for e in ends):
            try:
                index, event = await asyncio.wait_for(queue.get(), timeout=0.5)
            except TimeoutError:
                if await request.is_disconnected():
                    return {}
                continue
            texts[index] += event.text
            if event.finish_reason is not None:
                ends[index] = event
    finally:
        for job in jobs:
            job.cancel()  # a no-op for finished jobs; frees the rows of a client that went away
    failed = next((e for e in ends if e is not None and e.finish_reason in ("error", "cancelled")), None)
    if failed is not None:
        raise _failure(failed)
    choices = []
    for index, (text, end) in enumerate(zip(texts, ends, strict=True)):
        assert end is not None
        if chat:
            choices.append(
                {
                    "index": index,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": end.finish_reason,
                }
            )
        else:
            choices.append({"index": index, "text": text, "logprobs": None, "finish_reason": end.finish_reason})
    completion = sum(e.completion_tokens for e in ends if e is not None)
    return reply.wrap(choices, usage=_usage(usage, completion))


async def _stream(
    reply: _Reply, queue: asyncio.Queue, jobs: list[Job], usage: dict, include_usage: bool, chat: bool
) -> AsyncIterator[str]:
    def sse(payload: dict) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    reply.kind = "chat.completion.chunk" if chat else "text_completion"
    finished = 0
    completion = 0
    try:
        if chat:
            yield sse(
                reply.wrap(
                    [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
            )
        while finished < len(jobs):
            index, event = await queue.get()
            if event.finish_reason in ("error", "cancelled"):
                yield sse(_failure(event).body())
                break
            end = event.finish_reason
            if event.text or end is not None:
                if chat:
                    delta = {"content": event.text} if event.text else {}
                    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": end}
                else:
                    choice = {"index": index, "text": event.text, "logprobs": None, "finish_reason": end}
                yield sse(reply.wrap([choice]))
            if end is not None:
                finished += 1
                completion += event.completion_tokens
        else:
            if include_usage:
                yield sse(reply.wrap([], usage=_usage(usage, completion)))
        yield "data: [DONE]\n\n"
    finally:
        for job in jobs:
            job.cancel()  # the client went away mid-stream: its rows leave the batch at the next step
