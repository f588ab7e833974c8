"""Prometheus metrics for GET /metrics, in prometheus-client's text format, in a registry of the app's own.

What the engine knows (queue length, requests in the running batch, the sizes of the batches it formed, requests
answered / failed / dropped, batches stopped once their clients had gone) is read from it when /metrics is scraped,
by a collector, so the engine keeps no metrics code. What the HTTP side sees is recorded as it happens, through
`answered` and `refused`: the latency of each answered chat request (a streamed one when its stream ends), its
prompt and completion tokens, and every error response by reason (its code).
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TOKEN_BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self, lynx):
        """`lynx`: the app's state (its `status` and, once loaded, its `engine`), read at each scrape."""
        self.registry = CollectorRegistry()
        self.latency = Histogram("lynx_request_duration_seconds", "Chat requests answered: seconds from arrival "
                                 "to answer", buckets=LATENCY_BUCKETS, registry=self.registry)
        self.prompt_tokens = Histogram("lynx_prompt_tokens", "Prompt tokens of each answered request (the visual "
                                       "tokens included)", buckets=TOKEN_BUCKETS, registry=self.registry)
        self.completion_tokens = Histogram("lynx_completion_tokens", "Completion tokens of each answered request",
                                           buckets=TOKEN_BUCKETS, registry=self.registry)
        self.refusals = Counter("lynx_refused_requests", "Requests answered with an error, by reason (the error's "
                                "code)", ["reason"], registry=self.registry)
        self.registry.register(EngineCollector(lynx))

    def answered(self, seconds: float, prompt_tokens: int, completion_tokens: int) -> None:
        self.latency.observe(seconds)
        self.prompt_tokens.observe(prompt_tokens)
        self.completion_tokens.observe(completion_tokens)

    def refused(self, reason: str) -> None:
        self.refusals.labels(reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class EngineCollector:
    """The engine's state at scrape time: the queue, the running batch, the batches formed so far."""

    def __init__(self, lynx):
        self.lynx = lynx

    def describe(self):
        return []  # its metrics depend on whether the model has loaded: collected afresh at every scrape

    def collect(self):
        engine = self.lynx.engine
        yield GaugeMetricFamily("lynx_ready", "1 while the model answers (0: loading, stopping or failed)",
                                value=float(self.lynx.status == "ready"))
        yield GaugeMetricFamily("lynx_queue_length", "Requests waiting for a batch",
                                value=engine.queued if engine else 0)
        yield GaugeMetricFamily("lynx_running_requests", "Requests in the batch being answered",
                                value=engine.busy if engine else 0)
        stats = engine.stats if engine else None
        sizes = stats.batch_sizes if stats else {}
        buckets = [(str(bound), sum(n for size, n in sizes.items() if size <= bound)) for bound in BATCH_BUCKETS]
        buckets.append(("+Inf", sum(sizes.values())))
        yield HistogramMetricFamily("lynx_batch_size", "Requests in each batch the engine answered", buckets=buckets,
                                    sum_value=sum(size * n for size, n in sizes.items()))
        outcomes = CounterMetricFamily("lynx_engine_requests", "Requests the engine finished, by outcome "
                                       "(dropped: their client left before their batch started)", labels=["outcome"])
        for outcome in ("answered", "failed", "dropped"):
            outcomes.add_metric([outcome], getattr(stats, outcome) if stats else 0)
        yield outcomes
        yield CounterMetricFamily("lynx_stopped_batches", "Batches stopped before their end because every one of "
                                  "their requests had gone (clients left, timed out)",
                                  value=stats.stopped if stats else 0)
