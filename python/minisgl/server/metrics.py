"""Prometheus metrics of the API server, in a private registry (served at GET /metrics)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_TTFT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
_E2E = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)

# scheduler Stats key -> (metric name after "minisgl_", help, cumulative?)
ENGINE_STATS = {
    "running_reqs": ("num_running_reqs", "requests in the running batch", False),
    "waiting_reqs": ("num_waiting_reqs", "requests waiting to be scheduled", False),
    "pages_used": ("kv_pages_used", "KV cache pages in use by requests", False),
    "pages_free": ("kv_pages_free", "KV cache pages free", False),
    "pages_cached": ("kv_pages_cached", "KV pages held by the prefix cache", False),
    "pages_total": ("kv_pages_total", "KV cache pages allocated", False),
    "prefix_hit_tokens": ("prefix_cache_hit_tokens", "prompt tokens from the prefix cache", True),
    "prefill_tokens": ("prefill_tokens", "prompt tokens computed", True),
    "decode_tokens": ("decode_tokens", "tokens decoded", True),
    "retracted": ("retracted_reqs", "requests retracted under KV pressure", True),
}


class EngineStats(Collector):
    """Latest Stats message from scheduler rank 0, exposed as gauges and counters."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def update(self, values: dict[str, float]) -> None:
        self.values = dict(values)

    def collect(self) -> Iterator[Metric]:
        for key, (name, doc, cumulative) in ENGINE_STATS.items():
            if key not in self.values:
                continue
            cls = CounterMetricFamily if cumulative else GaugeMetricFamily
            yield cls(f"minisgl_{name}", doc, value=float(self.values[key]))


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(f"minisgl_{name}", doc, labels, registry=r)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"minisgl_{name}", doc, buckets=buckets, registry=r)

        self.http = counter("http_requests", "HTTP requests by route and status", "route", "status")
        self.prompt_tokens = counter("prompt_tokens", "prompt tokens of served requests")
        self.generation_tokens = counter("generation_tokens", "tokens generated")
        self.finished = counter("request_finished", "engine requests finished by reason", "reason")
        self.ttft = histogram("time_to_first_token_seconds", "time to first token", _TTFT)
        self.itl = histogram("inter_token_latency_seconds", "time between tokens", _LATENCY)
        self.e2e = histogram("e2e_request_latency_seconds", "engine request latency", _E2E)
        self.running = Gauge(
            "minisgl_api_inflight_requests", "engine requests in flight in the API", registry=r
        )
        self.engine = EngineStats()
        r.register(self.engine)

    def render(self) -> bytes:
        return generate_latest(self.registry)
