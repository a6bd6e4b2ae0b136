"""Request accounting: the concurrency limit (429 beyond it) and the Prometheus text of /metrics (request
counts by path and status, latency histograms, tokens in and out).

It is a plain ASGI middleware, not an HTTP one, so that a streamed response counts as in flight, and its
latency is measured, until its last byte is sent."""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from typing import Callable

BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Counters and histograms, written out in the Prometheus text exposition format (version 0.0.4)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency_buckets: dict[str, list[int]] = defaultdict(lambda: [0] * len(BUCKETS))
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.latency_count: dict[str, int] = defaultdict(int)
        self.tokens: dict[str, int] = {"prompt": 0, "completion": 0}
        self.in_flight = 0
        self.rejected = 0
        self.extra: Callable[[], list[str]] | None = None  # more lines (the engine's batching counters)

    def observe(self, path: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(path, status)] += 1
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    self.latency_buckets[path][i] += 1
            self.latency_sum[path] += seconds
            self.latency_count[path] += 1

    def add_tokens(self, prompt: int = 0, completion: int = 0) -> None:
        with self._lock:
            self.tokens["prompt"] += prompt
            self.tokens["completion"] += completion

    def render(self) -> str:
        with self._lock:
            lines = ["# HELP tunelab_requests_total Requests answered, by path and HTTP status.",
                     "# TYPE tunelab_requests_total counter"]
            for (path, status), n in sorted(self.requests.items()):
                lines.append(f'tunelab_requests_total{{path="{path}",status="{status}"}} {n}')
            lines += ["# HELP tunelab_request_duration_seconds Time from request to the last byte of the answer.",
                      "# TYPE tunelab_request_duration_seconds histogram"]
            for path in sorted(self.latency_count):
                for bound, n in zip(BUCKETS, self.latency_buckets[path]):
                    lines.append(f'tunelab_request_duration_seconds_bucket{{path="{path}",le="{bound}"}} {n}')
                lines.append(f'tunelab_request_duration_seconds_bucket{{path="{path}",le="+Inf"}} '
                             f"{self.latency_count[path]}")
                lines.append(f'tunelab_request_duration_seconds_sum{{path="{path}"}} {self.latency_sum[path]:.6f}')
                lines.append(f'tunelab_request_duration_seconds_count{{path="{path}"}} {self.latency_count[path]}')
            lines += ["# HELP tunelab_tokens_total Tokens read (prompt) and generated (completion).",
                      "# TYPE tunelab_tokens_total counter"]
            for kind, n in self.tokens.items():
                lines.append(f'tunelab_tokens_total{{kind="{kind}"}} {n}')
            lines += ["# HELP tunelab_requests_in_flight Requests being answered now.",
                      "# TYPE tunelab_requests_in_flight gauge", f"tunelab_requests_in_flight {self.in_flight}",
                      "# HELP tunelab_requests_rejected_total Requests refused with 429 (too many at once).",
                      "# TYPE tunelab_requests_rejected_total counter", f"tunelab_requests_rejected_total {self.rejected}"]
        if self.extra is not None:
            lines += self.extra()
        return "\n".join(lines) + "\n"


class AccountingMiddleware:
    """Counts and times every request; refuses /v1/ requests beyond `max_concurrent` in flight with a 429."""

    def __init__(self, app, metrics: Metrics, max_concurrent: int) -> None:
        self.app, self.metrics, self.max_concurrent = app, metrics, max_concurrent

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        limited = path.startswith("/v1/") and path != "/v1/models"
        start = time.perf_counter()
        if limited and self.metrics.in_flight >= self.max_concurrent:
            self.metrics.rejected += 1
            await _send_json(send, 429, {"error": {
                "message": f"Too many requests at once (the limit is {self.max_concurrent}); retry shortly",
                "type": "rate_limit_error", "param": None, "code": "too_many_requests"}})
            self.metrics.observe(path, 429, time.perf_counter() - start)
            return
        status = 500
        if limited:
            self.metrics.in_flight += 1

        async def send_and_watch(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            if limited:
                self.metrics.in_flight -= 1
            if path not in ("/metrics", "/health"):
                self.metrics.observe(path if status != 404 else "other", status, time.perf_counter() - start)


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"retry-after", b"1")]})
    await send({"type": "http.response.body", "body": data})
