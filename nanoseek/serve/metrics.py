"""Prometheus metrics for `GET /metrics`: request latencies observed by the server, engine counters
read from the engine at scrape time (one registry per app, so several servers can live in a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from nanoseek.serve.engine import Engine

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class EngineCollector:
    """Counters and gauges straight from the engine's own bookkeeping."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        m, e = self.engine.metrics, self.engine
        counters = {
            "prompt_tokens": ("prompt tokens received", m.prompt_tokens),
            "generation_tokens": ("tokens generated", m.generated_tokens),
            "preemptions": ("sequences preempted for cache space", m.preemptions),
            "spec_decode_draft_tokens": ("MTP draft tokens verified", m.drafted_tokens),
            "spec_decode_accepted_tokens": ("MTP draft tokens accepted", m.accepted_tokens),
        }
        if e.disk_cache is not None:
            counters["disk_cache_corrupt_files"] = (
                "disk-cache files that failed their checksum (served as misses)",
                e.disk_cache.corrupt,
            )
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"nanoseek_{name}", doc, value=value)
        hits = CounterMetricFamily(
            "nanoseek_prefix_cache_hit_tokens", "prompt tokens served from the prefix cache", labels=["tier"]
        )
        hits.add_metric(["memory"], m.prefix_hit_tokens - m.disk_hit_tokens)
        hits.add_metric(["disk"], m.disk_hit_tokens)
        yield hits
        gauges = {
            "requests_running": ("requests in the running batch", len(e.scheduler.running)),
            "requests_waiting": ("requests queued for the batch", len(e.scheduler.waiting)),
            "kv_cache_usage": ("fraction of KV-cache blocks in use", e.stats()["cache_use"]),
            "disk_cache_bytes": ("bytes in the disk prefix cache", e.disk_cache.bytes if e.disk_cache else 0),
            "spec_decode_acceptance_rate": ("accepted / drafted MTP tokens", m.acceptance_rate),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"nanoseek_{name}", doc, value=value)
        by_position = GaugeMetricFamily(
            "nanoseek_spec_decode_acceptance_rate_by_position",
            "of the MTP drafts at each position (1: the first draft of a step), the share accepted",
            labels=["position"],
        )
        for position, rate in enumerate(m.acceptance_by_position, 1):
            by_position.add_metric([str(position)], rate)
        yield by_position


class ServerMetrics:
    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine))

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(f"nanoseek_{name}", doc, buckets=LATENCY_BUCKETS, registry=self.registry)

        self.ttft = histogram("time_to_first_token_seconds", "request arrival to its first token")
        self.itl = histogram("inter_token_latency_seconds", "time between a request's tokens")
        self.e2e = histogram("e2e_request_latency_seconds", "request arrival to its last token")

    def render(self) -> bytes:
        return generate_latest(self.registry)
