"""Prometheus metrics for `GET /metrics`: request latencies observed by the server, engine counters
read from the engine at scrape time (one registry per app, so several servers can live in a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from nanoseek.serve.engine import Engine

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class EngineCollector:
    """Counters and gauges straight from the engine's own bookkeeping: launch totals, and per rank of a
    torchrun launch (a lone engine is rank 0) series with a `rank` label."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        e = self.engine
        ranks = e.rank_stats()
        total = lambda key: sum(r[key] for r in ranks)  # noqa: E731
        counters = {
            "prompt_tokens": ("prompt tokens received", total("prompt_tokens")),
            "generation_tokens": ("tokens generated", total("generated_tokens")),
            "preemptions": ("sequences preempted for cache space", total("preemptions")),
            "spec_decode_draft_tokens": ("MTP draft tokens verified", total("drafted_tokens")),
            "spec_decode_accepted_tokens": ("MTP draft tokens accepted", total("accepted_tokens")),
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
        hits.add_metric(["memory"], total("prefix_hit_tokens") - total("disk_hit_tokens"))
        hits.add_metric(["disk"], total("disk_hit_tokens"))
        yield hits
        drafted, accepted = total("drafted_tokens"), total("accepted_tokens")
        gauges = {
            "requests_running": ("requests in the running batch", total("running")),
            "requests_waiting": ("requests queued for the batch", total("waiting")),
            "kv_cache_usage": ("fraction of KV-cache blocks in use", sum(r["cache_use"] for r in ranks) / len(ranks)),
            "disk_cache_bytes": ("bytes in the disk prefix cache", e.disk_cache.bytes if e.disk_cache else 0),
            "spec_decode_acceptance_rate": ("accepted / drafted MTP tokens", accepted / drafted if drafted else 0.0),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"nanoseek_{name}", doc, value=value)
        by_position = GaugeMetricFamily(
            "nanoseek_spec_decode_acceptance_rate_by_position",
            "of the MTP drafts at each position (1: the first draft of a step), the share accepted",
            labels=["position"],
        )
        for position, rate in enumerate(ranks[0]["spec_acceptance_by_position"], 1):
            by_position.add_metric([str(position)], rate)
        yield by_position
        yield from self.by_rank(ranks)

    @staticmethod
    def by_rank(ranks: list[dict]):
        """Each rank's load, and per MoE layer the (token, rank) units it dispatched and received."""
        labelled = {
            "rank_requests_running": (GaugeMetricFamily, "requests running on the rank", "running"),
            "rank_requests_waiting": (GaugeMetricFamily, "requests waiting on the rank", "waiting"),
            "rank_requests_finished": (CounterMetricFamily, "requests the rank finished", "finished"),
            "rank_kv_cache_blocks_used": (GaugeMetricFamily, "KV-cache blocks the rank uses", "blocks_used"),
        }
        for name, (family, doc, key) in labelled.items():
            metric = family(f"nanoseek_{name}", doc, labels=["rank"])
            for r in ranks:
                metric.add_metric([str(r["rank"])], r[key])
            yield metric
        moe = {
            "moe_dispatched_tokens": (
                "(token, rank) units the rank sent to other ranks, per MoE layer",
                "moe_dispatched",
            ),
            "moe_received_tokens": (
                "(token, rank) units the rank received from other ranks, per MoE layer",
                "moe_received",
            ),
            "moe_sent_bytes": ("bytes the rank's tokens moved to and from other ranks, per MoE layer", "moe_bytes"),
        }
        for name, (doc, key) in moe.items():
            metric = CounterMetricFamily(f"nanoseek_{name}", doc, labels=["rank", "layer"])
            for r in ranks:
                for layer, value in enumerate(r.get(key, [])):
                    metric.add_metric([str(r["rank"]), str(layer)], value)
            yield metric


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
