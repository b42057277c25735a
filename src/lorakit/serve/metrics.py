"""The server's Prometheus metrics (`GET /metrics`), in a registry of its own (prometheus_client)."""

from __future__ import annotations

from typing import Any

from lorakit.extras import require

__all__ = ["ServeMetrics"]

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
_STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class ServeMetrics:
    """Requests, tokens, queue depth, batch occupancy and latency histograms.

    The engine calls the `observe_*` methods from its worker; the HTTP layer counts responses by
    status. Names follow Prometheus' conventions (`_total` counters, `_seconds` histograms).
    """

    def __init__(self) -> None:
        require("prometheus_client", "serve", "lorakit serve")
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lorakit_requests", "HTTP requests answered, by endpoint and status.", ["endpoint", "status"], registry=r
        )
        self.finished = Counter(
            "lorakit_generations", "Generations ended, by finish reason.", ["finish_reason"], registry=r
        )
        self.prompt_tokens = Counter("lorakit_prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.generated_tokens = Counter("lorakit_generation_tokens", "Tokens generated.", registry=r)
        self.queue_depth = Gauge("lorakit_queue_depth", "Requests waiting for a batch row.", registry=r)
        self.queue_peak = Gauge(
            "lorakit_queue_depth_max", "Most requests waiting for a batch row at once, since start.", registry=r
        )
        self._peak = 0
        self.running = Gauge("lorakit_batch_rows", "Requests being decoded.", registry=r)
        self.occupancy = Gauge("lorakit_batch_occupancy", "Batch rows in use / --max-batch.", registry=r)
        self.adapters = Gauge("lorakit_adapters_loaded", "Adapters loaded.", registry=r)
        self.latency = Histogram(
            "lorakit_request_latency_seconds", "Submit to last token.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.ttft = Histogram(
            "lorakit_time_to_first_token_seconds", "Submit to first token.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.step = Histogram(
            "lorakit_decode_step_seconds", "One decode step of the whole batch.", buckets=_STEP_BUCKETS, registry=r
        )

    def observe_step(self, rows: int, max_batch: int, seconds: float) -> None:
        self.step.observe(seconds)

    def observe_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def observe_finish(self, reason: str, prompt_tokens: int, tokens: int, seconds: float) -> None:
        self.finished.labels(reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(tokens)
        if reason in ("stop", "length"):
            self.latency.observe(seconds)

    def observe_queued(self, waiting: int) -> None:
        """A request joined the queue, which now holds `waiting` (called under the engine's lock)."""
        self.queue_depth.set(waiting)
        if waiting > self._peak:
            self._peak = waiting
            self.queue_peak.set(waiting)

    def observe_load(self, waiting: int, running: int, max_batch: int) -> None:
        self.queue_depth.set(waiting)
        self.running.set(running)
        self.occupancy.set(running / max_batch)

    def render(self) -> tuple[bytes, str]:
        """(the exposition text, its content type)."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def count(self, endpoint: str, status: Any) -> None:
        self.requests.labels(endpoint, str(status)).inc()
