"""Prometheus metrics at ``/metrics``, under kvtier's names (``kvtier:``), vLLM's (``vllm:``), or both.

vLLM's names carry vLLM's labels (``model_name`` and ``engine="0"``) and its histogram buckets (from
vllm/v1/metrics/loggers.py), so a Grafana dashboard built for vLLM reads kvtier unchanged. Engine
gauges and counters are read from the engine's last step at scrape time; latency histograms are
observed by the server as outputs stream out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvtier.engine.async_engine import AsyncLLMEngine
from kvtier.outputs import RequestOutput

METRIC_NAMES = ("kvtier", "vllm", "both")

# engine metric -> (prometheus name, help, kind, also under vLLM's name)
_ENGINE = {
    "num_requests_running": ("num_requests_running", "Requests in the running batch.", "gauge", True),
    "num_requests_waiting": ("num_requests_waiting", "Requests waiting to be scheduled.", "gauge", True),
    "num_requests_swapped": ("num_requests_swapped", "Requests swapped out to host memory.", "gauge", False),
    "kv_cache_usage_perc": ("kv_cache_usage_perc", "Fraction of KV blocks held by running sequences (1 means 100 percent).", "gauge", True),
    "kv_blocks_free": ("kv_cache_free_blocks", "KV blocks free (not counting cached ones).", "gauge", False),
    "kv_blocks_cached": ("kv_cache_cached_blocks", "Unreferenced KV blocks kept for prefix reuse.", "gauge", False),
    "mamba_slots_used": ("mamba_state_slots_used", "Mamba2 state slots held by sequences (hybrid models).", "gauge", False),
    "mamba_slots_total": ("mamba_state_slots_total", "Mamba2 state slots in the pool (hybrid models).", "gauge", False),
    "prefix_cache_queries": ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", "counter", True),
    "prefix_cache_hits": ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", "counter", True),
    "prefix_cache_states": ("prefix_cache_states", "Checkpoints the radix-tree prefix cache holds.", "gauge", False),
    "prefix_cache_evictions": ("prefix_cache_evictions", "Checkpoints the radix-tree prefix cache evicted.", "counter", False),
    "prefix_cache_bytes": ("prefix_cache_bytes", "Bytes the radix-tree prefix cache's checkpoints count for.", "gauge", False),
    "prefix_cache_alpha": ("prefix_cache_alpha", "Marconi's weight of FLOP efficiency against recency, as tuned (marconi policy).", "gauge", False),
    "mamba_slots_cached": ("mamba_state_slots_cached", "Mamba2 state slots only the prefix cache holds (hybrid models).", "gauge", False),
    "num_preemptions": ("num_preemptions", "Requests preempted for lack of KV blocks.", "counter", True),
    "prompt_tokens": ("prompt_tokens", "Prompt tokens accepted.", "counter", True),
    "generation_tokens": ("generation_tokens", "Tokens generated.", "counter", True),
    "cache_bytes_used": ("cache_bytes_used", "Bytes of K/V blocks and state slots held by sequences.", "gauge", False),
    "kv_bytes_read": ("kv_bytes_read", "K/V bytes read by decode attention (after a KV method's selection).", "counter", False),
}

FINISH_REASONS = ("stop", "length", "abort")


def _one_two_five(limit: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to ``limit`` (vLLM's buckets for token counts)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return out
            out.append(m * scale)
        scale *= 10


@dataclass(frozen=True)
class _Naming:
    """One family of names: prefix, label names and values, latency buckets."""

    prefix: str
    labels: tuple[str, ...]
    values: tuple[str, ...]
    ttft: tuple[float, ...]
    itl: tuple[float, ...]
    request: tuple[float, ...]
    with_all_engine_metrics: bool


_KVTIER_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


def _namings(metric_names: str, model_name: str) -> list[_Naming]:
    kvtier = _Naming("kvtier", ("model_name",), (model_name,), _KVTIER_LATENCY, _KVTIER_LATENCY, _KVTIER_LATENCY, True)
    vllm = _Naming(
        "vllm", ("model_name", "engine"), (model_name, "0"),
        ttft=(0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0),
        itl=(0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0),
        request=(0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0),
        with_all_engine_metrics=False,
    )
    return {"kvtier": [kvtier], "vllm": [vllm], "both": [kvtier, vllm]}[metric_names]


class _EngineCollector(Collector):
    def __init__(self, engine: AsyncLLMEngine, namings: list[_Naming]) -> None:
        self.engine = engine
        self.namings = namings

    def collect(self):
        values = self.engine.metrics()
        for naming in self.namings:
            for key, (name, doc, kind, in_vllm) in _ENGINE.items():
                if not (in_vllm or naming.with_all_engine_metrics) or key not in values:
                    continue  # a pure transformer has no mamba_* figures
                cls = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
                family = cls(f"{naming.prefix}:{name}", doc, labels=list(naming.labels))
                family.add_metric(list(naming.values), float(values[key]))
                yield family


class _Family:
    """The per-request metrics under one naming."""

    def __init__(self, registry: CollectorRegistry, n: _Naming, max_model_len: int) -> None:
        def hist(name: str, doc: str, buckets) -> Histogram:
            return Histogram(f"{n.prefix}:{name}", doc, n.labels, registry=registry, buckets=buckets).labels(*n.values)

        tokens = _one_two_five(max_model_len)
        self.ttft = hist("time_to_first_token_seconds", "Time to first token.", n.ttft)
        self.itl = hist("inter_token_latency_seconds", "Time between streamed outputs.", n.itl)
        self.e2e = hist("e2e_request_latency_seconds", "Arrival to finish.", n.request)
        self.queue = hist("request_queue_time_seconds", "Arrival to first scheduled.", n.request)
        self.prompt = hist("request_prompt_tokens", "Prompt tokens per finished request.", tokens)
        self.generation = hist("request_generation_tokens", "Generated tokens per finished request.", tokens)
        success = Counter(f"{n.prefix}:request_success", "Finished requests by finish reason.", [*n.labels, "finished_reason"], registry=registry)
        self.success = {reason: success.labels(*n.values, reason) for reason in FINISH_REASONS}


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry, engine: AsyncLLMEngine, model_name: str, metric_names: str = "both") -> None:
        namings = _namings(metric_names, model_name)
        registry.register(_EngineCollector(engine, namings))
        self.families = [_Family(registry, n, engine.engine.max_model_len) for n in namings]
        self._last: dict[str, float] = {}

    def observe_output(self, out: RequestOutput) -> None:
        now = time.monotonic()
        prev = self._last.get(out.request_id)
        if prev is not None:
            for f in self.families:
                f.itl.observe(now - prev)
        self._last[out.request_id] = now
        if out.finished:
            self._last.pop(out.request_id, None)
            self.observe_finished(out)

    def forget(self, request_id: str) -> None:
        """A request that ended without finishing (client gone): drop its last-output time, count it aborted."""
        self._last.pop(request_id, None)
        for f in self.families:
            f.success["abort"].inc()

    def observe_finished(self, out: RequestOutput) -> None:
        m = out.metrics
        reason = next((c.finish_reason for c in out.outputs if c.finish_reason in FINISH_REASONS), "abort")
        for f in self.families:
            if m.time_to_first_token is not None:
                f.ttft.observe(m.time_to_first_token)
            if m.finished_time is not None:
                f.e2e.observe(m.finished_time - m.arrival_time)
            if m.time_in_queue is not None:
                f.queue.observe(m.time_in_queue)
            f.prompt.observe(len(out.prompt_token_ids))
            f.generation.observe(sum(len(c.token_ids) for c in out.outputs))
            f.success[reason].inc()
