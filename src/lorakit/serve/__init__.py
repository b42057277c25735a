"""`lorakit serve`: one base model and many LoRA adapters behind an OpenAI-compatible HTTP API.

| module | owns |
|---|---|
| `engine` | the worker thread that owns the model: continuous batching across adapters |
| `batch` | the running batch's left-padded KV cache (rows join after a batch-1 prefill, leave at once) |
| `text` | sampling parameters, next-token choice, streamed text with stop strings |
| `registry` | model names, adapters loaded/unloaded while serving, reference counts |
| `api`, `schemas` | the FastAPI endpoints and OpenAI's request/response and error shapes |
| `limits` | the request-size limit: a body over `--max-request-bytes` is refused (413) unread |
| `metrics` | Prometheus metrics |
| `server` | `ServeConfig`, loading everything, running uvicorn, the graceful shutdown |

The HTTP layer needs the `serve` extra (fastapi, uvicorn, prometheus_client); the engine needs
only torch and transformers.
"""

from lorakit.serve.engine import Engine
from lorakit.serve.server import ServeConfig, build_server, serve

__all__ = ["Engine", "ServeConfig", "build_server", "serve"]
