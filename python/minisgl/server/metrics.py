"""Prometheus metrics of the API server, in a private registry (served at GET /metrics)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_TTFT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
_E2E = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)

# scheduler Stats key -> (metric name, help, cumulative?)
ENGINE_STATS = {
    "running_reqs": ("minisgl_num_running_reqs", "requests in the running batch", False),
    "waiting_reqs": ("minisgl_num_waiting_reqs", "requests waiting to be scheduled", False),
    "pages_used": ("minisgl_kv_pages_used", "KV cache pages in use by requests", False),
    "pages_free": ("minisgl_kv_pages_free", "KV cache pages free", False),
    "pages_cached": ("minisgl_kv_pages_cached", "KV pages held by the prefix cache", False),
    "pages_total": ("minisgl_kv_pages_total", "KV cache pages allocated", False),
    "prefix_hit_tokens": (
        "minisgl_prefix_cache_hit_tokens",
        "prompt tokens from the prefix cache",
        True,
    ),
    "prefill_tokens": ("minisgl_prefill_tokens", "prompt tokens computed", True),
    "decode_tokens": ("minisgl_decode_tokens", "tokens decoded", True),
    "retracted": ("minisgl_retracted_reqs", "requests retracted under KV pressure", True),
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
            yield cls(name, doc, value=float(self.values[key]))


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.http = Counter(
            "minisgl_http_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "minisgl_prompt_tokens", "prompt tokens of served requests", registry=r
        )
        self.generation_tokens = Counter(
            "minisgl_generation_tokens", "tokens generated", registry=r
        )
        self.finished = Counter(
            "minisgl_request_finished", "engine requests finished by reason", ["reason"], registry=r
        )
        self.ttft = Histogram(
            "minisgl_time_to_first_token_seconds", "time to first token", buckets=_TTFT, registry=r
        )
        self.itl = Histogram(
            "minisgl_inter_token_latency_seconds",
            "time between tokens",
            buckets=_LATENCY,
            registry=r,
        )
        self.e2e = Histogram(
            "minisgl_e2e_request_latency_seconds",
            "engine request latency",
            buckets=_E2E,
            registry=r,
        )
        self.running = Gauge(
            "minisgl_api_inflight_requests", "engine requests in flight in the API", registry=r
        )
        self.engine = EngineStats()
        r.register(self.engine)

    def render(self) -> bytes:
        return generate_latest(self.registry)
