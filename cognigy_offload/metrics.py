"""Prometheus series of the service, held in a registry of its own per app (no globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_JOB_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800)
_QUERY_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """Every series the service exports; labels stay low-cardinality (no conversation ids)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        p = "cognigy_offload_"
        self.jobs_accepted = Counter(p + "jobs_accepted", "Webhook jobs accepted", registry=r)
        self.jobs_rejected = Counter(
            p + "jobs_rejected", "Webhook requests refused, by reason", ["reason"], registry=r
        )
        self.queue_depth = Gauge(p + "queue_depth", "Accepted jobs not yet started", registry=r)
        self.inline_waits = Gauge(
            p + "inline_waits", "Webhook requests waiting for an inline result", registry=r
        )
        self.jobs_finished = Counter(
            p + "jobs_finished", "Jobs that reached a final state", ["status"], registry=r
        )
        self.job_duration = Histogram(
            p + "job_duration_seconds",
            "From acceptance to final state",
            ["status"],
            buckets=_JOB_BUCKETS_S,
            registry=r,
        )
        self.query_duration = Histogram(
            p + "query_duration_seconds",
            "Aggregation query time in PostgreSQL",
            ["query"],
            buckets=_QUERY_BUCKETS_S,
            registry=r,
        )
        self.queries_run = Counter(
            p + "queries", "Aggregation queries, by outcome", ["query", "outcome"], registry=r
        )
        self.queries_shared = Counter(
            p + "queries_shared",
            "Jobs served by a running identical query (coalesced) or a cached result",
            ["query", "how"],
            registry=r,
        )
        self.deliveries = Counter(
            p + "deliveries",
            "Delivery requests to Cognigy, by outcome and HTTP status",
            ["outcome", "http_status"],
            registry=r,
        )
        self.token_fetches = Counter(
            p + "token_fetches", "OAuth2 token requests, by outcome", ["outcome"], registry=r
        )
        self.rate_limit_waits = Counter(
            p + "rate_limit_waits", "Delivery requests that waited for the rate limit", registry=r
        )
        self.rate_limit_wait_seconds = Counter(
            p + "rate_limit_wait_seconds", "Time spent waiting for the rate limit", registry=r
        )
        self.breaker_state = Gauge(
            p + "circuit_breaker_state",
            "Cognigy circuit breaker: 0 closed, 1 open, 2 half-open",
            registry=r,
        )
        self.jobs_recovered = Counter(
            p + "jobs_recovered",
            "Jobs taken over after a restart or from a dead instance",
            registry=r,
        )
        self.jobs_pruned = Counter(
            p + "jobs_pruned", "Finished jobs deleted after the retention", registry=r
        )

    def exposition(self) -> bytes:
        """The Prometheus text exposition of every series."""
        return generate_latest(self.registry)
