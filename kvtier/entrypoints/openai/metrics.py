"""Prometheus metrics at ``/metrics``, named like vLLM's (``kvtier:`` instead of ``vllm:``).

Engine gauges and counters are read from the engine's last step at scrape time; latency
histograms are observed by the server as outputs stream out.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvtier.engine.async_engine import AsyncLLMEngine
from kvtier.outputs import RequestOutput

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)

# engine metric -> (prometheus name, help, kind)
_ENGINE = {
    "num_requests_running": ("num_requests_running", "Requests in the running batch.", "gauge"),
    "num_requests_waiting": ("num_requests_waiting", "Requests waiting to be scheduled.", "gauge"),
    "num_requests_swapped": ("num_requests_swapped", "Requests swapped out to host memory.", "gauge"),
    "kv_cache_usage_perc": ("kv_cache_usage_perc", "Fraction of KV blocks held by running sequences.", "gauge"),
    "kv_blocks_free": ("kv_cache_free_blocks", "KV blocks free (not counting cached ones).", "gauge"),
    "kv_blocks_cached": ("kv_cache_cached_blocks", "Unreferenced KV blocks kept for prefix reuse.", "gauge"),
    "prefix_cache_queries": ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", "counter"),
    "prefix_cache_hits": ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", "counter"),
    "num_preemptions": ("num_preemptions", "Requests preempted for lack of KV blocks.", "counter"),
    "prompt_tokens": ("prompt_tokens", "Prompt tokens accepted.", "counter"),
    "generation_tokens": ("generation_tokens", "Tokens generated.", "counter"),
}


class _EngineCollector(Collector):
    def __init__(self, engine: AsyncLLMEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def collect(self):
        values = self.engine.metrics()
        for key, (name, doc, kind) in _ENGINE.items():
            cls = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            family = cls(f"kvtier:{name}", doc, labels=["model_name"])
            family.add_metric([self.model_name], float(values[key]))
            yield family


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry, engine: AsyncLLMEngine, model_name: str) -> None:
        registry.register(_EngineCollector(engine, model_name))
        labels = ["model_name"]
        self.model_name = model_name
        self.ttft = Histogram("kvtier:time_to_first_token_seconds", "Time to first token.", labels, registry=registry, buckets=_LATENCY_BUCKETS)
        self.itl = Histogram("kvtier:inter_token_latency_seconds", "Time between streamed outputs.", labels, registry=registry, buckets=_LATENCY_BUCKETS)
        self.e2e = Histogram("kvtier:e2e_request_latency_seconds", "Arrival to finish.", labels, registry=registry, buckets=_LATENCY_BUCKETS)
        self._last: dict[str, float] = {}

    def observe_output(self, out: RequestOutput) -> None:
        now = time.monotonic()
        prev = self._last.get(out.request_id)
        if prev is not None:
            self.itl.labels(self.model_name).observe(now - prev)
        self._last[out.request_id] = now
        if out.finished:
            self._last.pop(out.request_id, None)
            self.observe_finished(out)

    def forget(self, request_id: str) -> None:
        """Drop the last-output time of a stream that ended without finishing (client gone)."""
        self._last.pop(request_id, None)

    def observe_finished(self, out: RequestOutput) -> None:
        m = out.metrics
        if m.time_to_first_token is not None:
            self.ttft.labels(self.model_name).observe(m.time_to_first_token)
        if m.finished_time is not None:
            self.e2e.labels(self.model_name).observe(m.finished_time - m.arrival_time)
