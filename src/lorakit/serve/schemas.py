"""The request bodies the server accepts: OpenAI's fields (and vLLM's for adapters), validated.

Fields OpenAI defines that this server does not implement (`n` > 1, `logprobs`, `echo`, tools)
are refused with a 400 that names them rather than ignored; unknown extra fields are ignored as
OpenAI's own API does.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ChatMessage",
    "ChatRequest",
    "CompletionRequest",
    "ErrorResponse",
    "LoadAdapterRequest",
    "StreamOptions",
    "UnloadAdapterRequest",
]

_INT64 = 2**63 - 1


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, description="The base model's id or a loaded adapter's name.")
    max_tokens: Annotated[int, Field(ge=1, le=_INT64)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=_INT64)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=1, description="Only 1 is supported.")] | None = 1
    user: str | None = None
    ignore_eos: bool | None = Field(False, description="Keep generating past end-of-sequence (vLLM's field).")


class CompletionRequest(_Sampling):
    """`POST /v1/completions`: continue a raw prompt (or several: one choice each)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: Literal[False] | None = False
    logprobs: None = None
    best_of: Annotated[int, Field(ge=1, le=1)] | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None


class ChatRequest(_Sampling):
    """`POST /v1/chat/completions`: a conversation, rendered with the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[int, Field(ge=1, le=_INT64)] | None = None
    logprobs: Literal[False] | None = False


class LoadAdapterRequest(BaseModel):
    """`POST /v1/load_lora_adapter` (vLLM's fields)."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadAdapterRequest(BaseModel):
    """`POST /v1/unload_lora_adapter` (vLLM's fields)."""

    lora_name: str = Field(min_length=1)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body."""

    error: ErrorDetail
