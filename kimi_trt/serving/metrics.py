"""Prometheus metrics of the API server (`GET /metrics`).

Each app gets its own registry, so several servers in one process (tests) do not mix.
Names follow the usual LLM-server set (vLLM, TensorRT-LLM): requests by endpoint and
status, prompt/generated token counters, time to first token, inter-token latency,
end-to-end latency, finish reasons, the queue depth (requests queued or generating in
the backend) read at scrape time, and tool-call outcomes: valid, repaired (the parser
mended the call's form), invalid (an undeclared function, arguments that are not JSON or
not valid against the schema) and truncated (cut by max_tokens). With the in-process
runtime's continuous batching, the generation loop's state is read at scrape time too:
running and waiting requests, KV cache blocks used, and prefix-cache lookups and hits
(prompts and tokens).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
PREFIX = "kimi_trt_"
TOOL_CALL_OUTCOMES = ("valid", "repaired", "invalid", "truncated")


class RequestTimer:
    """Token timestamps of one request (time to first token, gaps between tokens)."""

    def __init__(self, metrics: ServerMetrics, started: float):
        self.metrics = metrics
        self.started = started
        self.last: float | None = None

    def token(self) -> None:
        now = time.monotonic()
        if self.last is None:
            self.metrics.ttft.observe(now - self.started)
        else:
            self.metrics.itl.observe(now - self.last)
        self.last = now


class _LoopCollector:
    """The runtime loop's LoopStats as metrics, read at scrape time (nothing under static
    batching or a Triton backend, whose stats() gives None or does not exist)."""

    def __init__(self, stats: Callable[[], Any]):
        self.stats = stats

    def describe(self):
        return []

    def collect(self):
        s = self.stats()
        if s is None:
            return
        gauges = (
            ("requests_running", "Requests in the generation loop", s.running),
            ("requests_waiting", "Requests queued for a seat in the generation loop", s.waiting),
            ("kv_cache_blocks_used", "KV cache blocks held by running requests", s.kv_blocks_used),
            ("kv_cache_blocks_total", "KV cache blocks in the pools", s.kv_blocks_total),
            (
                "kv_cache_usage_ratio",
                "Fraction of KV cache blocks held by running requests",
                s.kv_blocks_used / max(1, s.kv_blocks_total),
            ),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(PREFIX + name, doc, value=value)
        counters = (
            ("prefix_cache_queries", "Prompts looked up in the prefix cache", s.prefix_queries),
            ("prefix_cache_hits", "Prompts that reused cached KV blocks", s.prefix_hits),
            ("prefix_cache_query_tokens", "Prompt tokens looked up", s.prefix_query_tokens),
            ("prefix_cache_hit_tokens", "Prompt tokens reused", s.prefix_hit_tokens),
        )
        for name, doc, value in counters:
            yield CounterMetricFamily(PREFIX + name, doc, value=value)


class ServerMetrics:
    def __init__(self, queue_depth: Callable[[], int], loop_stats: Callable[[], Any] | None = None):
        self.registry = CollectorRegistry()
        r = self.registry
        if loop_stats is not None:
            r.register(_LoopCollector(loop_stats))
        self.requests = Counter(
            PREFIX + "requests", "HTTP API requests", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens", registry=r)
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens", "Generated tokens", registry=r
        )
        self.finished_requests = Counter(
            PREFIX + "request_finished", "Finished generations", ["reason"], registry=r
        )

        def latency(name: str, doc: str) -> Histogram:
            return Histogram(PREFIX + name, doc, buckets=LATENCY_BUCKETS, registry=r)

        self.ttft = latency(
            "time_to_first_token_seconds", "Time from request arrival to its first generated token"
        )
        self.itl = latency(
            "inter_token_latency_seconds", "Time between consecutive generated tokens of a request"
        )
        self.e2e = latency("request_latency_seconds", "Time from request arrival to its last token")
        self.backend_finished = Counter(
            PREFIX + "backend_requests_finished",
            "Requests as the in-process runtime ended them (cancelled: the slot was freed early)",
            ["reason"],
            registry=r,
        )
        self.backend_tokens = Counter(
            PREFIX + "backend_generated_tokens",
            "Tokens the in-process runtime generated, read by a client or not",
            registry=r,
        )
        self.tool_call_outcomes = Counter(
            PREFIX + "tool_calls",
            "Tool calls in generated output by outcome (valid, repaired, invalid, truncated)",
            ["outcome"],
            registry=r,
        )
        for outcome in TOOL_CALL_OUTCOMES:
            self.tool_call_outcomes.labels(outcome=outcome)
        self.in_flight = Gauge(PREFIX + "requests_in_flight", "Generations running", registry=r)
        depth = Gauge(
            PREFIX + "queue_depth", "Requests queued or generating in the backend", registry=r
        )
        depth.set_function(lambda: float(queue_depth()))

    def request_timer(self, started: float) -> RequestTimer:
        self.in_flight.inc()
        return RequestTimer(self, started)

    def finished(self, timer: RequestTimer, prompt: int, generated: int, reason: str) -> None:
        self.in_flight.dec()
        self.prompt_tokens.inc(prompt)
        self.generation_tokens.inc(generated)
        self.finished_requests.labels(reason=reason).inc()
        self.e2e.observe(time.monotonic() - timer.started)

    def tool_calls(self, outcomes: list[str], rejected_headers: int = 0) -> None:
        """Count one response's calls; a header naming no declared function is invalid."""
        for outcome in outcomes:
            self.tool_call_outcomes.labels(outcome=outcome).inc()
        if rejected_headers:
            self.tool_call_outcomes.labels(outcome="invalid").inc(rejected_headers)

    def backend_done(self, reason: str, tokens: int) -> None:
        self.backend_finished.labels(reason=reason).inc()
        self.backend_tokens.inc(tokens)

    def count(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
