"""The application's dashboard metrics (``ray.serve.metrics``: Serve adds the deployment, replica and application
tags). The names are stable: dashboards and alerts use them. On Prometheus they appear with Ray's ``ray_`` prefix
(and counters with ``_total``), e.g. ``ray_meddr_serve_requests_total``.

Created once per replica process, on first use (Ray metrics need the replica's worker to exist).
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

from ray.serve import metrics

LATENCY_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
RETRIEVAL_BUCKETS_S = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64]

NAMES = (
    "meddr_serve_requests",
    "meddr_serve_request_latency_s",
    "meddr_serve_retrieval_latency_s",
    "meddr_serve_batch_size",
    "meddr_serve_batch_latency_s",
    "meddr_serve_tokens_generated",
    "meddr_serve_index_version",
)


class IngressMetrics(NamedTuple):
    requests: metrics.Counter
    latency: metrics.Histogram


class GeneratorMetrics(NamedTuple):
    retrieval_latency: metrics.Histogram
    batch_size: metrics.Histogram
    batch_latency: metrics.Histogram
    tokens: metrics.Counter


@lru_cache(maxsize=None)
def ingress() -> IngressMetrics:
    return IngressMetrics(
        metrics.Counter(
            "meddr_serve_requests",
            description="HTTP requests answered, by endpoint and status code.",
            tag_keys=("endpoint", "status"),
        ),
        metrics.Histogram(
            "meddr_serve_request_latency_s",
            description="Seconds from request to response, by endpoint (errors included).",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=("endpoint",),
        ),
    )


@lru_cache(maxsize=None)
def generator() -> GeneratorMetrics:
    return GeneratorMetrics(
        metrics.Histogram(
            "meddr_serve_retrieval_latency_s",
            description="Seconds of one retriever call (a whole batch's queries), as the generator waits for it.",
            boundaries=RETRIEVAL_BUCKETS_S,
        ),
        metrics.Histogram(
            "meddr_serve_batch_size",
            description="Requests in one @serve.batch call of the generator.",
            boundaries=BATCH_BUCKETS,
        ),
        metrics.Histogram(
            "meddr_serve_batch_latency_s",
            description="Seconds of one generator batch: vision pass, retrieval and generation.",
            boundaries=LATENCY_BUCKETS_S,
        ),
        metrics.Counter(
            "meddr_serve_tokens_generated",
            description="Tokens the student generated, by task.",
            tag_keys=("task",),
        ),
    )


@lru_cache(maxsize=None)
def index_version() -> metrics.Gauge:
    return metrics.Gauge(
        "meddr_serve_index_version",
        description="Number of the index version a retriever replica searches (v0003 -> 3).",
    )
